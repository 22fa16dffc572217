"""The CRD: its shape, and the specs its schema and CEL rules accept or reject (the operator agreeing).

VALID_CASES and INVALID_CASES are plain data, so that a test against a real API server can feed it the
same manifests.
"""

import copy
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from llmservice_operator.spec import API_KEY_ENV, CONFIG_MAP_ENV, InvalidSpec, parse_manifest
from tests.charts.rendering import OPERATOR_CHART, of_kind, render
from tests.conftest import ROOT
from tests.operator.crd_validation import crd_violations

MINIMAL = {
    "apiVersion": "serving.llmservice.io/v1alpha1",
    "kind": "LLMService",
    "metadata": {"name": "tiny", "namespace": "default"},
    "spec": {"model": {"source": "file:///models/tiny"}},
}


def with_changes(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = manifest
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return manifest


class ValidCase(NamedTuple):
    """A manifest the API server and the operator both accept."""

    name: str
    manifest: dict[str, Any]


class InvalidCase(NamedTuple):
    """A manifest the API server and the operator both refuse."""

    name: str
    manifest: dict[str, Any]
    # The field the refusal names: the operator's message starts with it ("spec.env[0].name: ..."), the
    # API server's contains it (a list's duplicate as "spec.env[1]: Duplicate value: ...").
    field: str
    # Part of what this suite's validator (jsonschema and cel-python) says. The CEL messages and
    # "Duplicate value" are the API server's words too; jsonschema words the schema's own errors
    # ("greater than the maximum", "is not one of", "does not match", "is too long") otherwise.
    crd_message: str


def test_crd_names_scope_and_subresources(crd: dict) -> None:
    assert crd["metadata"]["name"] == "llmservices.serving.llmservice.io"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("serving.llmservice.io", "Namespaced")
    assert spec["names"]["kind"] == "LLMService"
    assert spec["names"]["plural"] == "llmservices"
    assert "llms" in spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = {column["name"]: column["jsonPath"] for column in version["additionalPrinterColumns"]}
    assert columns == {
        "Model": ".spec.model.source",
        "Task": ".spec.task",
        "Adapters": ".spec.adapters[*].name",
        "GPUs": ".spec.gpus",
        "Ready-Replicas": ".status.readyReplicas",
        "Desired": ".status.replicas",
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "URL": ".status.url",
        "Age": ".metadata.creationTimestamp",
    }


def test_every_spec_field_is_described_or_self_explanatory(crd: dict) -> None:
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    undocumented = [
        name
        for name, field in spec_schema["properties"].items()
        if "description" not in field and field.get("type") == "object" and name not in {"nodeSelector"}
    ]
    assert undocumented == []


VALID_CASES: list[ValidCase] = [
    ValidCase("minimal", MINIMAL),
    ValidCase("pvc", with_changes(MINIMAL, "spec.model", {"source": "pvc://weights/llama/8b"})),
    ValidCase("cpu", with_changes(MINIMAL, "spec.gpus", 0)),
    ValidCase("autoscaling-defaults", with_changes(MINIMAL, "spec.autoscaling", {"maxReplicas": 3})),
    ValidCase(
        "resources",
        with_changes(
            MINIMAL, "spec.resources", {"requests": {"cpu": "500m", "memory": "8Gi"}, "limits": {"cpu": 4}}
        ),
    ),
    ValidCase("longest-name", with_changes(MINIMAL, "metadata.name", "a" * 45)),
    ValidCase(
        "network-policy",
        with_changes(
            MINIMAL,
            "spec.networkPolicy",
            {
                "enabled": True,
                "ingressFrom": [
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}},
                    {
                        "namespaceSelector": {},
                        "podSelector": {
                            "matchExpressions": [{"key": "app", "operator": "In", "values": ["x"]}]
                        },
                    },
                    {"podSelector": {"matchExpressions": [{"key": "llm-client", "operator": "Exists"}]}},
                ],
            },
        ),
    ),
    ValidCase("network-policy-off", with_changes(MINIMAL, "spec.networkPolicy", {})),
    ValidCase(
        "network-policy-off-without-peers",
        with_changes(MINIMAL, "spec.networkPolicy", {"enabled": False, "ingressFrom": []}),
    ),
    ValidCase(
        "env-beside-the-operators",  # the server's knobs the operator leaves alone, and look-alike names
        with_changes(
            with_changes(MINIMAL, "spec.apiKeySecretRef", {"name": "keys"}),
            "spec.env",
            [
                {"name": "LLM_MAX_NEW_TOKENS", "value": "2048"},
                {"name": "LLM_LOG_LEVEL", "value": "debug"},
                {"name": "LLM_API_KEY_HEADER", "value": "x"},
                {"name": "APP_LLM_PORT", "value": "9000"},
                {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
            ],
        ),
    ),
    ValidCase("env-name-longest", with_changes(MINIMAL, "spec.env", [{"name": "A" * 256, "value": "1"}])),
    ValidCase(
        "image-pull-secrets",
        with_changes(MINIMAL, "spec.imagePullSecrets", [{"name": "registry"}, {"name": "mirror"}]),
    ),
    ValidCase(
        "task-generate-with-adapters",
        with_changes(
            with_changes(MINIMAL, "spec.task", "generate"),
            "spec.adapters",
            [{"name": "support", "source": "hf://acme/support"}],
        ),
    ),
    ValidCase(
        "task-embed-on-cpu-autoscaled",  # every serving limit applies to pooling models too
        with_changes(
            with_changes(
                with_changes(with_changes(MINIMAL, "spec.task", "embed"), "spec.gpus", 0),
                "spec.autoscaling",
                {"maxReplicas": 4, "targetInFlightRequests": 16},
            ),
            "spec.serving",
            {"maxBatchSize": 64, "maxQueuedRequests": 512, "maxModelLen": 256, "dtype": "float32"},
        ),
    ),
    ValidCase("task-classify", with_changes(MINIMAL, "spec.task", "classify")),
    ValidCase(
        "task-score-with-no-adapters",
        with_changes(with_changes(MINIMAL, "spec.task", "score"), "spec.adapters", []),
    ),
]

