"""Both charts take secrets by name only: no value is asked for, accepted, rendered or echoed.

The canary is a value a careless user might try to pass; the schemas must refuse every place it could go,
and what the charts do render (with secret names) must reach the model pods only as secretKeyRefs.
"""

import json
from typing import Any

import helm_python
import pytest

from llmservice_operator.builders import build_children
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import parse_manifest
from tests.charts.rendering import LLMSERVICE_CHART, OPERATOR_CHART, of_kind, render

CANARY = "sk-canary-4f1d9c0e7b2a"
WITH_SECRET_NAMES = {
    "model": {"source": "hf://acme/gated-llama"},
    "adapters": [{"name": "support", "source": "hf://acme/support-lora"}],
    "hfTokenSecretRef": {"name": "hf-token"},
    "apiKeySecretRef": {"name": "bot-keys", "key": "api-key"},
    "extra": {
        "env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]
    },
}


@pytest.mark.parametrize(
    ("chart", "values"),
    [
        (LLMSERVICE_CHART, {"apiKey": CANARY}),
        (LLMSERVICE_CHART, {"hfToken": CANARY}),
        (LLMSERVICE_CHART, {"apiKeySecretRef": {"name": "keys", "value": CANARY}}),
        (LLMSERVICE_CHART, {"hfTokenSecretRef": {"name": "hf", "token": CANARY}}),
        (OPERATOR_CHART, {"apiKey": CANARY}),
        (OPERATOR_CHART, {"hfToken": CANARY}),
    ],
    ids=[
        "llmservice-api-key",
        "llmservice-hf-token",
        "api-key-ref-value",
        "hf-ref-token",
        "operator-api-key",
        "operator-hf-token",
    ],
)
def test_no_chart_accepts_a_secret_value(chart: Any, values: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError, match="additional properties"):
        helm_python.Chart.load(chart).validate_schema(values)


def test_the_llmservice_chart_passes_names_and_the_pods_get_references() -> None:
    documents = render(LLMSERVICE_CHART, WITH_SECRET_NAMES, namespace="ml", name="bot")
    assert of_kind(documents, "Secret") == []
    (llmservice,) = documents
    assert llmservice["spec"]["apiKeySecretRef"] == {"name": "bot-keys", "key": "api-key"}
    assert llmservice["spec"]["hfTokenSecretRef"] == {"name": "hf-token"}

    children = build_children(parse_manifest(llmservice), OperatorSettings()).desired
    (deployment,) = of_kind(children, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    secret_env = {
        (container["name"], env["name"]): env["valueFrom"]["secretKeyRef"]
        for container in pod["initContainers"] + pod["containers"]
        for env in container.get("env", [])
        if "secretKeyRef" in (env.get("valueFrom") or {})
    }
    assert secret_env == {
        ("fetch-model", "HF_TOKEN"): {"name": "hf-token", "key": "token"},
        ("server", "LLM_API_KEY"): {"name": "bot-keys", "key": "api-key"},
        ("server", "HF_TOKEN"): {"name": "hf-token", "key": "token"},
        ("server", "DB_PASSWORD"): {"name": "db", "key": "password"},
    }
    literal = [
        env["name"]
        for container in pod["initContainers"] + pod["containers"]
        for env in container.get("env", [])
        if env["name"] in {"HF_TOKEN", "LLM_API_KEY", "DB_PASSWORD"} and "value" in env
    ]
    assert literal == []
    assert not [volume for volume in pod.get("volumes", []) if "secret" in volume]
    assert "LLM_API_KEY" not in json.dumps(of_kind(children, "ConfigMap")), "settings carry no key"


@pytest.mark.parametrize(
    "values",
    [{}, {"imagePullSecrets": [{"name": "registry-creds"}], "peering": {"enabled": True}}],
    ids=["default", "pull-secret"],
)
def test_the_operator_pod_gets_no_secret(values: dict[str, Any]) -> None:
    documents = render(OPERATOR_CHART, values)
    assert of_kind(documents, "Secret") == []
    (deployment,) = of_kind(documents, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    text = json.dumps(pod)
    assert "secretKeyRef" not in text and "secretRef" not in text
    assert not [volume for volume in pod.get("volumes", []) if "secret" in volume]
    assert pod.get("imagePullSecrets", []) == values.get("imagePullSecrets", [])
