"""The optional NetworkPolicy: ingress to the model pods' HTTP port only from the listed peers."""

from typing import Any

from llmservice_operator.builders.common import metadata, selector_labels
from llmservice_operator.constants import SERVER_PORT
from llmservice_operator.spec import LLMService


def wants_network_policy(svc: LLMService) -> bool:
    return svc.spec.network_policy.enabled


def build_network_policy(svc: LLMService, operator_namespace: str | None = None) -> dict[str, Any]:
    # The spec guarantees peers when enabled: a rule without `from` would admit everyone.
    peers: list[dict[str, Any]] = [
        peer.model_dump(by_alias=True, exclude_defaults=True) for peer in svc.spec.network_policy.ingress_from
    ]
    if operator_namespace and svc.spec.task == "generate":
        # The operator sets each pod's adapters through its API (adapter_sync.py).
        peers.append(
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}}}
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(svc),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(svc)},
            # Ingress only: egress stays open, init containers download weights from the hub.
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    # Unset selectors and empty lists left out; an empty selector stays {} (match all).
                    "from": peers,
                    # The number, not the port's name: not every network plugin resolves named ports.
                    "ports": [{"protocol": "TCP", "port": SERVER_PORT}],
                }
            ],
        },
    }
