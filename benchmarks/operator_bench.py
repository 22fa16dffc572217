"""`make bench-operator`: 200 LLMServices against the kmock emulator, then against a real control plane.

Both runs use the real operator. The emulator run counts the emulator's own record of requests; the real
run (benchmarks/operator_bench_cluster.py) counts the API server's audit log, and adds time to Ready, the
operator's memory and CPU, and its memory beside 10,000 unrelated objects.

Prints one table: time until every child exists, the operator's API requests per LLMService (by verb),
and the writes of a no-op resync, measured two ways: an unrelated edit on every Deployment (each triggers
a full pass) and an operator restart (kopf resumes every LLMService). The goal for both no-op figures is 0.
"""

from __future__ import annotations

import argparse
import collections
import logging
import time
from typing import Any

from lightkube.resources.apps_v1 import Deployment
from lightkube.types import PatchType

from benchmarks import operator_bench_cluster
from benchmarks.operator_bench_common import (
    NAMESPACE,
    QUIET_SECONDS,
    TOUCH_LABEL,
    Run,
    failures,
    manifest,
    request_key,
    table,
)
from tests.operator.emulator import Call
from tests.operator.harness import Cluster, LLMServiceResource, eventually, running_operator

EMULATOR_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def emulator_verb(call: Call) -> str | None:
    """The verb the API server would log; None for the emulator's extra RBAC entry of a creating apply."""
    if call.method == "GET":
        return {"LIST": "list", "WATCH": "watch"}.get(call.action, "get")
    if call.method == "PATCH" and call.action == "CREATE":
        return None
    return EMULATOR_VERBS[call.method]


def requests_since(cluster: Cluster, mark: int) -> collections.Counter[str]:
    """Every request after the `mark`-th in the emulator's log, by verb and resource (the bench's too)."""
    assert cluster.emulator is not None
    counts: collections.Counter[str] = collections.Counter()
    for call in cluster.emulator.log[mark:]:
        verb = emulator_verb(call)
        if verb is not None:
            counts[request_key(verb, call.plural, call.subresource)] += 1
    return counts


def reconciles(operator: Any, trigger: str, result: str = "ok") -> float:
    return (
        operator.metrics_registry.get_sample_value(
            "llmservice_operator_reconciles_total", {"trigger": trigger, "result": result}
        )
        or 0.0
    )


def wait_for_passes(cluster: Cluster, operator: Any, trigger: str, at_least: float) -> None:
    """Until `at_least` passes for `trigger` have run, and then nothing was written for QUIET_SECONDS
    (what those passes caused has landed: status writes, events, kopf's own patches)."""
    assert cluster.emulator is not None
    emulator = cluster.emulator
    eventually(lambda: reconciles(operator, trigger) >= at_least, timeout=120, interval=0.1)
    last, since = emulator.writes(), time.monotonic()
    while time.monotonic() - since < QUIET_SECONDS:
        time.sleep(0.2)
        if emulator.writes() != last:
            last, since = emulator.writes(), time.monotonic()


class FailureLog(logging.Handler):
    """kopf's error lines, as the real run reads them from the operator's log file."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_emulator(count: int) -> Run:
    cluster = Cluster().start()
    kube = cluster.client()
    failure_log = FailureLog()
    logging.getLogger("kopf").addHandler(failure_log)
    try:
        with running_operator(cluster) as operator:
            assert cluster.emulator is not None
            mark = len(cluster.emulator.log)
            started = time.perf_counter()
            for index in range(count):
                kube.create(LLMServiceResource(manifest(index, gpus=1)), namespace=NAMESPACE)
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
            wait_for_passes(cluster, operator, "change", count)
            creation = requests_since(cluster, mark)
            creation[request_key("create", "llmservices")] -= count  # the bench's own

            # No-op pass 1: a label of no one's on every Deployment triggers a full pass each.
            mark = len(cluster.emulator.log)
            passes_before = reconciles(operator, "child")
            for index in range(count):
                kube.patch(
                    Deployment,
                    f"svc-{index:03d}",
                    {"metadata": {"labels": {TOUCH_LABEL: "1"}}},
                    namespace=NAMESPACE,
                    patch_type=PatchType.MERGE,
                )
            wait_for_passes(cluster, operator, "child", passes_before + count)
            touch = requests_since(cluster, mark)
            touch[request_key("patch", "deployments")] -= count  # the bench's own
            touch_passes = int(reconciles(operator, "child") - passes_before)
            failed = sum(reconciles(operator, trigger, "error") for trigger in ("change", "child"))
            failed_kinds = failures(failure_log.lines)

        # No-op pass 2: restart the operator; kopf resumes every LLMService.
        mark = len(cluster.emulator.log)
        with running_operator(cluster) as operator:
            wait_for_passes(cluster, operator, "change", count)
            restart = requests_since(cluster, mark)
    finally:
        logging.getLogger("kopf").removeHandler(failure_log)
        cluster.stop()
    return Run(
        title="kmock emulator",
        count=count,
        created_s=created,
        children_s=converged,
        ready_s=None,
        settled_s=None,
        failed_passes=int(failed),
        failures=failed_kinds,
        requests=+creation,
        touch_passes=touch_passes,
        touch=+touch,
        restart=restart,
        peak_rss_mib=None,  # the operator runs in this process, beside the emulator
        cpu_s=None,
        restart_cpu_s=None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=200, help="LLMServices per run")
    parser.add_argument(
        "--unrelated",
        type=int,
        default=5000,
        help="unrelated pods, and as many ConfigMaps, the real run measures the operator's memory beside",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    emulated = run_emulator(args.count)
    real, memory = operator_bench_cluster.run(args.count, args.unrelated)
    print(f"\nThe real operator, {args.count} LLMServices per run (this machine)\n")
    print(table([emulated, real]))
    print()
    print(memory.report())


if __name__ == "__main__":
    main()
