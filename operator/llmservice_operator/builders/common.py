"""Labels, metadata and owner references every child shares."""

from typing import Any

from llmservice_operator.constants import (
    API_VERSION,
    APP_NAME,
    KIND,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_PART_OF,
    OPERATOR_NAME,
)
from llmservice_operator.spec import LLMService


def selector_labels(svc: LLMService) -> dict[str, str]:
    """The immutable subset that Deployment, Service, PDB and /scale select pods by."""
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: svc.name}


def may_run_several(svc: LLMService) -> bool:
    """More than one replica at a time, the case that PDBs and spreading across nodes are for."""
    if svc.spec.autoscaling is not None:
        return svc.spec.autoscaling.max_replicas > 1
    return svc.spec.replicas > 1


def labels(svc: LLMService) -> dict[str, str]:
    return {
        **selector_labels(svc),
        LABEL_COMPONENT: "inference",
        LABEL_PART_OF: APP_NAME,
        LABEL_MANAGED_BY: OPERATOR_NAME,
    }


def label_selector(name: str) -> str:
    """The pod selector of LLMService `name` as a string (status.selector, for the scale subresource)."""
    return f"{LABEL_INSTANCE}={name},{LABEL_NAME}={APP_NAME}"


def owner_references(svc: LLMService) -> list[dict[str, Any]]:
    if svc.uid is None:  # offline rendering: the API server fills nothing in, so claim nothing
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": svc.name,
            "uid": svc.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def metadata(svc: LLMService, name: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name or svc.name,
        "namespace": svc.namespace,
        "labels": labels(svc),
    }
    owners = owner_references(svc)
    if owners:
        meta["ownerReferences"] = owners
    return meta
