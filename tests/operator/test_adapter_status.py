"""What the pods say of their adapters, as status.adapters, AdaptersReady and events (pure functions)."""

from llmservice_operator.adapter_status import PodAdapters, adapter_events, adapters_condition, summarize
from llmservice_operator.adapter_sync import adapters_url, ready_pod_addresses

SPEC = [
    {"name": "sql", "source": "hf://acme/sql-lora", "revision": "v2"},
    {"name": "claim", "source": "pvc://loras/claim"},
]
WANTED = {
    "sql": {"source": "hf://acme/sql-lora", "revision": "v2"},
    "claim": {"source": "/mnt/pvc/loras/claim"},
}


def entry(name: str, state: str, reason: str | None = None, **source: str | None) -> dict:
    return {"name": name, **WANTED[name], "revision": None, **source, "state": state, "reason": reason}


def test_ready_when_every_ready_pod_serves_the_current_version() -> None:
    pods = [
        PodAdapters("a", [entry("sql", "Ready", revision="v2"), entry("claim", "Ready")]),
        PodAdapters("b", [entry("sql", "Ready", revision="v2"), entry("claim", "Loading")]),
    ]
    status = summarize(SPEC, WANTED, pods)
    assert status == [
        {"name": "sql", "source": "hf://acme/sql-lora", "revision": "v2", "state": "Ready", "readyPods": 2},
        {"name": "claim", "source": "pvc://loras/claim", "state": "Loading", "readyPods": 1},
    ]
    assert adapters_condition(status) == (
        False,
        "AdaptersLoading",
        "not yet served by every ready pod: claim",
    )


def test_an_old_version_on_a_pod_is_not_ready() -> None:
    pods = [PodAdapters("a", [entry("sql", "Ready", revision="v1"), entry("claim", "Ready")])]
    sql, claim = summarize(SPEC, WANTED, pods)
    assert (sql["state"], sql["readyPods"], sql["reason"]) == ("Pending", 0, "not loaded by every pod yet")
    assert claim["state"] == "Ready"


def test_a_failure_on_one_pod_fails_the_adapter_with_that_pods_reason() -> None:
    reason = "download failed: hf://acme/sql-lora was not found or is not accessible"
    pods = [
        PodAdapters("a", [entry("sql", "Ready", revision="v2"), entry("claim", "Ready")]),
        PodAdapters("b", [entry("sql", "Failed", reason, revision="v2"), entry("claim", "Ready")]),
    ]
    status = summarize(SPEC, WANTED, pods)
    assert status[0] == {
        "name": "sql",
        "source": "hf://acme/sql-lora",
        "revision": "v2",
        "state": "Failed",
        "reason": f"{reason} (pod b)",
        "readyPods": 1,
    }
    ready, why, message = adapters_condition(status)
    assert (ready, why) == (False, "AdapterFailed")
    assert message == f"1 of 2 adapters failed to load: sql: {reason} (pod b)"


def test_pending_says_why() -> None:
    assert summarize(SPEC, WANTED, [])[0]["reason"] == "no ready pod yet"
    unreachable = [PodAdapters("a", "the pod's adapter API could not be reached: ClientConnectorError")]
    assert summarize(SPEC, WANTED, unreachable)[1]["reason"] == unreachable[0].report
    assert adapters_condition([]) == (True, "NoAdapters", "the spec names no adapters")


def test_events_for_loaded_and_failed_adapters_once() -> None:
    loading = [{"name": "sql", "source": "hf://acme/sql-lora", "state": "Loading", "readyPods": 0}]
    ready = [{**loading[0], "state": "Ready", "readyPods": 2}]
    failed = [{**loading[0], "state": "Failed", "reason": "rank 128 is above this server's limit of 64"}]
    assert adapter_events([], loading) == []
    assert adapter_events(loading, ready) == [
        ("Normal", "AdapterLoaded", "adapter sql (hf://acme/sql-lora) is served by every ready pod")
    ]
    assert adapter_events(ready, ready) == []
    changed = [{**ready[0], "revision": "v3"}]
    assert adapter_events(ready, changed)[0][1] == "AdapterLoaded"  # a new version served
    assert adapter_events(loading, failed) == [
        (
            "Warning",
            "AdapterFailed",
            "adapter sql (hf://acme/sql-lora): rank 128 is above this server's limit of 64",
        )
    ]
    assert adapter_events(failed, failed) == []


def test_only_ready_pods_with_an_ip_are_called() -> None:
    def pod(name: str, ready: str, ip: str | None, deleting: bool = False) -> dict:
        status = {"conditions": [{"type": "Ready", "status": ready}]}
        if ip:
            status["podIP"] = ip
        return {"metadata": {"name": name, "deletionTimestamp": "t" if deleting else None}, "status": status}

    pods = [
        pod("a", "True", "10.0.0.1"),
        pod("b", "False", "10.0.0.2"),
        pod("c", "True", None),
        pod("d", "True", "10.0.0.4", deleting=True),
        pod("e", "True", "fd00::5"),
    ]
    assert ready_pod_addresses(pods) == {"a": "10.0.0.1", "e": "fd00::5"}
    assert adapters_url("fd00::5") == "http://[fd00::5]:8000/v1/adapters"
