"""`make bench-adapters`: how long an adapter added to spec.adapters takes to be served by every pod,
against the pod rollout the same change caused before (the adapter set in the pods' config hash).

On the real control plane (controlplane/), a 2-replica LLMService of the demo model on kwok pods whose
loopback IPs real llm-server processes listen on (tests/cluster/pod_processes.py). Ten adds, one at a
time: from the `kubectl patch` to every pod listing the adapter in /v1/models. Then the old behaviour:
the same add with a changed pod template (what the config hash did), three times: from the patch to every
new pod serving the new set. kwok marks a new pod ready at once, so the Deployment replaces both pods
together; a new pod often gets the IP of one still terminating, and its server binds once the old one has
drained (LLM_DRAIN_SECONDS, 5 s) and then loads the model and the adapters. A real rollout waits for each
new pod's readiness (maxSurge 1) and loads a real model (minutes), so this understates the old cost.
Writes bench/adapters.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.serving_bench import WORK
from controlplane.cluster import Cluster
from llm_server.demo_model import build_demo_model
from tests.cluster.conftest import Kube, llmservice
from tests.cluster.pod_processes import PodProcesses, models
from tests.operator.harness import eventually

ADDS = 10
ROLLOUTS = 3
REPLICAS = 2
SELECTOR = "app.kubernetes.io/instance=chat"


def _served_everywhere(pods: PodProcesses, names: set[str], old_pods: frozenset[str] = frozenset()) -> bool:
    urls = pods.urls()
    fresh = {pod: url for pod, url in urls.items() if pod not in old_pods}
    return len(fresh) == REPLICAS == len(urls) and all(names <= set(models(url)) for url in fresh.values())


def _patch(kube: Kube, body: dict[str, Any], kind: str = "llms") -> float:
    started = time.monotonic()
    kube.run("patch", kind, "chat", "--type=merge", "-p", json.dumps(body))
    return started


def _entries(adapters: dict[str, Path]) -> list[dict[str, str]]:
    return [{"name": name, "source": f"file://{path}"} for name, path in adapters.items()]


def run(root: Path) -> dict[str, Any]:
    model, adapter = build_demo_model(root / "demo")
    copies = {f"a{i}": Path(shutil.copytree(adapter, root / f"a{i}")) for i in range(ADDS + ROLLOUTS)}
    cluster = Cluster(root / "cluster", outlive_caller=False)
    cluster.up()
    try:
        kube = Kube(cluster, "bench")
        cluster.kubectl("create", "namespace", "bench")
        kube.apply(llmservice("chat", model={"source": f"file://{model}"}, gpus=0, replicas=REPLICAS))
        with PodProcesses(kube, SELECTOR, root / "pods") as pods:
            eventually(lambda: _served_everywhere(pods, {"chat"}), timeout=180, interval=0.2)
            served: dict[str, Path] = {}
            live_adds = []
            for i in range(ADDS):
                served[f"a{i}"] = copies[f"a{i}"]
                started = _patch(kube, {"spec": {"adapters": _entries(served)}})
                eventually(lambda: _served_everywhere(pods, set(served)), timeout=120, interval=0.05)
                live_adds.append(time.monotonic() - started)
                print(f"add {i + 1}: every pod serves it after {live_adds[-1]:.2f} s", flush=True)
            rollouts = []
            for i in range(ADDS, ADDS + ROLLOUTS):
                old = frozenset(pods.urls())
                served[f"a{i}"] = copies[f"a{i}"]
                # The old operator: the adapter set in the config hash on the pod template.
                _patch(kube, {"spec": {"adapters": _entries(served)}})
                started = _patch(
                    kube,
                    {"spec": {"template": {"metadata": {"annotations": {"bench/config-hash": f"h{i}"}}}}},
                    kind="deployment",
                )
                eventually(
                    lambda old=old: _served_everywhere(pods, set(served), old), timeout=300, interval=0.05
                )
                rollouts.append(time.monotonic() - started)
                print(f"rollout {i - ADDS + 1}: new pods serve it after {rollouts[-1]:.2f} s", flush=True)
    except BaseException:
        traceback.print_exc()  # before the cluster goes down
        raise
    finally:
        cluster.down()
    return {
        "adds": len(live_adds),
        "live_p50_s": round(statistics.median(live_adds), 2),
        "live_max_s": round(max(live_adds), 2),
        "rollout_p50_s": round(statistics.median(rollouts), 2),
        "rollout_max_s": round(max(rollouts), 2),
        "rollout_over_live_p50": round(statistics.median(rollouts) / statistics.median(live_adds), 1),
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="adapter-bench-") as tmp:
        report = run(Path(tmp))
    print(
        f"\nadapter added to the spec -> every pod serving it, {report['adds']} adds: "
        f"p50 {report['live_p50_s']} s, "
        f"max {report['live_max_s']} s (no pod restarted)\n"
        f"the same change as a rollout (old behaviour, the demo model's load): "
        f"p50 {report['rollout_p50_s']} s, "
        f"max {report['rollout_max_s']} s\n"
        f"rollout / live add (p50): {report['rollout_over_live_p50']}x"
    )
    WORK.mkdir(exist_ok=True)
    (WORK / "adapters.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
