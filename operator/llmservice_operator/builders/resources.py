"""Requests of the model pod's containers: a namespace ResourceQuota refuses a pod where one has none."""

from typing import Any

from llmservice_operator.constants import GPU_RESOURCE
from llmservice_operator.spec import LLMService

# The server beside a GPU tokenizes, serves HTTP and stages the weights in host memory on their way to the
# GPU; CPU serving is meant for small models (the demo, kind), so its default fits a laptop's node.
GPU_SERVER_REQUESTS = {"cpu": "2", "memory": "8Gi"}
CPU_SERVER_REQUESTS = {"cpu": "1", "memory": "2Gi"}
# Downloaders wait on the network and stream to disk. Init containers run before the server, so the pod's
# effective request (the larger of the largest init container's and the sum of the others') stays the
# server's as long as these are smaller.
DOWNLOADER_REQUESTS = {"cpu": "250m", "memory": "512Mi"}


def _quantities(values: dict[str, int | str]) -> dict[str, str]:
    return {name: str(value) for name, value in values.items()}


def _cache_storage(svc: LLMService) -> dict[str, str]:
    """An emptyDir cache is node disk the pod may fill up to its sizeLimit, so the scheduler should count it.

    Requested on the downloaders and the server alike, so that the pod's effective request (the larger of the
    largest init container's and the sum of the others') is the sizeLimit either way. A PVC is not node disk.
    """
    if svc.spec.cache.claim_name:
        return {}
    return {"ephemeral-storage": svc.spec.cache.size_limit}


def server_resources(svc: LLMService) -> dict[str, Any]:
    given = svc.spec.resources
    limits = _quantities(given.limits)
    defaults = {**(GPU_SERVER_REQUESTS if svc.spec.gpus > 0 else CPU_SERVER_REQUESTS), **_cache_storage(svc)}
    # A resource with only a limit gets no default request: the API server sets that request to the limit,
    # and a default above a user's limit would be refused.
    requests = {name: value for name, value in defaults.items() if name not in limits}
    requests.update(_quantities(given.requests))
    if svc.spec.gpus > 0:
        limits[GPU_RESOURCE] = str(svc.spec.gpus)
    resources: dict[str, Any] = {"requests": requests}
    if limits:
        resources["limits"] = limits
    return resources


def downloader_resources(svc: LLMService) -> dict[str, Any]:
    return {"requests": {**DOWNLOADER_REQUESTS, **_cache_storage(svc)}}
