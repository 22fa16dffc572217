"""Where each model and adapter sits inside the pod, and what must be fetched or mounted to put it there."""

import re
from dataclasses import dataclass

from llmservice_operator.constants import CACHE_MOUNT, PVC_MOUNT_ROOT
from llmservice_operator.spec import LLMService, Source

_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Download:
    """The hf:// model, which an init container fetches into the cache volume (adapters are fetched by
    the server itself, at run time: an init container per adapter would change the pod template)."""

    container_name: str
    source: str
    revision: str | None
    dest: str


def local_path(source: Source) -> str:
    """The directory the server loads `source` from."""
    if source.scheme == "hf":
        repo = _UNSAFE_PATH_CHARS.sub("-", source.location.replace("/", "--"))
        revision = _UNSAFE_PATH_CHARS.sub("-", source.revision or "main")
        # Keyed by repo and revision, so that a cache claim shared by several LLMServices stays coherent.
        return f"{CACHE_MOUNT}/models/{repo}/{revision}"
    if source.scheme == "pvc":
        claim, _, path = source.location.partition("/")
        return f"{PVC_MOUNT_ROOT}/{claim}/{path}".rstrip("/")
    return source.location


def pvc_claims(svc: LLMService) -> list[str]:
    """Claims named by pvc:// sources, in first-seen order (each becomes one read-only volume). A pod's
    volumes are fixed: an adapter on a claim no other source names adds a volume and rolls the pods."""
    sources: list[Source] = [svc.spec.model, *svc.spec.adapters]
    claims: list[str] = []
    for source in sources:
        if source.scheme == "pvc":
            claim = source.location.partition("/")[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def downloads(svc: LLMService) -> list[Download]:
    model = svc.spec.model
    if model.scheme != "hf":
        return []
    return [Download("fetch-model", model.source, model.revision, local_path(model))]
