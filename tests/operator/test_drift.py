"""Drift detection: what makes a pass write, and what must not."""

import copy

from llmservice_operator.constants import ANNOTATION_APPLIED_HASH
from llmservice_operator.drift import contains, needs_apply, with_applied_hash

DESIRED = with_applied_hash(
    {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bot", "labels": {"a": "1"}},
        "spec": {
            "replicas": 2,
            "template": {
                "spec": {
                    "containers": [
                        {"name": "server", "image": "llm:1", "resources": {"limits": {"cpu": "0.5"}}}
                    ],
                    "tolerations": [],
                    "hostNetwork": False,
                    "automountServiceAccountToken": False,
                }
            },
        },
    }
)


def live_copy() -> dict:
    """What an API server returns: our fields, defaults added, quantities canonical, zero values dropped."""
    live = copy.deepcopy(DESIRED)
    live["metadata"].update(uid="u", resourceVersion="7", managedFields=[])
    template = live["spec"]["template"]["spec"]
    template["containers"][0].update(
        imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log"
    )
    template["containers"][0]["resources"]["limits"]["cpu"] = "500m"
    del template["tolerations"], template["hostNetwork"]
    live["status"] = {"replicas": 2}
    return live


def test_applied_hash_is_stamped_and_stable() -> None:
    assert DESIRED["metadata"]["annotations"][ANNOTATION_APPLIED_HASH]
    assert (
        with_applied_hash(copy.deepcopy({**DESIRED, "metadata": {"name": "bot", "labels": {"a": "1"}}}))
        == DESIRED
    )


def test_server_defaults_and_canonical_quantities_are_not_drift() -> None:
    assert not needs_apply(DESIRED, live_copy())


def test_missing_child_needs_apply() -> None:
    assert needs_apply(DESIRED, None)


def test_hand_edits_are_drift() -> None:
    edited = live_copy()
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    assert needs_apply(DESIRED, edited)
    scaled = live_copy()
    scaled["spec"]["replicas"] = 5
    assert needs_apply(DESIRED, scaled)
    extra = live_copy()
    extra["spec"]["template"]["spec"]["containers"].append({"name": "sidecar"})
    assert needs_apply(DESIRED, extra)


def test_a_new_spec_is_drift_even_when_it_only_removes_fields() -> None:
    smaller = copy.deepcopy(DESIRED)
    del smaller["metadata"]["annotations"]
    del smaller["metadata"]["labels"]
    assert needs_apply(with_applied_hash(smaller), live_copy()), "the live object is a superset, but stale"


def test_contains_compares_quantities_by_value_only_where_both_are_quantities() -> None:
    assert contains({"memory": "1Gi"}, {"memory": "1024Mi"})
    assert not contains({"memory": "1Gi"}, {"memory": "1G"})
    assert not contains({"image": "llm:1"}, {"image": "llm:2"})
    assert not contains({"enabled": False}, {"enabled": True})


def test_ghosts_are_indexed_children_the_api_server_no_longer_has() -> None:
    from llmservice_operator.resync import find_ghosts

    indexed = {
        ("ml", "bot"): [{"metadata": {"name": "bot"}}],
        ("ml", "other"): [{"metadata": {"name": "other"}}],
        ("dev", "bot"): [{"metadata": {"name": "bot"}}],
    }
    live = {("ml", "other"), ("dev", "unrelated")}
    assert find_ghosts("Service", indexed, live) == {
        ("ml", "bot"): frozenset({("Service", "bot")}),
        ("dev", "bot"): frozenset({("Service", "bot")}),
    }
    assert find_ghosts("Service", indexed, {("ml", "bot"), ("ml", "other"), ("dev", "bot")}) == {}


def test_a_removed_protection_is_drift_though_its_value_was_false() -> None:
    """hostNetwork false is omitted by the server (a plain bool), but automountServiceAccountToken is a
    pointer: its false stays, so a live object without it had it removed by hand."""
    removed = live_copy()
    del removed["spec"]["template"]["spec"]["automountServiceAccountToken"]
    assert needs_apply(DESIRED, removed)
