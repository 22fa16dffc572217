"""Run the emulator and the real operator, each in its own thread and event loop.

The test side talks to the emulator over HTTP with lightkube's sync client, like kubectl would, and
never shares an event loop with kopf (kopf treats foreign tasks in its loop as its own hung tasks).
Each operator gets its own bearer token ("operator-<n>"), the test client "tests": the emulator's
fault plan fails only the operator's requests, and can cut a killed operator off at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import kmock
import kopf
import msgspec
import yaml
from lightkube import ApiError, Client, KubeConfig
from lightkube.codecs import resource_registry
from lightkube.core import decoders
from lightkube.core.internal_models import meta_v1
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import PatchType
from prometheus_client import CollectorRegistry

from llmservice_operator.builders import build_children
from llmservice_operator.builders.common import label_selector
from llmservice_operator.builders.service import service_url
from llmservice_operator.conditions import Observation, build_status
from llmservice_operator.constants import LABEL_MANAGED_BY, OPERATOR_NAME
from llmservice_operator.drift import needs_apply, with_applied_hash
from llmservice_operator.handlers import CHILD_RESOURCES, build_registry
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import LLMService, parse_spec
from tests.operator.emulator import ClusterEmulator

LLMServiceResource = create_namespaced_resource(
    "serving.llmservice.io", "v1alpha1", "LLMService", "llmservices"
)
T = TypeVar("T")
TEST_CLIENT = "tests"
_operator_tokens = (f"operator-{number}" for number in itertools.count())


def _warm_decoders() -> None:
    """Build lightkube's msgspec decoders in this thread before any operator thread runs.

    msgspec builds a type's decoding info on its first use, and two threads doing that for the same
    type at once crashed the interpreter here (a segmentation fault): the test's client and the
    operator's both decode Deployments, Services and the rest.
    """
    kinds = {kind: resource[:2] for kind, resource in CHILD_RESOURCES.items()}
    kinds.update(Pod=("", "v1"), Event=("", "v1"))
    for kind, (group, version) in kinds.items():
        resource = resource_registry.load(f"{group}/{version}" if group else version, kind)
        if decoders._is_struct(resource):
            msgspec.json.Decoder(resource)
            msgspec.json.Decoder(decoders._get_list_model(resource)[0])
    msgspec.json.Decoder(meta_v1.Status)


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
        _warm_decoders()
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the emulator did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stopped:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)

    def client(self) -> Client:
        return Client(config=KubeConfig.from_dict(self._kubeconfig(TEST_CLIENT)), field_manager="tests")

    def kubeconfig(self, directory: str, token: str = "operator") -> str:
        path = os.path.join(directory, "kubeconfig")
        with open(path, "w", encoding="utf-8") as stream:
            yaml.safe_dump(self._kubeconfig(token), stream)
        return path

    def _kubeconfig(self, token: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
            "users": [{"name": "tester", "user": {"token": token}}],
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

    def __init__(self, cluster: Cluster, settings: OperatorSettings, token: str) -> None:
        self.cluster = cluster
        self.settings = settings
        self.token = token
        self.metrics_registry = CollectorRegistry()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)
        self.error: BaseException | None = None
        self._main: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        registry, self.metrics = build_registry(self.settings, self.metrics_registry)

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._main = asyncio.current_task()
            await kopf.operator(
                registry=registry,
                clusterwide=True,
                standalone=True,
                stop_flag=self._stop,
                ready_flag=self._ready,
            )

        try:
            asyncio.run(main())
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

    def kill(self) -> None:
        """Die like a killed process: nothing more reaches the cluster, then every task is cancelled."""
        assert self.cluster.emulator is not None and self._loop is not None and self._main is not None
        self.cluster.emulator.faults.cut_off(self.token)
        loop = self._loop

        def cancel_everything() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()

        # kopf shuts down gracefully when its main task is cancelled (it waits for its workers):
        # cancel every task, again and again, until the thread is gone. The stop flag too, once the
        # tasks are cancelled: kopf waits for it in an executor thread that asyncio.run joins.
        deadline = time.monotonic() + 30
        while self._thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(cancel_everything)
            self._thread.join(0.1)
            self._stop.set()
        if self._thread.is_alive():
            raise RuntimeError("the killed operator's thread did not end")
        self.error = None  # the cancellation is the kill itself


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
def operator_environment(cluster: Cluster, token: str) -> Iterator[None]:
    """$KUBECONFIG for an operator started inside (it reads the file at start-up and at login)."""
    with tempfile.TemporaryDirectory() as directory:
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = cluster.kubeconfig(directory, token)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous


def start_operator(cluster: Cluster, **settings: Any) -> RunningOperator:
    """An operator with a fresh token; the caller stops or kills it."""
    token = next(_operator_tokens)
    with operator_environment(cluster, token):
        return RunningOperator(cluster, OperatorSettings(metrics_port=0, **settings), token).start()


@contextmanager
def running_operator(cluster: Cluster, **settings: Any) -> Iterator[RunningOperator]:
    token = next(_operator_tokens)
    with operator_environment(cluster, token):
        operator = RunningOperator(cluster, OperatorSettings(metrics_port=0, **settings), token).start()
        try:
            yield operator
        finally:
            operator.stop()
        if operator.error is not None:
            raise operator.error


def varied_spec(index: int) -> dict[str, Any]:
    """Specs that between them ask for every kind of child, and leave some out."""
    body: dict[str, Any] = {
        "model": {"source": "hf://acme/tiny-llama", "revision": "v1"},
        "gpus": index % 2,
        "replicas": 1 + index % 3,
    }
    if index % 4 == 3:
        body["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2 + index % 5}
    return body


def create(kube: Client, namespace: str, name: str, body: dict[str, Any]) -> None:
    manifest = {
        "apiVersion": "serving.llmservice.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }
    kube.create(LLMServiceResource(manifest), namespace=namespace)


def edit(kube: Client, namespace: str, name: str, changes: dict[str, Any]) -> None:
    kube.patch(LLMServiceResource, name, {"spec": changes}, namespace=namespace, patch_type=PatchType.MERGE)


def wait_converged(kube: Client, namespace: str, timeout: float, started: float | None = None) -> float:
    """Seconds from `started` (default: now) until the namespace converged (fails after `timeout`)."""
    started = time.monotonic() if started is None else started
    problems: list[str] = []

    def converged() -> bool:
        nonlocal problems
        problems = convergence_problems(kube, namespace)
        return not problems

    try:
        eventually(converged, timeout=timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not converged in {timeout}s: {problems[:10]}") from None
    return time.monotonic() - started


def operator_retries(operator: RunningOperator) -> dict[str, float]:
    """The operator's own count of retried API calls and failed passes."""
    registry = operator.metrics_registry
    api = sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "llmservice_operator_api_retries"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    failed = sum(
        registry.get_sample_value("llmservice_operator_reconciles_total", {"trigger": t, "result": "error"})
        or 0
        for t in ("change", "child")
    )
    return {"api_retries": api, "failed_passes": failed}


