"""The real operator against an API server that fails: errors, throttling, expiring watches, and an
operator process killed in the middle of its passes. Whatever happens, every LLMService converges:
exactly the children its spec asks for, each owned by it, no orphans, and the status a cluster with
no pods yet gives (tests/operator/harness.py: convergence_problems).

Each test records its figures (printed at the end of the run); `make bench-faults` runs the heavier version.
"""

import itertools
import random
import time
from collections.abc import Iterator

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Service

from benchmarks.operator_faults import many_at_once
from tests.operator.faults import WRITE_METHODS, FaultPlan, RequestFault, WatchFault, every_fault
from tests.operator.harness import (
    Cluster,
    LLMServiceResource,
    create,
    edit,
    operator_retries,
    start_operator,
    varied_spec,
    wait_converged,
)

SEED = 20261106


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """An emulator of this module's own: a cluster-wide operator started later (test_run_command)
    would otherwise resume every LLMService these tests leave behind."""
    cluster = Cluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture()
def faults(cluster: Cluster) -> Iterator[FaultPlan]:
    assert cluster.emulator is not None
    plan = cluster.emulator.faults = FaultPlan(seed=SEED)
    yield plan
    cluster.emulator.faults = FaultPlan()


FAULTS = [
    pytest.param(RequestFault(409, rate=0.2, methods=WRITE_METHODS), None, id="409-conflict"),
    pytest.param(RequestFault(500, rate=0.1), None, id="500-server-error"),
    pytest.param(RequestFault(429, rate=0.1, retry_after=1), None, id="429-throttled"),
    pytest.param(None, WatchFault(rate=0.1, expire=True, limit=30), id="410-watch-expired"),
    pytest.param(None, WatchFault(rate=0.1, expire=False, limit=30), id="watch-dropped"),
]


@pytest.mark.parametrize(("request_fault", "watch_fault"), FAULTS)
def test_converges_under_faults(
    cluster: Cluster,
    kube: Client,
    namespace: str,
    faults: FaultPlan,
    request_fault: RequestFault | None,
    watch_fault: WatchFault | None,
    figure,  # type: ignore[no-untyped-def]
) -> None:
    if request_fault is not None:
        faults.fail_requests(request_fault)
    if watch_fault is not None:
        faults.end_watches(watch_fault)
    count = 8
    operator = start_operator(cluster)
    try:
        started = time.monotonic()
        for index in range(count):
            create(kube, namespace, f"svc-{index}", varied_spec(index))
        # Edits while the first passes run: spec changes that add and drop an HPA and a PDB.
        edit(kube, namespace, "svc-0", {"autoscaling": {"minReplicas": 1, "maxReplicas": 3}})
        edit(kube, namespace, "svc-3", {"autoscaling": None, "replicas": 1})
        kube.delete(LLMServiceResource, f"svc-{count - 1}", namespace=namespace)
        wait_converged(kube, namespace, timeout=60)
        elapsed = time.monotonic() - started
        # A child deleted by hand comes back even when the first attempts to restore it fail. Watches
        # stop expiring first: a deletion lost to a 410 is repaired by the periodic resync instead (see
        # test_a_child_deleted_while_its_watch_expired_is_recreated_by_the_resync).
        faults.keep_watches()
        kube.delete(Service, "svc-1", namespace=namespace)
        restored = wait_converged(kube, namespace, timeout=60)
        assert faults.total() > 0, "no fault was injected"
        assert operator.error is None
        figure(
            f"{request_fault or watch_fault}: {count} LLMServices converged in {elapsed:.2f} s, "
            f"a deleted child restored in {restored:.2f} s; injected {faults.summary()}; "
            f"{operator_retries(operator)}"
        )
    finally:
        operator.stop()
    assert operator.error is None


