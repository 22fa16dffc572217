"""The ConfigMap that carries the inference server's LLM_* settings, and its hash.

LLM_ADAPTERS is outside the hash: a changed adapter set reaches running pods through their adapter API
(adapter_sync.py), and a pod started later reads the current set from this ConfigMap, so no edit of
spec.adapters rolls the pods.
"""

import hashlib
import json
from typing import Any

from llmservice_operator.builders.common import metadata
from llmservice_operator.builders.placement import local_path
from llmservice_operator.constants import CACHE_MOUNT, SERVER_PORT
from llmservice_operator.spec import LLMService

ADAPTERS_KEY = "LLM_ADAPTERS"


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
    if spec.task == "generate":
        # The operator sets the adapters at run time; hf:// ones are downloaded by the server into the
        # cache volume (the same directory an init container would use), pvc:// ones read from the claim.
        settings["LLM_ENABLE_RUNTIME_LORA"] = "true"
        settings["LLM_DOWNLOAD_DIR"] = f"{CACHE_MOUNT}/models"
        settings[ADAPTERS_KEY] = json.dumps(adapter_sources(svc), separators=(",", ":"))
    if spec.serving.max_model_len is not None:
        settings["LLM_MAX_MODEL_LEN"] = str(spec.serving.max_model_len)
    return settings


def adapter_sources(svc: LLMService) -> dict[str, dict[str, str]]:
    """spec.adapters as the server takes them (LLM_ADAPTERS, PUT /v1/adapters): name to source."""
    sources = {}
    for adapter in svc.spec.adapters:
        entry = {"source": adapter.source}
        if adapter.scheme == "hf":
            if adapter.revision:
                entry["revision"] = adapter.revision
        else:  # pvc:// and file:// as the directory the pod sees
            entry["source"] = local_path(adapter)
        sources[adapter.name] = entry
    return sources


def config_hash(config_map: dict[str, Any]) -> str:
    """Changes whenever the data changes, except the adapters; on the pod template it rolls the pods."""
    data = {key: value for key, value in config_map["data"].items() if key != ADAPTERS_KEY}
    encoded = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def build_config_map(svc: LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(svc, config_map_name(svc)),
        "data": server_settings(svc),
    }
