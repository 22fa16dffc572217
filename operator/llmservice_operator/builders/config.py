"""The ConfigMap that carries the inference server's LLM_* settings, and its hash."""

import hashlib
import json
from typing import Any

from llmservice_operator.builders.common import metadata
from llmservice_operator.builders.placement import local_path
from llmservice_operator.constants import CACHE_MOUNT, SERVER_PORT
from llmservice_operator.spec import LLMService


def config_map_name(svc: LLMService) -> str:
    return f"{svc.name}-config"


def server_settings(svc: LLMService) -> dict[str, str]:
    spec = svc.spec
    settings = {
        "LLM_MODEL": local_path(spec.model),
        "LLM_SERVED_MODEL_NAME": svc.served_name,
        # Always the spec's task, never the server's `auto`: what a pod serves must not hang on a guess
        # from the model's architecture.
        "LLM_TASK": spec.task,
        "LLM_HOST": "0.0.0.0",
        "LLM_PORT": str(SERVER_PORT),
        "LLM_DEVICE": "cuda" if spec.gpus > 0 else "cpu",
        "LLM_DTYPE": spec.serving.dtype,
        "LLM_MAX_BATCH_SIZE": str(spec.serving.max_batch_size),
        "LLM_MAX_QUEUED_REQUESTS": str(spec.serving.max_queued_requests),
        "LLM_LOG_FORMAT": "json",
        # Weights were fetched by the init containers; the server itself never reaches the hub.
        "HF_HOME": f"{CACHE_MOUNT}/hf-home",
        "HF_HUB_OFFLINE": "1",
    }
    if spec.adapters:
        adapters = {adapter.name: local_path(adapter) for adapter in spec.adapters}
        settings["LLM_ADAPTERS"] = json.dumps(adapters, separators=(",", ":"))
    if spec.serving.max_model_len is not None:
        settings["LLM_MAX_MODEL_LEN"] = str(spec.serving.max_model_len)
    return settings


def config_hash(config_map: dict[str, Any]) -> str:
    """Changes whenever the data changes; on the pod template it rolls the pods."""
    encoded = json.dumps(config_map["data"], sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def build_config_map(svc: LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(svc, config_map_name(svc)),
        "data": server_settings(svc),
    }
