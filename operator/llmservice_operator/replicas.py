"""While autoscaling is on, the LLMService's spec.replicas follows the HPA's count.

The HPA scales the Deployment; copying its count into the LLMService keeps `/scale` and `kubectl get
llms` truthful and makes turning autoscaling off keep the replicas that run (the Deployment then takes
spec.replicas again) instead of falling back to whatever spec.replicas said before, 1 by default.
"""

from collections.abc import Mapping
from typing import Any

from llmservice_operator.spec import LLMServiceSpec


def replicas_to_record(spec: LLMServiceSpec, deployment: Mapping[str, Any] | None) -> int | None:
    """The count to write into spec.replicas, or None when there is nothing to copy."""
    if spec.autoscaling is None or deployment is None:
        return None
    count = (deployment.get("spec") or {}).get("replicas")
    if count is None or count == spec.replicas:
        return None
    return int(count)
