"""Pure: what the ready pods say of their adapters, turned into status.adapters, the AdaptersReady
condition and an event per adapter loaded or failed.

A pod's report is what its PUT /v1/adapters answered (one entry per adapter: source, revision, state,
reason), or the text of why it could not be asked. An adapter is Ready when every ready pod serves its
current source and revision, Failed when a pod could not load it (with that pod's reason), Loading while
a pod loads it and Pending until a pod has been asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Report = list[dict[str, Any]] | str  # the pod's adapter states, or why it could not be asked


@dataclass(frozen=True)
class PodAdapters:
    """The adapters one ready pod reported in the latest sync."""

    pod: str
    report: Report


def _pod_state(report: Report, name: str, wanted: dict[str, str]) -> tuple[str, str | None]:
    if isinstance(report, str):
        return "Pending", report
    entry = next((item for item in report if item.get("name") == name), None)
    if (
        entry is None
        or entry.get("source") != wanted["source"]
        or entry.get("revision") != wanted.get("revision")
    ):
        return "Pending", None  # not given this version yet
    return entry.get("state", "Pending"), entry.get("reason")


def summarize(
    spec_adapters: list[dict[str, Any]], wanted: dict[str, dict[str, str]], pods: list[PodAdapters]
) -> list[dict[str, Any]]:
    """status.adapters: `spec_adapters` as written in the spec (name, source, revision), `wanted` the same
    as the pods are given them (pvc:// as the mounted path)."""
    entries = []
    for adapter in spec_adapters:
        name = adapter["name"]
        states = [(pod.pod, *_pod_state(pod.report, name, wanted[name])) for pod in pods]
        ready = sum(1 for _, state, _ in states if state == "Ready")
        failed = [(pod, reason) for pod, state, reason in states if state == "Failed"]
        entry: dict[str, Any] = {"name": name, "source": adapter["source"]}
        if adapter.get("revision"):
            entry["revision"] = adapter["revision"]
        if failed:
            pod, reason = failed[0]
            entry.update(state="Failed", reason=f"{reason} (pod {pod})")
        elif states and ready == len(states):
            entry["state"] = "Ready"
        elif any(state == "Loading" for _, state, _ in states):
            entry["state"] = "Loading"
        else:
            entry["state"] = "Pending"
            unreachable = next((reason for _, state, reason in states if reason), None)
            entry["reason"] = (
                unreachable
                if unreachable
                else "no ready pod yet"
                if not states
                else "not loaded by every pod yet"
            )
        entry["readyPods"] = ready
        entries.append(entry)
    return entries


def adapters_condition(adapters: list[dict[str, Any]]) -> tuple[bool, str, str]:
    """(status, reason, message) of AdaptersReady."""
    if not adapters:
        return True, "NoAdapters", "the spec names no adapters"
    failed = [item for item in adapters if item["state"] == "Failed"]
    if failed:
        details = "; ".join(f"{item['name']}: {item['reason']}" for item in failed)
        return False, "AdapterFailed", f"{len(failed)} of {len(adapters)} adapters failed to load: {details}"
    waiting = [item["name"] for item in adapters if item["state"] != "Ready"]
    if waiting:
        return False, "AdaptersLoading", f"not yet served by every ready pod: {', '.join(waiting)}"
    return True, "AllReady", f"every ready pod serves all {len(adapters)} adapters"


def adapter_events(
    previous: list[dict[str, Any]], current: list[dict[str, Any]]
) -> list[tuple[str, str, str]]:
    """(type, reason, message) for each adapter that became Ready or Failed (or failed anew)."""
    before = {item["name"]: item for item in previous}
    events = []
    for item in current:
        old = before.get(item["name"], {})
        same_version = old.get("source") == item["source"] and old.get("revision") == item.get("revision")
        if item["state"] == old.get("state") and same_version and item.get("reason") == old.get("reason"):
            continue
        version = item["source"] + (f"@{item['revision']}" if item.get("revision") else "")
        if item["state"] == "Ready" and (old.get("state") != "Ready" or not same_version):
            events.append(
                (
                    "Normal",
                    "AdapterLoaded",
                    f"adapter {item['name']} ({version}) is served by every ready pod",
                )
            )
        elif item["state"] == "Failed":
            events.append(
                ("Warning", "AdapterFailed", f"adapter {item['name']} ({version}): {item['reason']}")
            )
    return events
