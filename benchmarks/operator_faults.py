"""`make bench-faults`: the real operator against a kmock emulator that fails, with many LLMServices.

Scenarios, each in a fresh namespace with a fresh operator: COUNT LLMServices created at once (by 8
client threads), first with no faults (the baseline), then while the API server answers the operator
with 409 Conflict, 500, 429 (Retry-After 1 s), ends its watch streams with 410 Gone or drops them,
or does all of these at once; then the operator killed at a random point (after a random number of
its writes, or a random delay) and restarted KILLS times while LLMServices are created, edited and
deleted. Every scenario must end converged (tests/operator/harness.py: convergence_problems).

Prints per scenario: time until converged, injected faults (by kind, and whether kopf's request or
the operator's ChildWriter got it), the ChildWriter's retries, and passes that failed (and were
retried by kopf or the requeue).
"""

import argparse
import concurrent.futures
import itertools
import logging
import random
import time
import warnings
from typing import Any

from lightkube import Client

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
TIMEOUT = 300


def scenarios() -> dict[str, tuple[list[RequestFault], list[WatchFault]]]:
    return {
        "no faults (the baseline)": ([], []),
        "409 conflicts (20% of writes)": ([RequestFault(409, rate=0.2, methods=WRITE_METHODS)], []),
        "500 errors (10% of requests)": ([RequestFault(500, rate=0.1)], []),
        "429 throttling (10%, Retry-After 1 s)": ([RequestFault(429, rate=0.1, retry_after=1)], []),
        "410 expired watches (5% of events)": ([], [WatchFault(rate=0.05, expire=True, limit=100)]),
        "dropped watches (5% of events)": ([], [WatchFault(rate=0.05, expire=False, limit=100)]),
        "all of them": every_fault(watch_limit=50),
    }


def create_at_once(kube_clients: list[Client], namespace: str, count: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(kube_clients)) as pool:
        futures = [
            pool.submit(
                create,
                kube_clients[index % len(kube_clients)],
                namespace,
                f"svc-{index:03d}",
                varied_spec(index),
            )
            for index in range(count)
        ]
        for future in futures:
            future.result()


def many_at_once(
    cluster: Cluster, namespace: str, count: int, faults: FaultPlan, clients: list[Client]
) -> dict[str, Any]:
    operator = start_operator(cluster)
    try:
        started = time.monotonic()
        create_at_once(clients, namespace, count)
        converged = wait_converged(clients[0], namespace, timeout=TIMEOUT, started=started)
        return {"converged_s": converged, "faults": faults.summary(), **operator_retries(operator)}
    finally:
        operator.stop()


def kills_and_restarts(
    cluster: Cluster, namespace: str, count: int, kills: int, faults: FaultPlan, kube: Client
) -> dict[str, Any]:
    rng = random.Random(SEED)
    numbers = itertools.count()
    names: list[str] = []
    mid_pass = 0
    started = time.monotonic()
    per_round = max(1, count // kills)
    for round_number in range(kills):
        operator = start_operator(cluster)
        try:
            for _ in range(per_round):
                names.append(f"svc-{next(numbers):03d}")
                create(kube, namespace, names[-1], varied_spec(len(names)))
            edit(kube, namespace, rng.choice(names), {"autoscaling": None, **varied_spec(rng.randrange(100))})
            if round_number % 4 == 3:
                kube.delete(LLMServiceResource, names.pop(rng.randrange(len(names))), namespace=namespace)
            faults.kill_after_writes(operator.token, rng.randint(1, 4 * per_round))
            mid_pass += faults.killed.wait(rng.uniform(0.5, 3.0))
        finally:
            operator.kill()
    operator = start_operator(cluster)
    try:
        restarted = time.monotonic()
        converged = wait_converged(kube, namespace, timeout=TIMEOUT, started=restarted)
        return {
            "llmservices": len(names),
            "kills_after_random_writes": mid_pass,
            "converged_after_last_restart_s": converged,
            "total_s": time.monotonic() - started,
            "faults": faults.summary(),
            **operator_retries(operator),
        }
    finally:
        operator.stop()


def fresh_cluster(seed: int) -> tuple[Cluster, FaultPlan, list[Client]]:
    """One emulator per scenario: a cluster-wide operator would otherwise resume the earlier ones' work."""
    cluster = Cluster().start()
    assert cluster.emulator is not None
    plan = cluster.emulator.faults = FaultPlan(seed=seed)
    return cluster, plan, [cluster.client() for _ in range(8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200, help="LLMServices per scenario")
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the injected faults make kopf log a lot
    # A killed operator's coroutines are never awaited: that is the point of killing it.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)

    print(f"\nThe real operator, a kmock emulator injecting faults; {args.count} LLMServices created at once")
    for number, (name, (request_faults, watch_faults)) in enumerate(scenarios().items()):
        cluster, plan, clients = fresh_cluster(SEED + number)
        try:
            plan.inject(request_faults, watch_faults)
            result = many_at_once(cluster, "bench", args.count, plan, clients)
        finally:
            cluster.stop()
        print(f"  {name}")
        print(f"      converged in {result['converged_s']:6.2f} s")
        print(f"      injected faults {result['faults']}")
        print(
            f"      ChildWriter retries {result['api_retries']:.0f}, "
            f"failed passes (retried later) {result['failed_passes']:.0f}"
        )
    cluster, plan, clients = fresh_cluster(SEED)
    try:
        plan.fail_requests(RequestFault(500, rate=0.05))
        result = kills_and_restarts(cluster, "bench", args.count, args.kills, plan, clients[0])
    finally:
        cluster.stop()
    print(f"  operator killed {args.kills} times at random points and restarted (5% 500s throughout)")
    print(
        f"      {result['llmservices']} LLMServices, {result['kills_after_random_writes']} kills "
        f"after a random number of writes (the rest after a random delay)"
    )
    print(
        f"      converged {result['converged_after_last_restart_s']:.2f} s after the last restart, "
        f"{result['total_s']:.1f} s in all"
    )
    print(f"      injected faults {result['faults']}")
    print(
        f"      last operator: ChildWriter retries {result['api_retries']:.0f}, "
        f"failed passes {result['failed_passes']:.0f}"
    )


if __name__ == "__main__":
    main()