def test_a_pass_started_by_a_child_is_retried_after_the_api_failed_it(
    cluster: Cluster, kube: Client, namespace: str, faults: FaultPlan
) -> None:
    """No event comes after a failed child-triggered pass: the operator must retry it on its own."""
    operator = start_operator(cluster)
    try:
        create(kube, namespace, "bot", varied_spec(1))
        wait_converged(kube, namespace, timeout=30)
        # Every write fails for a while (longer than a request's own retries), then the server recovers.
        faults.fail_requests(RequestFault(500, rate=1.0, methods=WRITE_METHODS, limit=12))
        kube.delete(Service, "bot", namespace=namespace)
        # Without a retry of its own the operator leaves the Service missing and the status ApplyFailed.
        wait_converged(kube, namespace, timeout=30)
        assert faults.total() == 12
    finally:
        operator.stop()
    assert operator.error is None


def test_an_operator_killed_20_times_mid_pass_converges(
    cluster: Cluster,
    kube: Client,
    namespace: str,
    faults: FaultPlan,
    figure,  # type: ignore[no-untyped-def]
) -> None:
    rng = random.Random(SEED)
    faults.fail_requests(RequestFault(500, rate=0.05))
    names: list[str] = []
    numbers = itertools.count()
    started = time.monotonic()
    kills_mid_pass = 0
    for round_number in range(20):
        operator = start_operator(cluster)
        try:
            # Work for this incarnation: new LLMServices, an edit, now and then a deletion.
            for _ in range(2):
                names.append(f"svc-{next(numbers)}")
                create(kube, namespace, names[-1], varied_spec(len(names)))
            edit(kube, namespace, rng.choice(names), {"autoscaling": None, **varied_spec(rng.randrange(100))})
            if round_number % 4 == 3:
                kube.delete(LLMServiceResource, names.pop(rng.randrange(len(names))), namespace=namespace)
            faults.kill_after_writes(operator.token, rng.randint(1, 12))
            if faults.killed.wait(rng.uniform(0.2, 1.0)):
                kills_mid_pass += 1
        finally:
            operator.kill()
    operator = start_operator(cluster)
    try:
        converged = wait_converged(kube, namespace, timeout=60)
    finally:
        operator.stop()
    assert operator.error is None
    figure(
        f"20 kills ({kills_mid_pass} after a random number of writes, the rest after a random delay), "
        f"{len(names)} LLMServices: converged {converged:.2f} s after the last restart, "
        f"{time.monotonic() - started:.1f} s in all; injected {faults.summary()}"
    )


def test_many_llmservices_created_at_once_converge_under_every_fault(
    cluster: Cluster,
    namespace: str,
    faults: FaultPlan,
    figure,  # type: ignore[no-untyped-def]
) -> None:
    """The light version of `make bench-faults` (200 LLMServices per fault kind there)."""
    faults.inject(*every_fault(watch_limit=20))
    clients = [cluster.client() for _ in range(4)]
    result = many_at_once(cluster, namespace, 40, faults, clients)
    assert faults.total() > 0
    figure(f"40 LLMServices at once under every fault: {result}")


def test_a_child_deleted_while_its_watch_expired_is_recreated_by_the_resync(
    cluster: Cluster,
    kube: Client,
    namespace: str,
    faults: FaultPlan,
    figure,  # type: ignore[no-untyped-def]
) -> None:
    """The deletion's event is lost to a 410; kopf lists again but keeps the Service in its index."""
    operator = start_operator(cluster, resync_seconds=1)
    try:
        create(kube, namespace, "bot", varied_spec(1))
        wait_converged(kube, namespace, timeout=30)
        faults.end_watches(WatchFault(rate=1.0, expire=True, limit=1))  # the next live event: the deletion
        kube.delete(Service, "bot", namespace=namespace)
        restored = wait_converged(kube, namespace, timeout=30)
        assert faults.summary() == {"watch-410 kopf": 1}
    finally:
        operator.stop()
    assert operator.error is None
    figure(
        f"Service deleted while its watch expired (410): recreated by the 1 s resync after {restored:.2f} s"
    )
