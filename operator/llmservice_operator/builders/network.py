"""The optional NetworkPolicy: ingress to the model pods' HTTP port only from the listed peers."""

from typing import Any

from llmservice_operator.builders.common import metadata, selector_labels
from llmservice_operator.constants import SERVER_PORT
from llmservice_operator.spec import LLMService


def wants_network_policy(svc: LLMService) -> bool:
    return svc.spec.network_policy.enabled


def build_network_policy(svc: LLMService) -> dict[str, Any]:
    # The spec guarantees peers when enabled: a rule without `from` would admit everyone.
    peers = svc.spec.network_policy.ingress_from
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
                    "from": [peer.model_dump(by_alias=True, exclude_defaults=True) for peer in peers],
                    # The number, not the port's name: not every network plugin resolves named ports.
                    "ports": [{"protocol": "TCP", "port": SERVER_PORT}],
                }
            ],
        },
    }
