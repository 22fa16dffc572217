"""The LLMService parsed once into typed models.

The CRD's schema and CEL rules reject bad specs at the API server; these models re-check the same rules
(a test keeps the two in agreement) so that `render` works offline and the operator never builds from a
spec the API server would have refused, e.g. when the CRD was installed without validation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from llmservice_operator.constants import API_VERSION, GPU_RESOURCE, KIND, MAX_NAME_LENGTH

SOURCE_PATTERN = re.compile(
    r"^(hf://[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9][-A-Za-z0-9_.]*)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?"
    r"|file:///[^\s]+)$"
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SERVICE_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")

# Env names the operator sets on the server container, refused in spec.env in any case (the server reads
# LLM_* case-insensitively). LLM_API_KEY is an env entry of its own (from apiKeySecretRef), which a second
# entry of that name would collide with; the rest come from the operator's ConfigMap
# (builders/config.py), which an env entry of the same name would silently override.
API_KEY_ENV = "LLM_API_KEY"
CONFIG_MAP_ENV = (
    "LLM_MODEL",
    "LLM_SERVED_MODEL_NAME",
    "LLM_TASK",
    "LLM_ADAPTERS",
    "LLM_HOST",
    "LLM_PORT",
    "LLM_DEVICE",
    "LLM_DTYPE",
    "LLM_MAX_BATCH_SIZE",
    "LLM_MAX_QUEUED_REQUESTS",
    "LLM_MAX_MODEL_LEN",
    "LLM_LOG_FORMAT",
    "LLM_ENABLE_RUNTIME_LORA",
    "LLM_DOWNLOAD_DIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
)


class InvalidSpec(ValueError):
    """A spec that can never be served; the message names the offending field."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


def _check_source(value: str) -> str:
    if not SOURCE_PATTERN.match(value):
        raise ValueError("source must be hf://org/repo, pvc://claim/path or file:///path")
    return value


class Source(_Model):
    source: Annotated[str, Field(max_length=512)]
    revision: Annotated[str | None, Field(max_length=128)] = None

    _source = field_validator("source")(_check_source)

    @model_validator(mode="after")
    def _revision_only_for_hub(self) -> Source:
        if self.revision is not None and not self.source.startswith("hf://"):
            raise ValueError("revision applies only to hf:// sources")
        return self

    @property
    def scheme(self) -> str:
        return self.source.split("://", 1)[0]

    @property
    def location(self) -> str:
        """What follows the scheme: org/repo, claim/path or /path."""
        return self.source.split("://", 1)[1]


class ModelSpec(Source):
    served_name: Annotated[str | None, Field(max_length=128)] = None


class AdapterSpec(Source):
    name: Annotated[str, Field(max_length=40)]

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not DNS_LABEL.match(value):
            raise ValueError("adapter name must be a DNS label (lowercase letters, digits and '-')")
        return value


class AutoscalingSpec(_Model):
    min_replicas: Annotated[int, Field(ge=1, le=1000)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=1000)]
    target_in_flight_requests: Annotated[int, Field(ge=1, le=10000)] = 8
    scale_down_stabilization_seconds: Annotated[int, Field(ge=0, le=3600)] = 300

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must not exceed autoscaling.maxReplicas")
        return self


Quantity = int | str


class ResourcesSpec(_Model):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_gpus_here(self) -> ResourcesSpec:
        if GPU_RESOURCE in self.requests or GPU_RESOURCE in self.limits:
            raise ValueError("set GPUs with spec.gpus, not in resources")
        return self


class Toleration(_Model):
    key: Annotated[str, Field(max_length=317)] | None = None  # a label key
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, Field(max_length=63)] | None = None  # a label value
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _valid_for_a_pod(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key needs operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds applies to effect NoExecute only")
        return self


class KeyRef(_Model):
    name: str
    key: str
    optional: bool | None = None


class FieldRef(_Model):
    field_path: str


class EnvValueFrom(_Model):
    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None
    field_ref: FieldRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvValueFrom:
        if [self.secret_key_ref, self.config_map_key_ref, self.field_ref].count(None) != 2:
            raise ValueError("valueFrom takes exactly one of secretKeyRef, configMapKeyRef, fieldRef")
        return self


class EnvVar(_Model):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    value: str | None = None
    value_from: EnvValueFrom | None = None

    @field_validator("name")
    @classmethod
    def _not_set_by_the_operator(cls, name: str) -> str:
        if name.upper() == API_KEY_ENV:
            raise ValueError(
                f"{API_KEY_ENV} is set by the operator; use spec.apiKeySecretRef instead of an env entry"
            )
        if name.upper() in CONFIG_MAP_ENV:
            raise ValueError(
                f"{name} is set by the operator through its ConfigMap (from spec.model, spec.task, "
                "spec.adapters, spec.gpus and spec.serving); an env entry would override it"
            )
        return name

    @model_validator(mode="after")
    def _one_value(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("env entries take value or valueFrom, not both")
        return self


class NameRef(_Model):
    name: str
    optional: bool | None = None


class EnvFromSource(_Model):
    prefix: str | None = None
    config_map_ref: NameRef | None = None
    secret_ref: NameRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvFromSource:
        if (self.config_map_ref is None) == (self.secret_ref is None):
            raise ValueError("envFrom entries take exactly one of configMapRef, secretRef")
        return self


class LocalObjectReference(_Model):
    name: str


class SecretKeyRef(_Model):
    name: str
    key: str


class HfTokenSecretRef(SecretKeyRef):
    key: str = "token"


class ApiKeySecretRef(SecretKeyRef):
    key: str = "api-key"


class CacheSpec(_Model):
    size_limit: str = "50Gi"
    claim_name: Annotated[str | None, Field(max_length=253)] = None

    @field_validator("size_limit")
    @classmethod
    def _quantity(cls, value: str) -> str:
        if not QUANTITY.match(value):
            raise ValueError("cache.sizeLimit must be a quantity such as 50Gi")
        return value


class LabelSelectorRequirement(_Model):
    key: Annotated[str, Field(min_length=1, max_length=317)]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=64)] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _values_match_operator(self) -> LabelSelectorRequirement:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError("matchExpressions: In and NotIn need values, Exists and DoesNotExist take none")
        return self


