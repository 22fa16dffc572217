"""The rendered RBAC allows every API call the operator makes, and nothing it does not make.

The real operator runs against the emulator through a scenario that takes every code path that calls
the API (create, drift repair, child deletion, autoscaling and the NetworkPolicy on and off, status,
events); the emulator logs each call with its user agent, and the test's own calls are told apart by
theirs.
"""

import time
from typing import Any

import httpx
import pytest

from tests.charts.rendering import OPERATOR_CHART, of_kind, render
from tests.operator.emulator import Call
from tests.operator.harness import Cluster, eventually, running_operator

TEST_AGENT = "rbac-test"
VERBS = {"FETCH": "get", "LIST": "list", "WATCH": "watch", "CREATE": "create", "DELETE": "delete"}
LLMS = "/apis/serving.llmservice.io/v1alpha1/namespaces/rbac/llmservices"
NETWORK_POLICY = "/apis/networking.k8s.io/v1/namespaces/rbac/networkpolicies/bot"
# Not calls: the OwnerReferencesPermissionEnforcement admission plugin (on by default in OpenShift) lets a
# child's owner reference set blockOwnerDeletion only for those who may update the owner's finalizers.
ADMISSION_ONLY = {("serving.llmservice.io", "llmservices/finalizers", "update")}
READY_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "bot-5c9d-x2x7q",
        "labels": {
            "app.kubernetes.io/instance": "bot",
            "app.kubernetes.io/managed-by": "llmservice-operator",
        },
    },
    "spec": {"containers": [{"name": "server", "image": "llm"}]},
    # Nothing listens there: the call fails, after the key was read.
    "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
}


def verb(call: Call) -> str:
    if call.action == "UPDATE":
        return "patch" if call.method == "PATCH" else "update"
    return VERBS[call.action]


def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, rule_verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for rule_verb in rule["verbs"]
    }


@pytest.fixture(scope="module")
def operator_calls() -> set[tuple[str, str, str]]:
    cluster = Cluster().start()
    try:
        with (
            running_operator(cluster),
            httpx.Client(base_url=cluster.url, headers={"User-Agent": TEST_AGENT}) as api,
        ):

            def exists(path: str) -> bool:
                return api.get(path).status_code == 200

            spec = {
                "model": {"source": "hf://acme/llama"},
                "autoscaling": {"maxReplicas": 3},
                "networkPolicy": {"enabled": True, "ingressFrom": [{"podSelector": {}}]},
            }
            api.post(
                LLMS,
                json={
                    "apiVersion": "serving.llmservice.io/v1alpha1",
                    "kind": "LLMService",
                    "metadata": {"name": "bot", "namespace": "rbac"},
                    "spec": spec,
                },
            ).raise_for_status()
            eventually(lambda: exists("/apis/policy/v1/namespaces/rbac/poddisruptionbudgets/bot"))
            eventually(lambda: exists(NETWORK_POLICY))
            # A ready pod and the API key: the operator reads the key to set the pod's adapters.
            api.post(
                "/api/v1/namespaces/rbac/secrets",
                json={
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "bot-key"},
                    "stringData": {"api-key": "k"},
                },
            ).raise_for_status()
            api.post("/api/v1/namespaces/rbac/pods", json=READY_POD).raise_for_status()
            api.patch(
                "/api/v1/namespaces/rbac/pods/bot-5c9d-x2x7q/status",
                json={"status": READY_POD["status"]},
                headers={"Content-Type": "application/merge-patch+json"},
            ).raise_for_status()
            api.patch(
                f"{LLMS}/bot",
                json={"spec": {"apiKeySecretRef": {"name": "bot-key"}}},
                headers={"Content-Type": "application/merge-patch+json"},
            ).raise_for_status()
            assert cluster.emulator is not None
            eventually(
                lambda: any(
                    call.plural == "secrets" and call.user_agent != TEST_AGENT
                    for call in cluster.emulator.log
                )
            )
            api.delete(
                "/api/v1/namespaces/rbac/services/bot"
            ).raise_for_status()  # restored after an owner check
            eventually(lambda: exists("/api/v1/namespaces/rbac/services/bot"))
            api.patch(
                f"{LLMS}/bot",
                json={"spec": {"autoscaling": None, "replicas": 1, "networkPolicy": {"enabled": False}}},
                headers={"Content-Type": "application/merge-patch+json"},
            ).raise_for_status()
            eventually(
                lambda: not exists("/apis/autoscaling/v2/namespaces/rbac/horizontalpodautoscalers/bot")
            )
            eventually(lambda: not exists("/apis/policy/v1/namespaces/rbac/poddisruptionbudgets/bot"))
            eventually(lambda: not exists(NETWORK_POLICY))
            time.sleep(0.5)
        assert cluster.emulator is not None
        return {
            (call.group, call.plural + (f"/{call.subresource}" if call.subresource else ""), verb(call))
            for call in cluster.emulator.log
            if call.user_agent != TEST_AGENT and call.plural
        }
    finally:
        cluster.stop()


@pytest.mark.parametrize("values", [{}, {"watch": {"namespaces": ["rbac"]}}], ids=["cluster", "namespaced"])
def test_rbac_allows_every_call_the_operator_makes(
    operator_calls: set[tuple[str, str, str]], values: dict[str, Any]
) -> None:
    documents = render(OPERATOR_CHART, values)
    rules = [
        rule
        for role in of_kind(documents, "ClusterRole") + of_kind(documents, "Role")
        for rule in role["rules"]
    ]
    allowed = granted(rules)
    # The emulator test ran all namespaces; namespaced mode also needs the namespaces watch kopf makes then.
    assert sorted(operator_calls - allowed) == []


def test_application_rules_grant_nothing_unused(operator_calls: set[tuple[str, str, str]]) -> None:
    documents = render(OPERATOR_CHART, {})
    (application,) = [
        role
        for role in of_kind(documents, "ClusterRole")
        if not role["metadata"]["name"].endswith("-framework")
    ]
    assert sorted(granted(application["rules"]) - operator_calls - ADMISSION_ONLY) == []
    assert granted(application["rules"]) >= ADMISSION_ONLY
    for rule in application["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]


def test_framework_rules_are_what_kopf_uses(operator_calls: set[tuple[str, str, str]]) -> None:
    (framework,) = [
        role
        for role in of_kind(render(OPERATOR_CHART, {}), "ClusterRole")
        if role["metadata"]["name"].endswith("-framework")
    ]
    assert granted(framework["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    assert granted(framework["rules"]) <= operator_calls
