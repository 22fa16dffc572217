"""The real-control-plane run of `make bench-operator`: controlplane/'s loopback cluster (etcd,
kube-apiserver, controller manager, scheduler, kwok), the operator as a process of its own with the chart's
ServiceAccount. Requests are the API server's audit log of that ServiceAccount; memory and CPU are read
from /proc of the operator's process.

The LLMServices ask for no GPU, so their pods run on CPU nodes, at the operator's default request of 1 CPU:
cpu-0 holds 16 of them, so the run adds kwok nodes of its own, 110 pods each (a kubelet's default maxPods),
until every pod fits. The no-op passes start once every LLMService is Ready and none has a kopf retry
pending: a pass that failed (a request timing out under load) is retried by kopf 60 s later, and that
retry's writes are not a no-op pass's.

Then the operator's memory beside objects that are not its own: RSS after a restart with none, then after
a restart with `unrelated` pods and as many ConfigMaps in a namespace of their own. The pods name a
scheduler that does not exist, so they stay Pending and nothing acts on them: kwok runs only pods bound to
its nodes, and the pod garbage collector leaves unscheduled pods alone (pods bound to a node that does not
exist it deletes, so a made-up nodeName would not keep them). Their labels are a Helm release's, with
app.kubernetes.io/instance among them: only the managed-by half of the operator's selector excludes them.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.operator_bench_common import (
    NAMESPACE,
    QUIET_SECONDS,
    TOUCH_LABEL,
    WRITE_VERBS,
    Run,
    failures,
    manifest,
    request_key,
    writes,
)
from controlplane.cluster import Cluster
from llmservice_operator.handlers import CHILD_RESOURCES, POD_RESOURCE
from tests.operator.harness import eventually

LLMSERVICES = "/apis/serving.llmservice.io/v1alpha1"
UNRELATED_NAMESPACE = "unrelated"
PODS_PER_NODE = 110
CPU_NODE_CAPACITY = {"cpu": "128", "memory": "512Gi", "ephemeral-storage": "8Ti", "pods": str(PODS_PER_NODE)}
# What the operator lists and watches: its LLMServices, their children and their pods.
LISTED = ("llmservices", *(plural for _, _, plural in [*CHILD_RESOURCES.values(), POD_RESOURCE]))
# kopf's annotations on an LLMService (handlers.py gives them this prefix): its marker and the diff base
# stay; any other is a handler's progress, there while a failed pass awaits its retry.
KOPF_PREFIX = "serving.llmservice.io/"
KOPF_KEPT = {f"{KOPF_PREFIX}kopf-managed", f"{KOPF_PREFIX}last-handled-configuration"}
TIMEOUT = 300.0
CREATE_CONCURRENCY = 32


@dataclass(frozen=True)
class Figures:
    """One reading of the operator's process."""

    rss_mib: float
    hwm_mib: float
    cpu_s: float


def read_process(pid: int) -> Figures:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    # utime and stime are fields 14 and 15 of stat, counted after the parenthesized command name (field 2).
    ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
    return Figures(
        rss_mib=int(status["VmRSS"].split()[0]) / 1024,
        hwm_mib=int(status["VmHWM"].split()[0]) / 1024,
        cpu_s=sum(int(tick) for tick in ticks) / os.sysconf("SC_CLK_TCK"),
    )


def steady_state(pid: int, samples: int = 5, interval: float = 0.5) -> Figures:
    """The median RSS of a few readings; the peak and CPU time as of the last."""
    readings = []
    for _ in range(samples):
        readings.append(read_process(pid))
        time.sleep(interval)
    last = readings[-1]
    return Figures(statistics.median(r.rss_mib for r in readings), last.hwm_mib, last.cpu_s)


def by_verb(events: list[dict]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for event in events:
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", "(discovery)")
        counts[request_key(event["verb"], resource, ref.get("subresource", ""))] += 1
    return counts


def helm_labels(index: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "web",
        "app.kubernetes.io/instance": f"web-{index % 50}",
        "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": "web-1.0.0",
    }


def unrelated_pod(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"web-{index:05d}", "labels": helm_labels(index)},
        "spec": {
            "schedulerName": "no-such-scheduler",
            "containers": [
                {
                    "name": "web",
                    "image": "registry.invalid/web:1.0.0",
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "env": [{"name": f"WEB_SETTING_{n}", "value": f"value-{index}-{n}"} for n in range(8)],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                }
            ],
        },
    }


