"""The operator's own settings: environment variables the Helm chart sets."""

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMSERVICE_", frozen=True)

    inference_image: str = Field(
        "ghcr.io/llmservice/inference:0.1.0",
        description="Image the model pods run when an LLMService names none.",
    )
    hpa_metric_name: str = Field(
        "llmservice_in_flight_requests",
        description="Per-pod metric the HPAs target; the chart's prometheus-adapter rule exposes it.",
    )
    watch_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated namespaces to watch; empty watches all."
    )
    log_format: Literal["plain", "full", "json"] = "json"
    log_level: Literal["debug", "info", "warning"] = "info"
    metrics_port: int = Field(8080, description="Port of the Prometheus /metrics endpoint; 0 turns it off.")
    cluster_domain: str = "cluster.local"
    platform: Literal["kubernetes", "openshift"] = Field(
        "kubernetes",
        description="openshift leaves the model pods' UID, GID and fsGroup to the namespace's SCC range "
        "(restricted-v2 rejects a fixed UID outside it); the chart detects it.",
    )
    operator_namespace: str | None = Field(
        None,
        description="The operator's own namespace (the chart sets it): NetworkPolicies of generation "
        "models admit it to the pods' port, through which the operator sets their adapters.",
    )
    adapter_sync_seconds: float = Field(
        10,
        gt=0,
        description="How often every ready model pod is given its LLMService's adapters and asked for their "
        "states (sooner while one loads, and at once after a spec change).",
    )
    resync_seconds: float = Field(
        300,
        ge=0,
        description="How often children are listed from the API server to find those deleted while a "
        "watch was down (kopf keeps them in its index after a 410); 0 turns it off.",
    )

    @field_validator("watch_namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value
