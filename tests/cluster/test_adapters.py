"""Adapters change without restarting model pods: the real operator on the real control plane, kwok pods
with loopback IPs and a real llm-server behind each (pod_processes.py), the API key on, while clients
stream to the base model and to an adapter the changes leave alone."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_server.demo_model import build_demo_model
from tests.cluster.conftest import Kube, llmservice
from tests.cluster.pod_processes import PodProcesses, models
from tests.operator.harness import eventually

API_KEY = "k-7f3a9c"
SELECTOR = "app.kubernetes.io/instance=chat"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    model, adapter = build_demo_model(root / "demo")
    made = {"model": model}
    for name in ("kept", "v1", "v2", "late"):
        made[name] = Path(shutil.copytree(adapter, root / name))
    broken = Path(shutil.copytree(adapter, root / "broken"))
    config = json.loads((broken / "adapter_config.json").read_text())
    config["target_modules"] = ["w_fancy_proj"]
    (broken / "adapter_config.json").write_text(json.dumps(config))
    made["broken"] = broken
    return made


class Streams:
    """Clients streaming to the base model and to `kept` on every pod, one after another, until stopped;
    every request that does not finish with its 24 tokens is a failure."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(url, model), daemon=True)
            for url in urls.values()
            for model in ("chat", "kept")
        ]

    def __enter__(self) -> Streams:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, url: str, model: str) -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 24,
            "min_tokens": 24,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {API_KEY}"}
        while not self._stop.is_set():
            try:
                tokens = None
                with httpx.stream(
                    "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30
                ) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}")
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            usage = json.loads(line.removeprefix("data: ")).get("usage")
                            tokens = usage["completion_tokens"] if usage else tokens
                if tokens != 24:
                    raise RuntimeError(f"{tokens} tokens")
                self.done += 1
            except Exception as error:
                self.failures.append(f"{model} at {url}: {error!r}")


def adapter_status(kube: Kube) -> dict[str, dict[str, Any]]:
    return {
        item["name"]: item
        for item in ((kube.get("llms", "chat") or {}).get("status") or {}).get("adapters", [])
    }


def wait_served(kube: Kube, pods: PodProcesses, expected: dict[str, Path], timeout: float = 30) -> float:
    """Seconds until every pod serves exactly `expected` (adapter -> directory) and the status says so."""
    started = time.monotonic()

    def converged() -> bool:
        urls = pods.urls()
        wanted = {"chat": "chat", **{name: str(path) for name, path in expected.items()}}
        if len(urls) != 2 or any(models(url, API_KEY) != wanted for url in urls.values()):
            return False
        status = adapter_status(kube)
        return all(
            status.get(name, {}).get("state") == "Ready"
            and status[name]["readyPods"] == 2
            and status[name]["source"] == f"file://{path}"
            for name, path in expected.items()
        )

    eventually(converged, timeout=timeout, interval=0.2)
    return time.monotonic() - started


def set_adapters(kube: Kube, adapters: dict[str, Path]) -> None:
    entries = [{"name": name, "source": f"file://{path}"} for name, path in adapters.items()]
    kube.run("patch", "llms", "chat", "--type=merge", "-p", json.dumps({"spec": {"adapters": entries}}))


@pytest.fixture
def service(kube: Kube, weights: dict[str, Path], tmp_path: Path) -> Iterator[PodProcesses]:
    kube.run("create", "secret", "generic", "chat-key", f"--from-literal=api-key={API_KEY}")
    manifest = llmservice(
        "chat",
        model={"source": f"file://{weights['model']}"},
        adapters=[{"name": "kept", "source": f"file://{weights['kept']}"}],
        gpus=0,
        replicas=2,
        apiKeySecretRef={"name": "chat-key"},
        networkPolicy={
            "enabled": True,
            "ingressFrom": [{"podSelector": {"matchLabels": {"role": "gateway"}}}],
        },
    )
    kube.apply(manifest)
    with PodProcesses(kube, SELECTOR, tmp_path / "pods") as pods:
        yield pods


