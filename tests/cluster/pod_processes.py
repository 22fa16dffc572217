"""Plays the kubelet's part that kwok does not: a real `llm-server` process for each pod of an LLMService,
listening on the pod's IP (kwok's pod CIDR is a loopback range, controlplane/components.py).

Each process gets the environment the pod's server container resolves to when it starts: the entries of
the ConfigMaps in envFrom as they are at that moment, then env (Secret references resolved), as the
kubelet builds it for every container start. Paths only a real pod would have (cache volume,
termination log) point into a directory of the test's.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.cluster.conftest import Kube


class PodProcesses:
    def __init__(self, kube: Kube, selector: str, work_dir: Path) -> None:
        self._kube = kube
        self._selector = selector
        self._work_dir = work_dir
        self._processes: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}  # pod -> (ip, process)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="pod-processes", daemon=True)
        self.starts: list[str] = []  # pod names, once per process start

    def __enter__(self) -> PodProcesses:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._thread.join(10)
        with self._lock:
            for _, process in self._processes.values():
                process.terminate()
            for _, process in self._processes.values():
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()

    def urls(self) -> dict[str, str]:
        with self._lock:
            return {pod: f"http://{ip}:8000" for pod, (ip, _) in self._processes.items()}

    def restart(self, pod: str) -> None:
        """Kills the pod's server as a crash would; the next round starts it again (a container restart)."""
        with self._lock:
            _, process = self._processes.pop(pod)
        process.kill()
        process.wait(10)

    def _follow(self) -> None:
        while not self._stopping.wait(0.5):
            pods = self._kube.items("pods", "-l", self._selector)
            live = {
                pod["metadata"]["name"]: pod
                for pod in pods
                if (pod.get("status") or {}).get("podIP") and not pod["metadata"].get("deletionTimestamp")
            }
            with self._lock:
                for name in [name for name in self._processes if name not in live]:
                    self._processes.pop(name)[1].terminate()
                # An exited server is started again, as the kubelet restarts a container (e.g. one that
                # could not bind: kwok hands a new pod the IP of one still terminating).
                for name in [
                    name for name, (_, process) in self._processes.items() if process.poll() is not None
                ]:
                    del self._processes[name]
                for name, pod in live.items():
                    if name not in self._processes:
                        self._processes[name] = (pod["status"]["podIP"], self._start(pod))
                        self.starts.append(name)

    def _start(self, pod: dict[str, Any]) -> subprocess.Popen[bytes]:
        container = next(c for c in pod["spec"]["containers"] if c["name"] == "server")
        name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
        pod_dir = self._work_dir / name
        pod_dir.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in os.environ.items() if not key.startswith("LLM_")}
        for source in container.get("envFrom") or []:
            config_map = self._kube.get("configmap", source["configMapRef"]["name"]) or {}
            env.update(config_map.get("data") or {})
        for entry in container.get("env") or []:
            env[entry["name"]] = entry.get("value") or self._secret_value(entry["valueFrom"]["secretKeyRef"])
        env.update(
            LLM_HOST=ip,
            LLM_LOG_FORMAT="plain",
            LLM_TERMINATION_LOG=str(pod_dir / "termination-log"),
            LLM_DOWNLOAD_DIR=str(pod_dir / "models"),
            HF_HOME=str(pod_dir / "hf-home"),
        )
        log = open(pod_dir / "server.log", "ab")  # noqa: SIM115 - the process owns it
        return subprocess.Popen(
            [sys.executable, "-m", "llm_server.cli", *container["args"]], env=env, stdout=log, stderr=log
        )

    def _secret_value(self, ref: dict[str, str]) -> str:
        secret = self._kube.get("secret", ref["name"]) or {}
        return base64.b64decode(secret["data"][ref["key"]]).decode()


def models(url: str, api_key: str | None = None) -> dict[str, str]:
    """Model id -> root (an adapter's directory) as the server at `url` lists them; {} when it is down."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=2)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    return {model["id"]: model["root"] for model in json.loads(response.text)["data"]}
