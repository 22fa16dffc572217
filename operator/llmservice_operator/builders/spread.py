"""Spreading the replicas of a model across nodes."""

from typing import Any

from llmservice_operator.builders.common import selector_labels
from llmservice_operator.spec import LLMService

HOSTNAME_KEY = "kubernetes.io/hostname"


def topology_spread(svc: LLMService) -> list[dict[str, Any]]:
    """Replicas on different nodes, so that a node going down takes one replica, not the service.

    Soft (ScheduleAnyway): with fewer GPU nodes than replicas the pods still schedule, only steered apart.
    A spec that places the pods relative to pods (podAffinity, podAntiAffinity) has chosen how they spread,
    and wins; nodeAffinity only narrows the nodes, which the spread counts alone (nodeAffinityPolicy Honor).
    """
    affinity = svc.spec.affinity or {}
    # Not tied to the replica count: in the pod template, a constraint that came and went with it would
    # roll every pod (a model reload each) on `kubectl scale` from 1 and back. With one pod it is moot.
    if "podAffinity" in affinity or "podAntiAffinity" in affinity:
        return []
    return [
        {
            "maxSkew": 1,
            "topologyKey": HOSTNAME_KEY,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(svc)},
            # Counted per ReplicaSet: during a rollout the old pods would skew where the new ones go.
            "matchLabelKeys": ["pod-template-hash"],
        }
    ]