def template_and_pods(kube: Kube) -> tuple[Any, ...]:
    deployment = kube.get("deployment", "chat") or {}
    pods = sorted(pod["metadata"]["uid"] for pod in kube.items("pods", "-l", SELECTOR))
    replica_sets = sorted(rs["metadata"]["name"] for rs in kube.items("replicasets", "-l", SELECTOR))
    return (
        deployment["metadata"]["generation"],
        json.dumps(deployment["spec"]["template"]),
        pods,
        replica_sets,
    )


def test_adapters_change_on_running_pods_without_a_rollout(
    kube: Kube, weights: dict[str, Path], service: PodProcesses, figure
) -> None:  # type: ignore[no-untyped-def]
    pods = service
    wait_served(kube, pods, {"kept": weights["kept"]}, timeout=120)
    assert kube.condition("chat", "AdaptersReady")["reason"] == "AllReady"
    before = template_and_pods(kube)
    # The operator's namespace is admitted to the pods' port beside the user's peers.
    policy = kube.get("networkpolicy", "chat") or {}
    peers = policy["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llm-system"}}} in peers

    timings = {}
    with Streams(pods.urls()) as streams:
        set_adapters(kube, {"kept": weights["kept"], "extra": weights["v1"]})
        timings["add"] = wait_served(kube, pods, {"kept": weights["kept"], "extra": weights["v1"]})
        set_adapters(kube, {"kept": weights["kept"], "extra": weights["v2"]})
        timings["change"] = wait_served(kube, pods, {"kept": weights["kept"], "extra": weights["v2"]})

        # A broken adapter: Failed with its reason, the rest serve, Ready stays about the base model.
        set_adapters(kube, {"kept": weights["kept"], "extra": weights["v2"], "broken": weights["broken"]})
        failed = eventually(
            lambda: (
                adapter_status(kube).get("broken", {}).get("state") == "Failed"
                and adapter_status(kube)["broken"]
            ),
            timeout=30,
        )
        assert failed["reason"].startswith("incompatible with the base model")
        assert "w_fancy_proj" in failed["reason"] and failed["readyPods"] == 0
        condition = kube.condition("chat", "AdaptersReady")
        assert condition["status"] == "False" and condition["reason"] == "AdapterFailed"
        assert "broken" in condition["message"]
        assert kube.condition("chat", "Ready")["status"] == "True"
        assert adapter_status(kube)["extra"]["state"] == "Ready"

        def adapter_events() -> set[tuple[str, str]]:
            events = kube.items("events", "--field-selector", "involvedObject.name=chat")
            return {(event["reason"], event["message"].split(" ")[1]) for event in events}

        eventually(
            lambda: {("AdapterLoaded", "extra"), ("AdapterFailed", "broken")} <= adapter_events(), timeout=20
        )

        set_adapters(kube, {"kept": weights["kept"]})
        timings["remove"] = wait_served(kube, pods, {"kept": weights["kept"]})
        for url in pods.urls().values():
            gone = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "extra", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            assert gone.status_code == 404
        assert kube.condition("chat", "AdaptersReady")["reason"] == "AllReady"
    assert streams.failures == []
    assert streams.done >= 8  # four clients, each streaming through every change
    assert template_and_pods(kube) == before  # no rollout, the same pods
    assert max(timings.values()) < 30
    figure(
        "seconds from spec edit to every pod serving it: "
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
    )

    # A pod's server restarted in the middle of a change comes back with the whole current set (from the
    # ConfigMap as it is when the container starts, then from the operator).
    target = sorted(pods.urls())[0]
    set_adapters(kube, {"kept": weights["kept"], "late": weights["late"]})
    pods.restart(target)
    wait_served(kube, pods, {"kept": weights["kept"], "late": weights["late"]}, timeout=60)
    assert pods.starts.count(target) == 2
    assert template_and_pods(kube) == before