def convergence_problems(kube: Client, namespace: str, settings: OperatorSettings | None = None) -> list[str]:
    """Why `namespace` is not what the operator should have made of its LLMServices (empty: it is).

    Every LLMService has exactly the children its spec asks for, each matching what the operator
    would apply and owned by it alone; no child of the operator's is left without its owner (an orphan
    garbage collection would never take); and every status is what a cluster with no pods yet gives.
    """
    settings = settings or OperatorSettings(metrics_port=0)
    problems: list[str] = []
    owners = {
        item.metadata.name: item.to_dict() for item in kube.list(LLMServiceResource, namespace=namespace)
    }
    live: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, (group, version, _) in CHILD_RESOURCES.items():
        resource = resource_registry.load(f"{group}/{version}" if group else version, kind)
        for child in kube.list(resource, namespace=namespace, labels={LABEL_MANAGED_BY: OPERATOR_NAME}):
            body = child.to_dict()
            key = (kind, body["metadata"]["name"])
            if key in live:
                problems.append(f"{kind} {key[1]} listed twice")
            live[key] = body
    expected: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {}
    for name, owner in owners.items():
        meta = owner["metadata"]
        svc = LLMService(name, namespace, parse_spec(owner["spec"]), meta["uid"], meta.get("generation"))
        for manifest in build_children(svc, settings).desired:
            expected[(manifest["kind"], manifest["metadata"]["name"])] = (with_applied_hash(manifest), owner)
        deployment = live.get(("Deployment", name))
        status = owner.get("status") or {}
        want = build_status(
            Observation(meta.get("generation"), deployment, []),
            status,
            selector=label_selector(name),
            url=service_url(name, namespace, settings.cluster_domain),
            now="",
        )
        for condition in want["conditions"]:
            condition.pop("lastTransitionTime")
        got = dict(
            status,
            conditions=[
                {key: value for key, value in item.items() if key != "lastTransitionTime"}
                for item in status.get("conditions") or []
            ],
        )
        if got != want:
            problems.append(f"LLMService {name}: status {got} is not {want}")
    for key, body in live.items():
        refs = body["metadata"].get("ownerReferences") or []
        owner_uids = {owner["metadata"]["uid"] for owner in owners.values()}
        if not any(ref.get("uid") in owner_uids for ref in refs):
            problems.append(f"{key[0]} {key[1]} is an orphan (owners {refs})")
        elif key not in expected:
            problems.append(f"{key[0]} {key[1]} exists but the spec does not ask for it")
    for key, (desired, owner) in expected.items():
        body = live.get(key)
        if body is None:
            problems.append(f"{key[0]} {key[1]} is missing")
            continue
        if needs_apply(desired, body):
            problems.append(f"{key[0]} {key[1]} differs from what the operator would apply")
        refs = body["metadata"].get("ownerReferences") or []
        if [ref.get("uid") for ref in refs] != [owner["metadata"]["uid"]]:
            problems.append(f"{key[0]} {key[1]} has owners {refs}")
    return problems