INVALID_CASES: list[InvalidCase] = [
    InvalidCase(
        "task-unknown",
        with_changes(MINIMAL, "spec.task", "rerank"),
        "spec.task",
        "is not one of",
    ),
    *(
        InvalidCase(
            f"adapters-with-task-{task}",
            with_changes(
                with_changes(MINIMAL, "spec.task", task),
                "spec.adapters",
                [{"name": "support", "source": "hf://acme/support"}],
            ),
            "spec.adapters",
            "LoRA adapters serve generation only; they need spec.task generate",
        )
        for task in ("embed", "classify", "score")
    ),
    InvalidCase(
        "min-over-max",
        with_changes(MINIMAL, "spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
        "spec.autoscaling",
        "minReplicas must not exceed",
    ),
    InvalidCase(
        "scheme",
        with_changes(MINIMAL, "spec.model", {"source": "s3://bucket/model"}),
        "spec.model.source",
        "source must be hf://",
    ),
    InvalidCase(
        "empty",
        with_changes(MINIMAL, "spec.model", {"source": "hf://"}),
        "spec.model.source",
        "source must be hf://",
    ),
    InvalidCase(
        "revision-off-hub",
        with_changes(MINIMAL, "spec.model", {"source": "file:///m", "revision": "v1"}),
        "spec.model",
        "revision applies only to hf://",
    ),
    InvalidCase(
        "adapter-name",
        with_changes(MINIMAL, "spec.adapters", [{"name": "Support_Bot", "source": "hf://a/b"}]),
        "spec.adapters[0].name",
        "DNS label",
    ),
    InvalidCase(
        "adapter-duplicate",
        with_changes(
            MINIMAL,
            "spec.adapters",
            [{"name": "a", "source": "hf://a/b"}, {"name": "a", "source": "hf://a/c"}],
        ),
        "spec.adapters",
        "Duplicate value",
    ),
    InvalidCase("gpus-9", with_changes(MINIMAL, "spec.gpus", 9), "spec.gpus", "greater than the maximum"),
    InvalidCase(
        "gpus-negative", with_changes(MINIMAL, "spec.gpus", -1), "spec.gpus", "less than the minimum"
    ),
    InvalidCase(
        "name-long",
        with_changes(MINIMAL, "metadata.name", "a" * 46),
        "metadata.name",
        "at most 45 characters",
    ),
    InvalidCase(
        "name-digit",
        with_changes(MINIMAL, "metadata.name", "9lives"),
        "metadata.name",
        "starts with a letter",
    ),
    InvalidCase(
        "gpu-in-resources",
        with_changes(MINIMAL, "spec.resources", {"limits": {"nvidia.com/gpu": 2}}),
        "spec.resources",
        "set GPUs with spec.gpus",
    ),
    InvalidCase(
        "env-both",
        with_changes(
            MINIMAL, "spec.env", [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]
        ),
        "spec.env[0]",
        "value or valueFrom",
    ),
    InvalidCase(
        "env-value-from-empty",  # what pruning leaves of a resourceFieldRef, which the schema does not carry
        with_changes(MINIMAL, "spec.env", [{"name": "A", "valueFrom": {}}]),
        "spec.env[0].valueFrom",
        "exactly one of secretKeyRef",
    ),
    InvalidCase(
        "env-value-from-two",
        with_changes(
            MINIMAL,
            "spec.env",
            [
                {
                    "name": "A",
                    "valueFrom": {
                        "secretKeyRef": {"name": "s", "key": "k"},
                        "configMapKeyRef": {"name": "c", "key": "k"},
                    },
                }
            ],
        ),
        "spec.env[0].valueFrom",
        "exactly one of secretKeyRef",
    ),
    InvalidCase(
        "env-from-no-source",
        with_changes(MINIMAL, "spec.envFrom", [{"prefix": "X_"}]),
        "spec.envFrom[0]",
        "exactly one of configMapRef, secretRef",
    ),
    InvalidCase(
        "toleration-exists-with-value",
        with_changes(MINIMAL, "spec.tolerations", [{"key": "k", "operator": "Exists", "value": "v"}]),
        "spec.tolerations[0]",
        "operator Exists takes no value",
    ),
    InvalidCase(
        "toleration-no-key",
        with_changes(MINIMAL, "spec.tolerations", [{"operator": "Equal", "value": "v"}]),
        "spec.tolerations[0]",
        "without a key needs operator Exists",
    ),
    InvalidCase(
        "toleration-seconds",
        with_changes(
            MINIMAL, "spec.tolerations", [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 30}]
        ),
        "spec.tolerations[0]",
        "NoExecute only",
    ),
    InvalidCase(
        "cache",
        with_changes(MINIMAL, "spec.cache", {"sizeLimit": "lots"}),
        "spec.cache.sizeLimit",
        "does not match",
    ),
    InvalidCase(
        "batch-size",
        with_changes(MINIMAL, "spec.serving", {"maxBatchSize": 0}),
        "spec.serving.maxBatchSize",
        "less than the minimum",
    ),
    InvalidCase(
        "network-policy-no-peers",
        with_changes(MINIMAL, "spec.networkPolicy", {"enabled": True}),
        "spec.networkPolicy",
        "must list at least one peer when enabled",
    ),
    InvalidCase(
        "network-policy-empty-peers",
        with_changes(MINIMAL, "spec.networkPolicy", {"enabled": True, "ingressFrom": []}),
        "spec.networkPolicy",
        "must list at least one peer when enabled",
    ),
    InvalidCase(
        "network-policy-peer-without-selector",
        with_changes(MINIMAL, "spec.networkPolicy", {"enabled": True, "ingressFrom": [{}]}),
        "spec.networkPolicy.ingressFrom[0]",
        "needs a namespaceSelector, a podSelector or both",
    ),
    InvalidCase(
        "network-policy-in-without-values",
        with_changes(
            MINIMAL,
            "spec.networkPolicy",
            {
                "enabled": True,
                "ingressFrom": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}],
            },
        ),
        "spec.networkPolicy.ingressFrom[0].podSelector.matchExpressions[0]",
        "In and NotIn need values",
    ),
    InvalidCase(
        "network-policy-exists-with-values",
        with_changes(
            MINIMAL,
            "spec.networkPolicy",
            {
                "enabled": True,
                "ingressFrom": [
                    {
                        "namespaceSelector": {
                            "matchExpressions": [{"key": "team", "operator": "Exists", "values": ["a"]}]
                        }
                    }
                ],
            },
        ),
        "spec.networkPolicy.ingressFrom[0].namespaceSelector.matchExpressions[0]",
        "Exists and DoesNotExist take none",
    ),
    InvalidCase(
        "network-policy-operator",
        with_changes(
            MINIMAL,
            "spec.networkPolicy",
            {
                "enabled": True,
                "ingressFrom": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}],
            },
        ),
        "spec.networkPolicy.ingressFrom[0].podSelector.matchExpressions[0].operator",
        "is not one of",
    ),
    InvalidCase(
        "env-duplicate",
        with_changes(MINIMAL, "spec.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        "spec.env",
        "Duplicate value",
    ),
    InvalidCase(
        "image-pull-secret-duplicate",
        with_changes(MINIMAL, "spec.imagePullSecrets", [{"name": "registry"}, {"name": "registry"}]),
        "spec.imagePullSecrets",
        "Duplicate value",
    ),
    InvalidCase(
        "env-api-key",
        with_changes(MINIMAL, "spec.env", [{"name": "LLM_API_KEY", "value": "sk-plain"}]),
        "spec.env[0].name",
        "LLM_API_KEY is set by the operator; use spec.apiKeySecretRef",
    ),
    InvalidCase(
        "env-api-key-beside-its-secret-ref",  # two LLM_API_KEY entries in the pod: server-side apply fails
        with_changes(
            with_changes(MINIMAL, "spec.apiKeySecretRef", {"name": "keys"}),
            "spec.env",
            [
                {"name": "A", "value": "1"},
                {"name": "LLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "other", "key": "k"}}},
            ],
        ),
        "spec.env[1].name",
        "LLM_API_KEY is set by the operator; use spec.apiKeySecretRef",
    ),
    InvalidCase(
        "env-api-key-lowercase",  # the server's settings read LLM_* whatever the case
        with_changes(MINIMAL, "spec.env", [{"name": "llm_api_key", "value": "sk-plain"}]),
        "spec.env[0].name",
        "LLM_API_KEY is set by the operator",
    ),
    *(
        InvalidCase(
            f"env-{name}",
            with_changes(MINIMAL, "spec.env", [{"name": name, "value": "1"}]),
            "spec.env[0].name",
            f"{name} is set by the operator through its ConfigMap",
        )
        for name in CONFIG_MAP_ENV
    ),
    InvalidCase(
        "env-config-map-lowercase",
        with_changes(MINIMAL, "spec.env", [{"name": "llm_Port", "value": "9000"}]),
        "spec.env[0].name",
        "llm_Port is set by the operator through its ConfigMap",
    ),
    InvalidCase(
        "env-name-long",
        with_changes(MINIMAL, "spec.env", [{"name": "A" * 257, "value": "1"}]),
        "spec.env[0].name",
        "is too long",
    ),
]


@pytest.mark.parametrize("manifest", [pytest.param(case.manifest, id=case.name) for case in VALID_CASES])
def test_crd_and_operator_accept(crd: dict, manifest: dict) -> None:
    assert crd_violations(crd, manifest) == []
    parse_manifest(manifest)


def test_readme_example_is_valid(crd: dict, example: dict) -> None:
    assert crd_violations(crd, example) == []
    assert parse_manifest(example).spec.autoscaling is not None


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda path: path.name)
def test_every_example_is_valid(crd: dict, path: Path) -> None:
    for manifest in yaml.safe_load_all(path.read_text()):
        assert crd_violations(crd, manifest) == []
        parse_manifest(manifest)