def unrelated_configmap(index: int) -> dict[str, Any]:
    settings = "\n".join(f"setting_{n:03d}: value-{index}-{n}" for n in range(100))  # about 2.5 KiB
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"web-{index:05d}", "labels": helm_labels(index)},
        "data": {"settings.yaml": settings},
    }


@dataclass(frozen=True)
class Memory:
    """The operator restarted beside none, then beside `unrelated` pods and as many ConfigMaps."""

    unrelated: int
    created_s: float
    without: Figures
    beside: Figures
    restart_writes: collections.Counter[str]  # the operator's, in the restart beside them
    requests_there: int  # the operator's requests that name the unrelated objects' namespace
    listed: dict[str, list[int]]  # objects in each list response of that restart, by resource
    in_cluster: dict[str, int]

    def report(self) -> str:
        rows = [
            ("VmRSS, steady (MiB)", self.without.rss_mib, self.beside.rss_mib),
            ("VmHWM, peak (MiB)", self.without.hwm_mib, self.beside.hwm_mib),
        ]
        lines = [
            f"Real control plane: the operator restarted beside {self.unrelated} unrelated pods (Pending, no "
            f"scheduler) and {self.unrelated} ConfigMaps (created in {self.created_s:.1f} s), vs beside none",
            f"  {'':<24}{'none':>10}{'beside':>10}{'ratio':>8}   (goal: ratio <= 1.10)",
        ]
        lines += [f"  {label:<24}{a:>10.1f}{b:>10.1f}{b / a:>8.3f}" for label, a, b in rows]
        listed = ", ".join(
            f"{resource} {'+'.join(map(str, counts))}" for resource, counts in sorted(self.listed.items())
        )
        held = ", ".join(f"{n} {resource}" for resource, n in sorted(self.in_cluster.items()))
        lines += [
            f"  objects in each of its list responses (replayed as admin): {listed}",
            f"  (the cluster holds {held})",
            f"  its requests naming namespace {UNRELATED_NAMESPACE}: {self.requests_there}; "
            f"writes in that restart: {writes(self.restart_writes).total()}",
        ]
        return "\n".join(lines)


