"""A real uvicorn server around create_app(), on a loopback port, in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn

from llm_server.config import ServerSettings
from llm_server.main import EngineFactory, build_engine, create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    def __init__(self, settings: ServerSettings, engine_factory: EngineFactory = build_engine) -> None:
        self.settings = settings
        self.app = create_app(settings, engine_factory=engine_factory)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=settings.port, log_config=None, timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = f"http://127.0.0.1:{settings.port}"

    def start(self, wait_ready: bool = True) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/health/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready: {self.app.state.server}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.app.state.metrics.registry.get_sample_value(name, labels or {})


@contextlib.contextmanager
def running_server(
    model: Any, engine_factory: EngineFactory = build_engine, wait_ready: bool = True, **overrides: Any
) -> Iterator[RunningServer]:
    settings = ServerSettings(model=model, port=free_port(), log_format="plain", **overrides)
    server = RunningServer(settings, engine_factory).start(wait_ready=wait_ready)
    try:
        yield server
    finally:
        server.stop()
