"""Render the charts with Helm's own Go library (helm-python-sdk) and validate what comes out."""

from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import yaml

from tests.conftest import ROOT

OPERATOR_CHART = ROOT / "charts" / "llmservice-operator"
LLMSERVICE_CHART = ROOT / "charts" / "llmservice"
# The oldest Kubernetes the charts support (Chart.yaml kubeVersion) and the newest schemas available.
KUBE_VERSIONS = ("1.27", "1.37")
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "KopfPeering", "ClusterKopfPeering", "LLMService"}


def render(
    chart: Path, values: dict[str, Any], namespace: str = "llm-system", name: str = "llmservice-operator"
) -> list[dict[str, Any]]:
    rendered = helm_python.Chart.load(chart).render(values, name=name, namespace=namespace, is_install=True)
    documents = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        documents += [document for document in yaml.safe_load_all(text) if document]
    return documents


def lint_errors(chart: Path, values: dict[str, Any]) -> list[str]:
    report = helm_python.lint(chart, values, strict=True, kube_version="v1.27.0")
    return list(report["errors"])


def schema_errors(document: dict[str, Any], version: str) -> str | None:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{document['kind']}/{document['metadata']['name']}: {error.message}"
    return None


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [document for document in documents if document["kind"] == kind]
