"""What both runs of `make bench-operator` create, what one run measured, and the table of the runs.

Requests are counted by Kubernetes verb and resource ("patch deployments", "patch llmservices/status"),
the audit log's terms; the emulator's calls are translated to them (operator_bench.emulator_verb).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

NAMESPACE = "bench"
# The no-op edit: a label on each Deployment that nobody owns; the operator's drift check compares only
# the fields it sets, so the pass it triggers must write nothing.
TOUCH_LABEL = "bench.llmservice.io/touched"
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
QUIET_SECONDS = 3.0  # no operator write for this long: its passes are over
# kopf's log line for a handler that raised (kopf/_core/actions/execution.py).
_FAILED = re.compile(
    r"Handler '(?:build_registry\.<locals>\.)?(?P<handler>[^']+)' failed (?P<how>.*?): (?P<error>.*)"
)


def manifest(index: int, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "serving.llmservice.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": f"svc-{index:03d}", "namespace": NAMESPACE},
        "spec": {
            "model": {"source": "hf://acme/llama", "revision": "main"},
            "adapters": [{"name": "support", "source": "hf://acme/support-lora"}],
            "gpus": gpus,
            "autoscaling": {"minReplicas": 1, "maxReplicas": 4},
        },
    }


def request_key(verb: str, resource: str, subresource: str = "") -> str:
    return f"{verb} {resource}{'/' + subresource if subresource else ''}"


def writes(counts: collections.Counter[str]) -> collections.Counter[str]:
    return collections.Counter({key: n for key, n in counts.items() if key.split()[0] in WRITE_VERBS and n})


def failures(log_lines: Iterable[str]) -> collections.Counter[str]:
    """Failed handlers in kopf's log, by handler, error and what kopf does next ("try again in 60 s")."""
    kinds: collections.Counter[str] = collections.Counter()
    for line in log_lines:
        found = _FAILED.search(line)
        if found:
            then = found["how"].split(" will ", 1)[-1]
            kinds[f"{found['handler']}: {found['error'][:40].strip()} ({then})"] += 1
    return kinds


@dataclass(frozen=True)
class Run:
    title: str
    count: int
    created_s: float  # the client's creates alone
    children_s: float  # from the first create until every LLMService has all its children
    ready_s: float | None  # ... until every one reports Ready=True (None: nothing runs pods)
    settled_s: float | None  # ... until no LLMService has a kopf retry pending either (None: not read)
    failed_passes: int  # passes that raised: kopf retries those, after 60 s unless told otherwise
    failures: collections.Counter[str]  # kopf's log of them (failures())
    requests: collections.Counter[str]  # the operator's, from the first create until it is quiet
    touch_passes: int  # passes the child edits triggered
    touch: collections.Counter[str]  # the operator's requests in those passes
    restart: collections.Counter[str]  # ... from a restart until it is quiet again
    peak_rss_mib: float | None  # VmHWM of the operator process; None where it shares a process
    cpu_s: float | None  # its CPU time up to its restart (start, creates, child-edit passes)
    restart_cpu_s: float | None  # the restarted process's, up to the end of its resume passes


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _writes_cell(counts: collections.Counter[str], count: int) -> str:
    total = writes(counts).total()
    return f"{total} ({total / count:.2f}/svc)"


def table(runs: list[Run]) -> str:
    """One column per run; per-verb rows are per LLMService, no-op writes are totals."""

    def row(label: str, cell: Callable[[Run], str]) -> tuple[str, list[str]]:
        return label, [cell(run) for run in runs]

    rows = [
        row("LLMServices", lambda run: str(run.count)),
        row("created by the client in (s)", lambda run: _number(run.created_s)),
        row("all children existed after (s)", lambda run: _number(run.children_s)),
        row("all Ready=True after (s)", lambda run: _number(run.ready_s)),
        row("no kopf retry pending after (s)", lambda run: _number(run.settled_s)),
        row("failed passes (kopf's log of them below)", lambda run: str(run.failed_passes)),
    ]
    for kind in sorted(set().union(*(run.failures for run in runs))):
        rows.append(row(f"  {kind}", lambda run, kind=kind: str(run.failures[kind])))
    rows.append(
        row("operator API requests per LLMService", lambda run: _number(run.requests.total() / run.count))
    )
    for key in sorted(set().union(*(run.requests for run in runs))):
        rows.append(row(f"  {key}", lambda run, key=key: _number(run.requests[key] / run.count)))
    rows.append(row("  writes", lambda run: _number(writes(run.requests).total() / run.count)))
    noop_passes: list[tuple[str, Callable[[Run], collections.Counter[str]]]] = [
        ("no-op pass, child edit", lambda run: run.touch),
        ("no-op resync, restart", lambda run: run.restart),
    ]
    for label, requests in noop_passes:
        rows.append(row(f"{label}: operator writes", lambda run, r=requests: _writes_cell(r(run), run.count)))
        for key in sorted(set().union(*(writes(requests(run)) for run in runs))):
            rows.append(row(f"  {key}", lambda run, r=requests, key=key: str(r(run)[key])))
        rows.append(row("  requests of all verbs", lambda run, r=requests: str(r(run).total())))
    rows += [
        row("child-edit passes run", lambda run: str(run.touch_passes)),
        row("operator peak RSS, VmHWM (MiB)", lambda run: _number(run.peak_rss_mib, 1)),
        row("operator CPU to restart (s)", lambda run: _number(run.cpu_s)),
        row("restarted operator's CPU, resume (s)", lambda run: _number(run.restart_cpu_s)),
    ]
    width = max(len(label) for label, _ in rows) + 2
    columns = [
        max(len(run.title), *(len(cells[index]) for _, cells in rows)) + 2 for index, run in enumerate(runs)
    ]

    def line(label: str, cells: list[str]) -> str:
        return label.ljust(width) + "".join(
            cell.rjust(column) for cell, column in zip(cells, columns, strict=True)
        )

    return "\n".join([line("", [run.title for run in runs]), *(line(label, cells) for label, cells in rows)])
