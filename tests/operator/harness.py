"""Run the emulator and the real operator, each in its own thread and event loop.

The test side talks to the emulator over HTTP with lightkube's sync client, like kubectl would, and
never shares an event loop with kopf (kopf treats foreign tasks in its loop as its own hung tasks).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import kmock
import kopf
import yaml
from lightkube import ApiError, Client, KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from prometheus_client import CollectorRegistry

from llmservice_operator.handlers import build_registry
from llmservice_operator.settings import OperatorSettings
from tests.operator.emulator import ClusterEmulator

LLMServiceResource = create_namespaced_resource(
    "serving.llmservice.io", "v1alpha1", "LLMService", "llmservices"
)
T = TypeVar("T")


class Cluster:
    """An emulated API server on a loopback port, served from a background thread."""

    def __init__(self) -> None:
        self.emulator: ClusterEmulator | None = None
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kmock", daemon=True)

    def _serve(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
                self.emulator = emulator
                self.url = str(server.url).rstrip("/")
                self._ready.set()
                await self._stopped.wait()

        asyncio.run(main())

    def start(self) -> Cluster:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the emulator did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stopped:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)

    def client(self) -> Client:
        return Client(config=KubeConfig.from_dict(self._kubeconfig()), field_manager="tests")

    def kubeconfig(self, directory: str) -> str:
        path = os.path.join(directory, "kubeconfig")
        with open(path, "w", encoding="utf-8") as stream:
            yaml.safe_dump(self._kubeconfig(), stream)
        return path

    def _kubeconfig(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
            "users": [{"name": "tester", "user": {"token": "emulator"}}],
        }

    def watch_requests(self, plural: str) -> int:
        assert self.emulator is not None
        return sum(
            count
            for (method, resource, _), count in self.emulator.calls.items()
            if method == "GET" and resource == plural
        )


class RunningOperator:
    """The real kopf operator (this project's registry) in a thread, pointed at the cluster via KUBECONFIG."""

    def __init__(self, cluster: Cluster, settings: OperatorSettings) -> None:
        self.cluster = cluster
        self.settings = settings
        self.metrics_registry = CollectorRegistry()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        registry, self.metrics = build_registry(self.settings, self.metrics_registry)
        try:
            asyncio.run(
                kopf.operator(
                    registry=registry,
                    clusterwide=True,
                    standalone=True,
                    stop_flag=self._stop,
                    ready_flag=self._ready,
                )
            )
        except BaseException as error:  # surfaced by the fixture, never swallowed
            self.error = error

    def start(self) -> RunningOperator:
        watches_before = self.cluster.watch_requests("llmservices")
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError(f"the operator did not start: {self.error!r}")
        # kopf sets ready_flag before its watch streams open: wait for the watch itself.
        eventually(lambda: self.cluster.watch_requests("llmservices") > watches_before, timeout=20)
        eventually(lambda: self.cluster.watch_requests("pods") > 0, timeout=20)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def eventually(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    """Poll until `check` returns a truthy value without raising; return that value."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (AssertionError, ApiError, KeyError) as error:
            last_error = error
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last error: {last_error!r}")
        time.sleep(interval)


@contextmanager
def running_operator(cluster: Cluster, **settings: Any) -> Iterator[RunningOperator]:
    with tempfile.TemporaryDirectory() as directory:
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = cluster.kubeconfig(directory)
        operator = RunningOperator(cluster, OperatorSettings(metrics_port=0, **settings)).start()
        try:
            yield operator
        finally:
            operator.stop()
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous
        if operator.error is not None:
            raise operator.error