class LabelSelector(_Model):
    """A metav1 LabelSelector; empty matches everything."""

    match_labels: Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(max_length=64)] = Field(
        default_factory=dict
    )
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=16)] = Field(
        default_factory=list
    )


class NetworkPeer(_Model):
    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector | None = None

    @model_validator(mode="after")
    def _some_selector(self) -> NetworkPeer:
        if self.namespace_selector is None and self.pod_selector is None:
            raise ValueError(
                "each networkPolicy.ingressFrom entry needs a namespaceSelector, a podSelector or both"
            )
        return self


class NetworkPolicySpec(_Model):
    enabled: bool = False
    ingress_from: Annotated[list[NetworkPeer], Field(max_length=32)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _peers_when_enabled(self) -> NetworkPolicySpec:
        if self.enabled and not self.ingress_from:
            raise ValueError(
                "networkPolicy.ingressFrom must list at least one peer when enabled "
                "(with none, no client could reach the model)"
            )
        return self


class ServingSpec(_Model):
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 32
    max_queued_requests: Annotated[int, Field(ge=0, le=100000)] = 256
    max_model_len: Annotated[int | None, Field(ge=16, le=1048576)] = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class LLMServiceSpec(_Model):
    model: ModelSpec
    # Before adapters, whose validator reads it. Always sent to the server (LLM_TASK), never its `auto`.
    task: Literal["generate", "embed", "classify", "score"] = "generate"
    adapters: Annotated[list[AdapterSpec], Field(max_length=16)] = Field(default_factory=list)
    gpus: Annotated[int, Field(ge=0, le=8)] = 1
    replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    autoscaling: AutoscalingSpec | None = None
    image: Annotated[str | None, Field(max_length=512)] = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: Annotated[list[LocalObjectReference], Field(max_length=16)] = Field(
        default_factory=list
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    runtime_class_name: Annotated[str | None, Field(max_length=253)] = None
    env: Annotated[list[EnvVar], Field(max_length=64)] = Field(default_factory=list)
    env_from: Annotated[list[EnvFromSource], Field(max_length=16)] = Field(default_factory=list)
    args: Annotated[list[str], Field(max_length=64)] = Field(default_factory=list)
    hf_token_secret_ref: HfTokenSecretRef | None = None
    api_key_secret_ref: ApiKeySecretRef | None = None
    cache: CacheSpec = Field(default_factory=CacheSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)

    # The CRD keys these lists by name (x-kubernetes-list-type: map), as the pod keys env and
    # imagePullSecrets: a repeated name would fail the Deployment's server-side apply.
    @field_validator("adapters", "env", "image_pull_secrets")
    @classmethod
    def _unique_names(cls, items: list[Any]) -> list[Any]:
        names = [item.name for item in items]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"names must be unique; repeated: {', '.join(duplicates)}")
        return items

    @field_validator("adapters")
    @classmethod
    def _adapters_generate(cls, adapters: list[AdapterSpec], info: ValidationInfo) -> list[AdapterSpec]:
        # An invalid task is reported on its own and leaves no "task" here.
        if adapters and info.data.get("task", "generate") != "generate":
            raise ValueError("LoRA adapters serve generation only; they need spec.task generate")
        return adapters


@dataclass(frozen=True)
class LLMService:
    """One LLMService: identity plus the validated spec. `uid` is None offline (render)."""

    name: str
    namespace: str
    spec: LLMServiceSpec
    uid: str | None = None
    generation: int | None = None

    @property
    def served_name(self) -> str:
        return self.spec.model.served_name or self.name


def _field_path(location: tuple[int | str, ...]) -> str:
    path = "spec"
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{_field_path(item['loc'])}: {message}")
    return "; ".join(problems)


def check_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidSpec(
            f"metadata.name: must be at most {MAX_NAME_LENGTH} characters, "
            "so that the names of its pods fit in 63"
        )
    if not SERVICE_NAME.match(name):
        raise InvalidSpec("metadata.name: must be a DNS label that starts with a letter (it names a Service)")


def parse_spec(spec: Any) -> LLMServiceSpec:
    if not isinstance(spec, dict):
        raise InvalidSpec("spec: must be an object")
    try:
        return LLMServiceSpec.model_validate(spec)
    except ValidationError as error:
        raise InvalidSpec(_describe(error)) from None


def parse_manifest(manifest: Any, default_namespace: str = "default") -> LLMService:
    """A whole LLMService manifest (as applied by a user, or the body kopf hands over)."""
    if not isinstance(manifest, dict):
        raise InvalidSpec("the document is not a Kubernetes object")
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        raise InvalidSpec(f"apiVersion/kind: expected {API_VERSION} {KIND}")
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidSpec("metadata.name: required")
    check_name(name)
    return LLMService(
        name=name,
        namespace=metadata.get("namespace") or default_namespace,
        spec=parse_spec(manifest.get("spec")),
        uid=metadata.get("uid"),
        generation=metadata.get("generation"),
    )
