"""Waiting for a server started as a child process (the demo's and the benchmarks' servers)."""

import subprocess
import time

import httpx


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """True once `url`/health/ready answers 200; False if the process exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False