def test_crd_and_operator_refuse_adapters_of_a_pooling_model_in_the_same_words(crd: dict) -> None:
    manifest = with_changes(
        with_changes(MINIMAL, "spec.task", "embed"), "spec.adapters", [{"name": "a", "source": "hf://a/b"}]
    )
    (problem,) = crd_violations(crd, manifest)
    with pytest.raises(InvalidSpec) as rejected:
        parse_manifest(manifest)
    assert problem == f"self.spec: {rejected.value}"


@pytest.mark.parametrize(
    ("manifest", "field", "crd_message"),
    [pytest.param(case.manifest, case.field, case.crd_message, id=case.name) for case in INVALID_CASES],
)
def test_crd_and_operator_both_reject(crd: dict, manifest: dict, field: str, crd_message: str) -> None:
    problems = crd_violations(crd, manifest)
    assert problems, "the API server would accept this"
    assert crd_message in " ".join(problems)
    with pytest.raises(InvalidSpec) as rejected:
        parse_manifest(manifest)
    assert str(rejected.value).startswith(f"{field}:"), "the operator names the field"


def test_invalid_case_names_are_unique() -> None:
    names = [case.name for case in INVALID_CASES + VALID_CASES]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name", [API_KEY_ENV, *CONFIG_MAP_ENV])
