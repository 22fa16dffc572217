"""Turning autoscaling on without a scale-down: the Deployment's spec.replicas passes from the
operator's apply to another owner (then the HPA), keeping its live value.

Server-side apply removes a field its only manager stops sending, and a Deployment without
spec.replicas defaults to 1: applying the autoscaled Deployment (no replicas, the HPA owns them) would
take a service of 8 GPU pods down to 1 before the HPA scales it back, minutes of loading later. The
Kubernetes documentation's remedy ("Transferring ownership", handover-to-hpa): apply the live count
under another field manager first, so the field keeps an owner when the operator lets go of it.
"""

from typing import Any

from llmservice_operator.constants import FIELD_MANAGER

HANDOVER_FIELD_MANAGER = "llmservice-operator-handover"


def replicas_to_hand_over(desired: dict[str, Any], live: dict[str, Any] | None) -> int | None:
    """The live replica count to hand over before `desired` (a Deployment) is applied, or None when the
    operator keeps spec.replicas or does not own it (the HPA took it already, or nobody set it)."""
    if live is None or "replicas" in desired["spec"] or "replicas" not in (live.get("spec") or {}):
        return None
    for entry in (live.get("metadata") or {}).get("managedFields") or []:
        owned = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        ours = entry.get("manager") == FIELD_MANAGER and entry.get("operation") == "Apply"
        if ours and "f:replicas" in owned:
            return int(live["spec"]["replicas"])
    return None


def handover_manifest(desired: dict[str, Any], replicas: int) -> dict[str, Any]:
    """Only the field changing hands: applied under HANDOVER_FIELD_MANAGER, which then co-owns it."""
    meta = desired["metadata"]
    return {
        "apiVersion": desired["apiVersion"],
        "kind": desired["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": {"replicas": replicas},
    }
