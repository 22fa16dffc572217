"""The operator lists and watches only its own objects, as the API server's audit log of its requests shows.

kopf's `labels=` filters what it has already received: without a label selector on the request itself, the
operator would receive, decode and index every pod and ConfigMap in the cluster. Lists come in pages
(`limit`), so that a start-up in a large cluster never asks for one huge response.
"""

from __future__ import annotations

import time
import urllib.parse

import pytest

from controlplane.cluster import Cluster
from llmservice_operator.handlers import CHILD_RESOURCES, POD_RESOURCE
from tests.cluster.conftest import Kube, llmservice
from tests.operator.harness import eventually

# What the operator owns: its managed-by value, and an instance (the owning LLMService's name).
OWNED_SELECTOR = {"app.kubernetes.io/managed-by=llmservice-operator", "app.kubernetes.io/instance"}
SELECTED = tuple(plural for _, _, plural in [*CHILD_RESOURCES.values(), POD_RESOURCE])


def resource(event: dict) -> str | None:
    return (event.get("objectRef") or {}).get("resource")


def lists_and_watches(cluster: Cluster, since: int = 0) -> list[dict]:
    return [
        event
        for event in cluster.operator_requests()[since:]
        if event["verb"] in {"list", "watch"} and resource(event) in SELECTED
    ]


def unselected(events: list[dict]) -> list[str]:
    """Lists and watches without the operator's selector, and lists without a page size."""
    problems = []
    for event in events:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(event["requestURI"]).query)
        selectors = query.get("labelSelector", [])
        if len(selectors) != 1 or set(selectors[0].split(",")) != OWNED_SELECTOR:
            problems.append(f"{event['verb']} {event['requestURI']}: labelSelector {selectors}")
        elif event["verb"] == "list" and not query.get("limit"):
            problems.append(f"list {event['requestURI']}: no limit")
    return problems


def restart_operator(cluster: Cluster) -> None:
    cluster.stop_process("operator")
    cluster.start_operator()


def test_every_list_and_watch_of_children_and_pods_selects_the_operators_own(cluster: Cluster) -> None:
    def each_listed_and_watched() -> bool:
        seen = {(event["verb"], resource(event)) for event in lists_and_watches(cluster)}
        return all((verb, kind) in seen for verb in ("list", "watch") for kind in SELECTED)

    eventually(each_listed_and_watched, timeout=30, interval=0.2)
    events = lists_and_watches(cluster)
    assert unselected(events) == [], f"of {len(events)} lists and watches"


def test_the_resyncs_lists_are_selected_and_paged_too(kube: Kube, monkeypatch: pytest.MonkeyPatch) -> None:
    """The periodic resync lists children of its own (every 300 s by default; every second here)."""
    kube.apply(llmservice("bot", gpus=0))
    eventually(lambda: kube.get("deployment", "bot") is not None, timeout=30)
    since = len(kube.cluster.operator_requests())
    try:
        with monkeypatch.context() as patched:
            patched.setenv("LLMSERVICE_RESYNC_SECONDS", "1")
            restart_operator(kube.cluster)

        def resync_lists() -> list[dict]:
            """Once it has listed each kind of child the LLMService has."""
            events = [
                event
                for event in lists_and_watches(kube.cluster, since)
                if event["objectRef"].get("namespace") == kube.namespace
            ]
            listed = {resource(event) for event in events}
            return events if {"configmaps", "services", "deployments"} <= listed else []

        events = eventually(resync_lists, timeout=15, interval=0.2)
    finally:
        restart_operator(kube.cluster)  # the session's operator again, with the default period
    assert unselected(events) == [], f"of {len(events)} resync lists"


def test_objects_without_the_operators_labels_draw_no_request(kube: Kube) -> None:
    """A Helm release's ConfigMap and pod, labelled with the same instance as an LLMService beside them,
    and a ConfigMap without labels: created, edited and deleted while the operator serves that LLMService."""
    helm = {
        "app.kubernetes.io/name": "web",
        "app.kubernetes.io/instance": "bot",
        "app.kubernetes.io/managed-by": "Helm",
    }
    strays = {("configmaps", "web"), ("configmaps", "bare"), ("pods", "web")}
    since = len(kube.cluster.operator_requests())
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web", "labels": helm}})
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bare"}})
    container = {"name": "web", "image": "registry.invalid/web:1.0.0"}
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "labels": helm},
            "spec": {"containers": [container]},
        }
    )
    for kind, name in strays:
        kube.run("label", kind, name, "edited=yes")
    # The LLMService's children come after the strays on the same watch streams: it being served shows
    # that the operator's watches had their chance to deliver them.
    kube.apply(llmservice("bot", gpus=0))
    kube.run("wait", "llms/bot", "--for=condition=Ready", "--timeout=30s")
    kube.run("delete", "configmap", "web", "bare")
    kube.run("delete", "pod", "web", "--wait=true", "--timeout=30s")
    time.sleep(2)  # time for a request the deletions would draw

    named = [
        (resource(event), event["objectRef"].get("name"), event["verb"])
        for event in kube.cluster.operator_requests()[since:]
        if (event.get("objectRef") or {}).get("namespace") == kube.namespace
    ]
    assert ("deployments", "bot", "patch") in named, named
    assert [request for request in named if request[:2] in strays] == [], named