def test_crd_and_operator_refuse_an_operator_env_name_in_the_same_words(crd: dict, name: str) -> None:
    manifest = with_changes(MINIMAL, "spec.env", [{"name": "OK", "value": "1"}, {"name": name, "value": "1"}])
    (problem,) = crd_violations(crd, manifest)
    with pytest.raises(InvalidSpec) as rejected:
        parse_manifest(manifest)
    assert problem == f"self.{rejected.value}"


def test_the_crd_refuses_exactly_the_operators_config_map_env_names(crd: dict) -> None:
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    _, config_map_rule = spec["properties"]["env"]["items"]["properties"]["name"]["x-kubernetes-validations"]
    (alternatives,) = re.findall(r"\^\((.*)\)\$", config_map_rule["rule"])
    assert alternatives.split("|") == list(CONFIG_MAP_ENV)


def test_the_crd_is_kept_by_helm_argo_cd_and_flux() -> None:
    """Deleting the CRD deletes every LLMService; Argo CD prunes despite Helm's keep (argo-cd#17819)."""
    kept = {
        "helm.sh/resource-policy": "keep",
        "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
        "kustomize.toolkit.fluxcd.io/prune": "disabled",
    }
    source = yaml.safe_load((ROOT / "crds" / "serving.llmservice.io_llmservices.yaml").read_text())
    (rendered,) = [
        crd
        for crd in of_kind(render(OPERATOR_CHART, {}), "CustomResourceDefinition")
        if crd["metadata"]["name"] == source["metadata"]["name"]
    ]
    for crd in (source, rendered):
        assert kept.items() <= crd["metadata"].get("annotations", {}).items()