class Bench:
    def __init__(self, cluster: Cluster, count: int) -> None:
        self.cluster = cluster
        self.count = count
        pki = cluster.layout.pki
        # The admin's client certificate (system:masters). In an SSL context: httpx 0.28 sends no client
        # certificate given as `cert=` beside a `verify=` path, and the API server sees system:anonymous.
        tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        tls.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._options: dict[str, Any] = {"base_url": cluster.layout.server, "verify": tls, "timeout": 60.0}
        self.admin = httpx.Client(**self._options)

    def close(self) -> None:
        self.admin.close()

    # -- the operator, as the API server and /proc see it -------------------------------------------

    def mark(self) -> int:
        return len(self.cluster.operator_requests())

    def quiet(self, mark: int) -> list[dict]:
        """The operator's requests since `mark`, once it has written nothing for QUIET_SECONDS."""
        deadline = time.monotonic() + TIMEOUT
        last, since = -1, time.monotonic()
        while True:
            events = self.cluster.operator_requests()[mark:]
            written = sum(1 for event in events if event["verb"] in WRITE_VERBS)
            now = time.monotonic()
            if written != last:
                last, since = written, now
            elif now - since >= QUIET_SECONDS:
                return events
            if now > deadline:
                raise TimeoutError(f"the operator kept writing for {TIMEOUT:.0f} s")
            time.sleep(0.5)

    def passes(self) -> collections.Counter[tuple[str, str]]:
        """The running operator's passes so far, by (trigger, result); none while it starts."""
        passes: collections.Counter[tuple[str, str]] = collections.Counter()
        try:
            text = httpx.get(self.cluster.operator_metrics_url(), timeout=5.0).text
        except httpx.HTTPError:
            return passes
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "llmservice_operator_reconciles_total":
                    passes[(sample.labels["trigger"], sample.labels["result"])] += int(sample.value)
        return passes

    def reconciles(self, trigger: str) -> int:
        """Passes run for `trigger`, whatever their result (the failed ones are counted apart)."""
        return sum(n for (passed_for, _), n in self.passes().items() if passed_for == trigger)

    def operator_log(self) -> list[str]:
        """Every operator process's log so far (they append to one file)."""
        return (self.cluster.layout.logs / "operator.log").read_text(errors="replace").splitlines()

    def pid(self) -> int:
        pid = self.cluster.pid("operator")
        assert pid is not None, "the operator is not running"
        return pid

    def restart(self) -> tuple[list[dict], Figures]:
        """Restarts the operator; returns its requests until its resume passes are over, and its figures."""
        mark = self.mark()
        self.cluster.stop_process("operator")
        self.cluster.start_operator()
        eventually(lambda: self.reconciles("change") >= self.count, timeout=TIMEOUT, interval=0.5)

        def listed_all() -> bool:
            listed = {
                (event.get("objectRef") or {}).get("resource")
                for event in self.cluster.operator_requests()[mark:]
                if event["verb"] == "list"
            }
            return set(LISTED) <= listed

        eventually(listed_all, timeout=TIMEOUT, interval=0.5)
        events = self.quiet(mark)
        return events, steady_state(self.pid())

    # -- the cluster, as the admin ------------------------------------------------------------------

    def create(self, path: str, body: dict[str, Any]) -> None:
        self.admin.post(path, json=body).raise_for_status()

    def namespace(self, name: str) -> None:
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        self.create("/api/v1/namespaces", body)
        # Pods are refused until the namespace's default ServiceAccount exists.
        eventually(
            lambda: self.admin.get(f"/api/v1/namespaces/{name}/serviceaccounts/default").status_code == 200,
            timeout=60,
            interval=0.2,
        )

    def add_cpu_nodes(self, pods: int) -> None:
        names = [f"bench-cpu-{index}" for index in range(math.ceil(pods / PODS_PER_NODE))]
        for name in names:
            labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok"}
            metadata = {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"}, "labels": labels}
            status = {"capacity": CPU_NODE_CAPACITY, "allocatable": CPU_NODE_CAPACITY}
            self.create(
                "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": metadata, "status": status}
            )
        nodes = [f"node/{name}" for name in names]
        self.cluster.kubectl("wait", "--for=condition=Ready", *nodes, "--timeout=60s")

    def progress(self) -> tuple[int, int]:
        """(LLMServices with all their children, LLMServices Ready=True); the PDB is applied last."""
        budgets = self.admin.get(f"/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets").json()
        services = self.admin.get(f"{LLMSERVICES}/namespaces/{NAMESPACE}/llmservices").json()
        ready = sum(
            1
            for item in services["items"]
            if any(
                condition["type"] == "Ready" and condition["status"] == "True"
                for condition in (item.get("status") or {}).get("conditions", [])
            )
        )
        return len(budgets["items"]), ready

    def retries_pending(self) -> int:
        """LLMServices with a handler's progress in kopf's annotations: a failed pass it will retry."""
        services = self.admin.get(f"{LLMSERVICES}/namespaces/{NAMESPACE}/llmservices").json()
        return sum(
            1
            for item in services["items"]
            if any(
                key.startswith(KOPF_PREFIX) and key not in KOPF_KEPT
                for key in item["metadata"].get("annotations") or {}
            )
        )

    def total(self, path: str) -> int:
        body = self.admin.get(path, params={"limit": 1}).json()
        return len(body["items"]) + body["metadata"].get("remainingItemCount", 0)

    async def _create_all(self, bodies: Iterator[tuple[str, dict[str, Any]]]) -> None:
        limits = httpx.Limits(max_connections=CREATE_CONCURRENCY)
        async with httpx.AsyncClient(**self._options, limits=limits) as client:
            slots = asyncio.Semaphore(CREATE_CONCURRENCY)

            async def create(path: str, body: dict[str, Any]) -> None:
                async with slots:
                    (await client.post(path, json=body)).raise_for_status()

            await asyncio.gather(*(create(path, body) for path, body in bodies))

    def create_unrelated(self, count: int) -> float:
        started = time.perf_counter()
        self.namespace(UNRELATED_NAMESPACE)
        base = f"/api/v1/namespaces/{UNRELATED_NAMESPACE}"

        def bodies() -> Iterator[tuple[str, dict[str, Any]]]:
            for index in range(count):
                yield f"{base}/pods", unrelated_pod(index)
                yield f"{base}/configmaps", unrelated_configmap(index)

        asyncio.run(self._create_all(bodies()))
        return time.perf_counter() - started

    # -- the run ------------------------------------------------------------------------------------

    def run(self, unrelated: int) -> tuple[Run, Memory]:
        count = self.count
        self.add_cpu_nodes(count)
        self.namespace(NAMESPACE)

        mark = self.mark()
        started = time.perf_counter()
        for index in range(count):
            self.create(f"{LLMSERVICES}/namespaces/{NAMESPACE}/llmservices", manifest(index, gpus=0))
        created = time.perf_counter() - started
        children_s = None
        deadline = time.monotonic() + TIMEOUT
        while True:
            with_children, ready = self.progress()
            if children_s is None and with_children >= count:
                children_s = time.perf_counter() - started
            if ready >= count:
                ready_s = time.perf_counter() - started
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ready} of {count} LLMServices Ready after {TIMEOUT:.0f} s")
            time.sleep(0.2)
        assert children_s is not None
        # A no-op pass starts from a settled state: kopf's retries of failed passes (60 s later by default)
        # would write to the LLMServices during it.
        eventually(lambda: self.retries_pending() == 0, timeout=TIMEOUT, interval=0.5)
        settled_s = time.perf_counter() - started
        creation = by_verb(self.quiet(mark))

        # No-op pass 1: a label on every Deployment; each event runs its owner's pass.
        mark = self.mark()
        passes_before = self.reconciles("child")
        for index in range(count):
            self.admin.patch(
                f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/svc-{index:03d}",
                json={"metadata": {"labels": {TOUCH_LABEL: "1"}}},
                headers={"Content-Type": "application/merge-patch+json"},
            ).raise_for_status()
        eventually(lambda: self.reconciles("child") >= passes_before + count, timeout=TIMEOUT, interval=0.5)
        touch = by_verb(self.quiet(mark))
        touch_passes = self.reconciles("child") - passes_before
        failed = sum(n for (_, result), n in self.passes().items() if result == "error")
        failed_kinds = failures(self.operator_log())
        first = read_process(self.pid())

        # No-op pass 2: a restart (kopf resumes every LLMService); also the memory beside nothing unrelated.
        restart_events, without = self.restart()

        created_unrelated = self.create_unrelated(unrelated)
        mark = self.mark()
        beside_events, beside = self.restart()
        listed: dict[str, list[int]] = collections.defaultdict(list)
        for event in beside_events:
            resource = (event.get("objectRef") or {}).get("resource")
            if event["verb"] == "list" and resource in LISTED:
                listed[resource].append(len(self.admin.get(event["requestURI"]).json()["items"]))
        memory = Memory(
            unrelated=unrelated,
            created_s=created_unrelated,
            without=without,
            beside=beside,
            restart_writes=by_verb(beside_events),
            requests_there=sum(
                1
                for event in self.cluster.operator_requests()[mark:]
                if (event.get("objectRef") or {}).get("namespace") == UNRELATED_NAMESPACE
            ),
            listed=dict(listed),
            in_cluster={"pods": self.total("/api/v1/pods"), "configmaps": self.total("/api/v1/configmaps")},
        )
        run = Run(
            title="real control plane",
            count=count,
            created_s=created,
            children_s=children_s,
            ready_s=ready_s,
            settled_s=settled_s,
            failed_passes=failed,
            failures=failed_kinds,
            requests=creation,
            touch_passes=touch_passes,
            touch=touch,
            restart=by_verb(restart_events),
            peak_rss_mib=first.hwm_mib,
            cpu_s=first.cpu_s,
            restart_cpu_s=without.cpu_s,
        )
        return run, memory


def run(count: int, unrelated: int) -> tuple[Run, Memory]:
    """Starts a cluster in a temporary directory, runs the bench on it, and stops it, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="operator-bench-") as directory:
        cluster = Cluster(Path(directory) / "state", outlive_caller=False)
        cluster.up()
        bench = Bench(cluster, count)
        try:
            return bench.run(unrelated)
        except BaseException:
            print("the operator's log, last lines:", *bench.operator_log()[-40:], sep="\n", file=sys.stderr)
            raise
        finally:
            bench.close()
            cluster.down()
