"""`make bench-operator`: 200 LLMServices against the kmock emulator, with the real operator.

Prints: time until every child exists, API requests per LLMService (by verb), and the writes of a no-op
resync, measured two ways: an operator restart (kopf resumes every LLMService) and an unrelated edit on
every Deployment (each triggers a full pass). The goal for both no-op figures is 0.
"""

import argparse
import collections
import logging
import time
from typing import Any

from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.types import PatchType

from tests.operator.harness import Cluster, LLMServiceResource, eventually, running_operator

NAMESPACE = "bench"


def manifest(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "serving.llmservice.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": f"svc-{index:03d}", "namespace": NAMESPACE},
        "spec": {
            "model": {"source": "hf://acme/llama", "revision": "main"},
            "adapters": [{"name": "support", "source": "hf://acme/support-lora"}],
            "gpus": 1,
            "autoscaling": {"minReplicas": 1, "maxReplicas": 4},
        },
    }


def calls_by_verb(cluster: Cluster) -> collections.Counter[str]:
    assert cluster.emulator is not None
    counts: collections.Counter[str] = collections.Counter()
    for (method, resource, subresource), count in cluster.emulator.calls.items():
        counts[f"{method} {resource}{'/' + subresource if subresource else ''}"] += count
    return counts


def reconciles(operator: Any, trigger: str) -> float:
    return (
        operator.metrics_registry.get_sample_value(
            "llmservice_operator_reconciles_total", {"trigger": trigger, "result": "ok"}
        )
        or 0.0
    )


def wait_for_passes(operator: Any, trigger: str, at_least: float, settle: float = 1.0) -> None:
    eventually(lambda: reconciles(operator, trigger) >= at_least, timeout=120, interval=0.1)
    time.sleep(settle)  # writes caused by those passes land, and their events fire


def diff(after: collections.Counter[str], before: collections.Counter[str]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in sorted(after) if after[key] - before[key]}


def writes(counts: dict[str, int]) -> int:
    return sum(count for key, count in counts.items() if key.split()[0] in {"POST", "PUT", "PATCH", "DELETE"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    count = args.count

    cluster = Cluster().start()
    kube = cluster.client()
    try:
        with running_operator(cluster) as operator:
            baseline = calls_by_verb(cluster)
            started = time.perf_counter()
            for index in range(count):
                kube.create(LLMServiceResource(manifest(index)), namespace=NAMESPACE)
            created = time.perf_counter() - started

            def all_children() -> bool:
                assert cluster.emulator is not None
                return (
                    sum(
                        1
                        for key in cluster.emulator.objects
                        if key[0].plural == "poddisruptionbudgets"
                        and not cluster.emulator.objects[key].deleted
                    )
                    >= count
                )

            eventually(all_children, timeout=120, interval=0.05)
            converged = time.perf_counter() - started
            wait_for_passes(operator, "change", count)
            eventually(lambda: kube.get(PodDisruptionBudget, f"svc-{count - 1:03d}", namespace=NAMESPACE))
            after_create = calls_by_verb(cluster)

            # No-op resync 1: an unrelated annotation on every Deployment triggers a full pass each.
            before_touch = calls_by_verb(cluster)
            passes_before = reconciles(operator, "child")
            for index in range(count):
                kube.patch(
                    Deployment,
                    f"svc-{index:03d}",
                    {"metadata": {"annotations": {"bench/touch": "1"}}},
                    namespace=NAMESPACE,
                    patch_type=PatchType.MERGE,
                )
            wait_for_passes(operator, "child", passes_before + count)
            touch = diff(calls_by_verb(cluster), before_touch)
            touch_operator_writes = writes(touch) - count  # minus the benchmark's own patches

        # No-op resync 2: restart the operator; kopf resumes every LLMService.
        before_restart = calls_by_verb(cluster)
        with running_operator(cluster) as operator:
            wait_for_passes(operator, "change", count, settle=2.0)
            restart = diff(calls_by_verb(cluster), before_restart)
    finally:
        cluster.stop()

    creation = diff(after_create, baseline)
    print(f"\nLLMServices: {count}  (kmock emulator, real kopf operator, 1 process, this machine)")
    print(f"  created by the client in       {created:7.2f} s")
    print(f"  all children existed after     {converged:7.2f} s  ({count / converged:.1f} LLMServices/s)")
    print(
        f"  API requests per LLMService    {sum(creation.values()) / count:7.2f}  "
        f"(writes {writes(creation) / count:.2f})"
    )
    for key, value in creation.items():
        print(f"      {key:<45} {value / count:6.2f}")
    print(
        f"  no-op pass after a child edit: operator writes per LLMService {touch_operator_writes / count:.2f}"
    )
    for key, value in touch.items():
        print(f"      {key:<45} {value:6d}")
    restart_writes = writes(restart)
    print(f"  no-op resync on restart:       writes per LLMService {restart_writes / count:.2f}")
    for key, value in restart.items():
        print(f"      {key:<45} {value:6d}")


if __name__ == "__main__":
    main()
