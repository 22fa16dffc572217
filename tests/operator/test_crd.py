"""The CRD: its shape, and the specs its schema and CEL rules accept or reject (the operator agreeing)."""

import copy
from typing import Any

import pytest

from llmservice_operator.spec import InvalidSpec, parse_manifest
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


VALID = [
    pytest.param(MINIMAL, id="minimal"),
    pytest.param(with_changes(MINIMAL, "spec.model", {"source": "pvc://weights/llama/8b"}), id="pvc"),
    pytest.param(with_changes(MINIMAL, "spec.gpus", 0), id="cpu"),
    pytest.param(with_changes(MINIMAL, "spec.autoscaling", {"maxReplicas": 3}), id="autoscaling-defaults"),
    pytest.param(
        with_changes(
            MINIMAL, "spec.resources", {"requests": {"cpu": "500m", "memory": "8Gi"}, "limits": {"cpu": 4}}
        ),
        id="resources",
    ),
    pytest.param(with_changes(MINIMAL, "metadata.name", "a" * 45), id="longest-name"),
    pytest.param(
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
        id="network-policy",
    ),
    pytest.param(with_changes(MINIMAL, "spec.networkPolicy", {}), id="network-policy-off"),
    pytest.param(
        with_changes(MINIMAL, "spec.networkPolicy", {"enabled": False, "ingressFrom": []}),
        id="network-policy-off-without-peers",
    ),
]

INVALID = [
    pytest.param(
        with_changes(MINIMAL, "spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
        "minReplicas must not exceed",
        "spec.autoscaling",
        id="min-over-max",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.model", {"source": "s3://bucket/model"}),
        "source must be hf://",
        "spec.model.source",
        id="scheme",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.model", {"source": "hf://"}),
        "source must be hf://",
        "spec.model.source",
        id="empty",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.model", {"source": "file:///m", "revision": "v1"}),
        "revision applies only to hf://",
        "spec.model",
        id="revision-off-hub",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.adapters", [{"name": "Support_Bot", "source": "hf://a/b"}]),
        "DNS label",
        "spec.adapters[0].name",
        id="adapter-name",
    ),
    pytest.param(
        with_changes(
            MINIMAL,
            "spec.adapters",
            [{"name": "a", "source": "hf://a/b"}, {"name": "a", "source": "hf://a/c"}],
        ),
        "duplicate",
        "spec.adapters",
        id="adapter-duplicate",
    ),
    pytest.param(with_changes(MINIMAL, "spec.gpus", 9), "greater than the maximum", "spec.gpus", id="gpus-9"),
    pytest.param(
        with_changes(MINIMAL, "spec.gpus", -1), "less than the minimum", "spec.gpus", id="gpus-negative"
    ),
    pytest.param(
        with_changes(MINIMAL, "metadata.name", "a" * 46),
        "at most 45 characters",
        "metadata.name",
        id="name-long",
    ),
    pytest.param(
        with_changes(MINIMAL, "metadata.name", "9lives"),
        "starts with a letter",
        "metadata.name",
        id="name-digit",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.resources", {"limits": {"nvidia.com/gpu": 2}}),
        "set GPUs with spec.gpus",
        "spec.resources",
        id="gpu-in-resources",
    ),
    pytest.param(
        with_changes(
            MINIMAL, "spec.env", [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]
        ),
        "value or valueFrom",
        "spec.env[0]",
        id="env-both",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.env", [{"name": "A", "valueFrom": {}}]),  # what pruning leaves of a
        "exactly one of secretKeyRef",  # resourceFieldRef, which the schema does not carry
        "spec.env[0].valueFrom",
        id="env-value-from-empty",
    ),
    pytest.param(
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
        "exactly one of secretKeyRef",
        "spec.env[0].valueFrom",
        id="env-value-from-two",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.envFrom", [{"prefix": "X_"}]),
        "exactly one of configMapRef, secretRef",
        "spec.envFrom[0]",
        id="env-from-no-source",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.tolerations", [{"key": "k", "operator": "Exists", "value": "v"}]),
        "operator Exists takes no value",
        "spec.tolerations[0]",
        id="toleration-exists-with-value",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.tolerations", [{"operator": "Equal", "value": "v"}]),
        "without a key needs operator Exists",
        "spec.tolerations[0]",
        id="toleration-no-key",
    ),
    pytest.param(
        with_changes(
            MINIMAL, "spec.tolerations", [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 30}]
        ),
        "NoExecute only",
        "spec.tolerations[0]",
        id="toleration-seconds",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.cache", {"sizeLimit": "lots"}),
        "does not match",
        "spec.cache.sizeLimit",
        id="cache",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.serving", {"maxBatchSize": 0}),
        "less than the minimum",
        "spec.serving.maxBatchSize",
        id="batch-size",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.networkPolicy", {"enabled": True}),
        "must list at least one peer when enabled",
        "spec.networkPolicy",
        id="network-policy-no-peers",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.networkPolicy", {"enabled": True, "ingressFrom": []}),
        "must list at least one peer when enabled",
        "spec.networkPolicy",
        id="network-policy-empty-peers",
    ),
    pytest.param(
        with_changes(MINIMAL, "spec.networkPolicy", {"enabled": True, "ingressFrom": [{}]}),
        "needs a namespaceSelector, a podSelector or both",
        "spec.networkPolicy.ingressFrom[0]",
        id="network-policy-peer-without-selector",
    ),
    pytest.param(
        with_changes(
            MINIMAL,
            "spec.networkPolicy",
            {
                "enabled": True,
                "ingressFrom": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}],
            },
        ),
        "In and NotIn need values",
        "spec.networkPolicy.ingressFrom[0].podSelector.matchExpressions[0]",
        id="network-policy-in-without-values",
    ),
    pytest.param(
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
        "Exists and DoesNotExist take none",
        "spec.networkPolicy.ingressFrom[0].namespaceSelector.matchExpressions[0]",
        id="network-policy-exists-with-values",
    ),
    pytest.param(
        with_changes(
            MINIMAL,
            "spec.networkPolicy",
            {
                "enabled": True,
                "ingressFrom": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}],
            },
        ),
        "is not one of",
        "spec.networkPolicy.ingressFrom[0].podSelector.matchExpressions[0].operator",
        id="network-policy-operator",
    ),
]


@pytest.mark.parametrize("manifest", VALID)
def test_crd_and_operator_accept(crd: dict, manifest: dict) -> None:
    assert crd_violations(crd, manifest) == []
    parse_manifest(manifest)


def test_readme_example_is_valid(crd: dict, example: dict) -> None:
    assert crd_violations(crd, example) == []
    assert parse_manifest(example).spec.autoscaling is not None


@pytest.mark.parametrize(("manifest", "crd_message", "field"), INVALID)
def test_crd_and_operator_both_reject(crd: dict, manifest: dict, crd_message: str, field: str) -> None:
    problems = crd_violations(crd, manifest)
    assert problems, "the API server would accept this"
    assert crd_message in " ".join(problems)
    with pytest.raises(InvalidSpec) as rejected:
        parse_manifest(manifest)
    assert str(rejected.value).startswith(f"{field}:"), "the operator names the field"


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
    assert spec["replicas"] == parsed.replicas
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