def test_crd_defaults_match_the_operator_defaults(crd: dict) -> None:
    from tests.operator.crd_validation import apply_defaults

    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    defaulted = apply_defaults(
        schema,
        copy.deepcopy(
            with_changes(
                MINIMAL,
                "spec",
                {
                    "model": {"source": "file:///m"},
                    "autoscaling": {"maxReplicas": 3},
                    "cache": {},
                    "serving": {},
                    "apiKeySecretRef": {"name": "k"},
                    "hfTokenSecretRef": {"name": "t"},
                    "networkPolicy": {},
                },
            )
        ),
    )
    parsed = parse_manifest(with_changes(defaulted, "spec.cache", {})).spec
    spec = defaulted["spec"]
    assert spec["gpus"] == parsed.gpus
    assert spec["task"] == parsed.task == "generate"
    assert spec["replicas"] == parsed.replicas == 1
    assert spec["autoscaling"]["minReplicas"] == parsed.autoscaling.min_replicas
    assert spec["autoscaling"]["targetInFlightRequests"] == parsed.autoscaling.target_in_flight_requests
    assert (
        spec["autoscaling"]["scaleDownStabilizationSeconds"]
        == parsed.autoscaling.scale_down_stabilization_seconds
    )
    assert spec["serving"]["maxBatchSize"] == parsed.serving.max_batch_size
    assert spec["serving"]["maxQueuedRequests"] == parsed.serving.max_queued_requests
    assert spec["serving"]["dtype"] == parsed.serving.dtype
    assert spec["apiKeySecretRef"]["key"] == parsed.api_key_secret_ref.key
    assert spec["hfTokenSecretRef"]["key"] == parsed.hf_token_secret_ref.key
    assert defaulted["spec"]["cache"]["sizeLimit"] == parsed.cache.size_limit
    assert spec["networkPolicy"]["enabled"] == parsed.network_policy.enabled


def test_operator_names_unknown_fields(crd: dict) -> None:
    with pytest.raises(InvalidSpec, match=r"spec\.autoscaling\.maxReplica: unknown field"):
        parse_manifest(with_changes(MINIMAL, "spec.autoscaling", {"maxReplicas": 2, "maxReplica": 3}))
