"""charts/llmservice: one LLMService from values, valid for the CRD and the operator."""

from typing import Any

import helm_python
import pytest

from llmservice_operator.spec import parse_manifest
from tests.charts.rendering import LLMSERVICE_CHART, lint_errors, render
from tests.operator.crd_validation import crd_violations

VARIANTS = {
    "default": {},
    "adapters-autoscaling": {
        "model": {"source": "hf://acme/llama", "revision": "v2", "servedName": "llama"},
        "adapters": [{"name": "support", "source": "hf://acme/support-lora"}],
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetInFlightRequests": 8},
        "apiKeySecretRef": {"name": "keys"},
        "serving": {"maxBatchSize": 16},
        "extra": {"args": ["--log-requests"], "cache": {"claimName": "hf-cache"}},
    },
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "ingressFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}},
                {"podSelector": {}},
            ],
        },
    },
    "cpu": {
        "model": {"source": "file:///models/demo/model"},
        "gpus": 0,
        "replicas": 2,
        "nameOverride": "demo",
    },
}


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_renders_an_llmservice_the_crd_and_the_operator_accept(values: dict[str, Any], crd: dict) -> None:
    assert lint_errors(LLMSERVICE_CHART, values) == []
    (llmservice,) = render(LLMSERVICE_CHART, values, namespace="ml", name="support-bot")
    assert llmservice["kind"] == "LLMService"
    assert crd_violations(crd, llmservice) == []
    svc = parse_manifest(llmservice)
    assert svc.namespace == "ml"
    assert svc.name == values.get("nameOverride", "support-bot")


def test_values_reach_the_spec() -> None:
    (llmservice,) = render(LLMSERVICE_CHART, VARIANTS["adapters-autoscaling"], namespace="ml", name="bot")
    spec = parse_manifest(llmservice).spec
    assert spec.model.served_name == "llama" and spec.adapters[0].name == "support"
    assert spec.autoscaling is not None and spec.autoscaling.max_replicas == 4
    assert spec.api_key_secret_ref is not None and spec.api_key_secret_ref.key == "api-key"
    assert spec.args == ["--log-requests"] and spec.cache.claim_name == "hf-cache"


def test_values_schema_rejects_unknown_keys_and_bad_sources() -> None:
    chart = helm_python.Chart.load(LLMSERVICE_CHART)
    with pytest.raises(helm_python.HelmValuesError, match="additional properties 'gpu' not allowed"):
        chart.validate_schema({"gpu": 1})
    with pytest.raises(helm_python.HelmValuesError, match="source"):
        chart.validate_schema({"model": {"source": "s3://bucket/model"}})


def test_network_policy_values_reach_the_spec_only_when_enabled() -> None:
    (llmservice,) = render(LLMSERVICE_CHART, VARIANTS["network-policy"], namespace="ml", name="bot")
    policy = parse_manifest(llmservice).spec.network_policy
    assert policy.enabled
    assert (
        llmservice["spec"]["networkPolicy"]["ingressFrom"]
        == VARIANTS["network-policy"]["networkPolicy"]["ingressFrom"]
    )
    off = {"networkPolicy": {"enabled": False, "ingressFrom": [{"podSelector": {}}]}}
    (llmservice,) = render(LLMSERVICE_CHART, off, namespace="ml", name="bot")
    assert "networkPolicy" not in llmservice["spec"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"networkPolicy": {"enabled": True}}, "ingressFrom': minItems"),
        ({"networkPolicy": {"enabled": True, "ingressFrom": []}}, "ingressFrom': minItems"),
        ({"networkPolicy": {"enabled": True, "ingressFrom": [{}]}}, "minProperties"),
        ({"networkPolicy": {"enabled": True, "ingressFrom": [{"ipBlock": {}}]}}, "'ipBlock' not allowed"),
    ],
    ids=["no-peers", "empty-peers", "empty-peer", "unknown-peer"],
)
def test_values_schema_rejects_bad_network_policies(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=message):
        helm_python.Chart.load(LLMSERVICE_CHART).validate_schema(values)
