"""The HorizontalPodAutoscaler on in-flight requests, and the PodDisruptionBudget."""

from typing import Any

from llmservice_operator.builders.common import may_run_several, metadata, selector_labels
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import LLMService


def build_hpa(svc: LLMService, settings: OperatorSettings) -> dict[str, Any]:
    scaling = svc.spec.autoscaling
    if scaling is None:
        raise ValueError(f"LLMService {svc.name} has no autoscaling section")
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(svc),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": svc.name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": settings.hpa_metric_name},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(scaling.target_in_flight_requests),
                        },
                    },
                }
            ],
            # GPU pods take minutes to start: add them quickly, give them back slowly.
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 4, "periodSeconds": 60}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": scaling.scale_down_stabilization_seconds,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
            },
        },
    }


def wants_pdb(svc: LLMService) -> bool:
    """A PDB only helps where more than one replica can run; with one it would just block drains."""
    return may_run_several(svc)


def build_pdb(svc: LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(svc),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(svc)},
            # A pod that is not Ready (crash-looping, or stuck loading) serves nothing: evicting it costs no
            # capacity, and counting it against the budget would block node drains for as long as it fails.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
