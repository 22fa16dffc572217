"""Pure builders: an LLMService in, the manifests of its children out. No I/O."""

from dataclasses import dataclass

from llmservice_operator.builders.autoscaling import build_hpa, build_pdb, wants_pdb
from llmservice_operator.builders.config import build_config_map
from llmservice_operator.builders.deployment import build_deployment
from llmservice_operator.builders.network import build_network_policy, wants_network_policy
from llmservice_operator.builders.service import build_service
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import LLMService


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class Children:
    """What should exist (in apply order) and what must not exist (left over from an older spec)."""

    desired: list[dict]
    absent: list[ChildRef]


def build_children(svc: LLMService, settings: OperatorSettings) -> Children:
    config_map = build_config_map(svc)
    desired = [
        config_map,
        build_service(svc),
        build_deployment(svc, settings, config_map),
    ]
    absent = []
    if svc.spec.autoscaling is not None:
        desired.append(build_hpa(svc, settings))
    else:
        absent.append(ChildRef("autoscaling/v2", "HorizontalPodAutoscaler", svc.name))
    if wants_pdb(svc):
        desired.append(build_pdb(svc))
    else:
        absent.append(ChildRef("policy/v1", "PodDisruptionBudget", svc.name))
    if wants_network_policy(svc):
        desired.append(build_network_policy(svc, settings.operator_namespace))
    else:
        absent.append(ChildRef("networking.k8s.io/v1", "NetworkPolicy", svc.name))
    return Children(desired=desired, absent=absent)


__all__ = ["ChildRef", "Children", "build_children"]
