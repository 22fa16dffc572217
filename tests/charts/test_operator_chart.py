"""charts/llmservice-operator: lint, render, schema-validate, CRD sync, RBAC and Pod Security."""

import json
from typing import Any

import helm_python
import pytest
import yaml
from helm_python import _native

from llmservice_operator.builders import build_children
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import parse_manifest
from tests.charts.pss import restricted_violations
from tests.charts.rendering import (
    CUSTOM_KINDS,
    KUBE_VERSIONS,
    OPERATOR_CHART,
    lint_errors,
    of_kind,
    render,
    schema_errors,
)
from tests.conftest import ROOT
from tools.sync_chart_crds import render as crd_template

VARIANTS = {
    "default": {},
    "namespaced": {"watch": {"namespaces": ["team-a", "team-b"]}},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "modelMetrics": {"podMonitor": {"enabled": True}},
        "prometheusAdapter": {"rules": {"enabled": True}},
    },
    "peering": {"peering": {"enabled": True}, "replicaCount": 2},
    "custom-image": {
        "image": {"repository": "registry.example/ops/llm-operator", "tag": "1.2.3", "pullPolicy": "Always"},
        "inferenceImage": "registry.example/llm:cpu",
    },
    "crds-off": {"crds": {"enabled": False}},
    "names": {"nameOverride": "llmops", "fullnameOverride": "llm-operator"},
    "openshift": {"platform": "openshift"},
}
OPENSHIFT_API = "security.openshift.io/v1"


def render_with_api_versions(values: dict[str, Any], api_versions: list[str]) -> list[dict[str, Any]]:
    """`helm template --api-versions`: Chart.render does not pass them, the C library's helm_render does."""
    options = {"name": "llmservice-operator", "namespace": "llm-system", "is_install": True}
    with helm_python.Chart.load(OPERATOR_CHART) as chart:
        rendered = _native.call_string(
            "helm_render",
            chart._raw(),
            json.dumps(values),
            json.dumps({**options, "api_versions": api_versions}),
        )
    return [
        document
        for path, text in sorted(json.loads(rendered).items())
        if not path.endswith("NOTES.txt")
        for document in yaml.safe_load_all(text)
        if document
    ]


def operator_pod(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = of_kind(documents, "Deployment")
    return deployment["spec"]["template"]["spec"]


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_lints_clean(values: dict[str, Any]) -> None:
    assert lint_errors(OPERATOR_CHART, values) == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_object_validates_against_kubernetes_schemas(values: dict[str, Any], version: str) -> None:
    documents = render(OPERATOR_CHART, values)
    builtin = [document for document in documents if document["kind"] not in CUSTOM_KINDS]
    assert [error for document in builtin if (error := schema_errors(document, version))] == []


def test_default_install() -> None:
    documents = render(OPERATOR_CHART, {})
    kinds = sorted(document["kind"] for document in documents)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Deployment",
            "Service",
            "Pod",
        ]
    )
    (deployment,) = of_kind(documents, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/llmservice/operator:0.1.0"
    assert container["args"] == [
        "run",
        "--liveness=http://0.0.0.0:8081/healthz",
        "--all-namespaces",
        "--standalone",
    ]
    env = {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}
    assert env == {
        "POD_ID": {"fieldRef": {"fieldPath": "metadata.name"}},
        "LLMSERVICE_OPERATOR_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        "LLMSERVICE_PLATFORM": "kubernetes",
        "LLMSERVICE_INFERENCE_IMAGE": "ghcr.io/llmservice/inference:0.1.0",
        "LLMSERVICE_HPA_METRIC_NAME": "llmservice_in_flight_requests",
        "LLMSERVICE_LOG_LEVEL": "info",
        "LLMSERVICE_LOG_FORMAT": "json",
        "LLMSERVICE_METRICS_PORT": "8080",
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    (test_pod,) = of_kind(documents, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"


def test_namespaced_mode_uses_a_role_per_namespace() -> None:
    documents = render(OPERATOR_CHART, VARIANTS["namespaced"])
    assert {(role["metadata"]["namespace"]) for role in of_kind(documents, "Role")} == {"team-a", "team-b"}
    assert {(binding["metadata"]["namespace"]) for binding in of_kind(documents, "RoleBinding")} == {
        "team-a",
        "team-b",
    }
    assert [role["metadata"]["name"] for role in of_kind(documents, "ClusterRole")] == [
        "llmservice-operator-framework"
    ]
    args = of_kind(documents, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_peering_installs_kopf_peering_and_passes_it() -> None:
    documents = render(OPERATOR_CHART, VARIANTS["peering"])
    args = of_kind(documents, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=llmservice-operator" in args and "--standalone" not in args
    # kopf's shared peering CRDs come from the chart's crds/ folder (test_peering.py), not the release.
    crds = {crd["metadata"]["name"] for crd in of_kind(documents, "CustomResourceDefinition")}
    assert crds == {"llmservices.serving.llmservice.io"}
    (peering,) = of_kind(documents, "ClusterKopfPeering")
    assert "annotations" not in peering["metadata"]


def test_monitoring_objects() -> None:
    documents = render(OPERATOR_CHART, VARIANTS["monitoring"])
    (monitor,) = of_kind(documents, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    (pods,) = of_kind(documents, "PodMonitor")
    assert pods["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "llmservice-operator"
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    (rules,) = [
        cm for cm in of_kind(documents, "ConfigMap") if cm["metadata"]["name"].endswith("adapter-rules")
    ]
    adapter = yaml.safe_load(rules["data"]["config.yaml"])["rules"][0]
    assert adapter["name"]["as"] == "llmservice_in_flight_requests"
    assert "vllm:num_requests_waiting" in adapter["metricsQuery"]


def test_crds_off_and_custom_image() -> None:
    assert of_kind(render(OPERATOR_CHART, VARIANTS["crds-off"]), "CustomResourceDefinition") == []
    documents = render(OPERATOR_CHART, VARIANTS["custom-image"])
    container = of_kind(documents, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert (container["image"], container["imagePullPolicy"]) == (
        "registry.example/ops/llm-operator:1.2.3",
        "Always",
    )
    assert {"name": "LLMSERVICE_INFERENCE_IMAGE", "value": "registry.example/llm:cpu"} in container["env"]


def test_the_chart_crd_is_the_crds_dir() -> None:
    source = (ROOT / "crds" / "serving.llmservice.io_llmservices.yaml").read_text()
    template = OPERATOR_CHART / "templates" / "crd-llmservices.yaml"
    assert template.read_text() == crd_template(source), "run `make chart-crds`"
    (rendered,) = of_kind(render(OPERATOR_CHART, {}), "CustomResourceDefinition")
    assert rendered == yaml.safe_load(source)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"unknownKey": 1}, "additional properties 'unknownKey' not allowed"),
        ({"image": {"repository": "x", "tagg": "1"}}, "additional properties 'tagg' not allowed"),
        ({"replicaCount": 3}, "value must be true"),
        ({"logLevel": "verbose"}, "logLevel"),
        ({"watch": {"namespaces": ["Not_A_Namespace"]}}, "namespaces"),
        ({"platform": "okd"}, "platform"),
    ],
)
def test_values_schema_rejects(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=message):
        helm_python.Chart.load(OPERATOR_CHART).validate_schema(values)


def test_openshift_fixes_no_uid_on_the_operator_pod_and_tells_the_operator() -> None:
    """restricted-v2 assigns UID and GID from the namespace's range and refuses pods fixing them outside."""
    pod = operator_pod(render(OPERATOR_CHART, VARIANTS["openshift"]))
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert {"name": "LLMSERVICE_PLATFORM", "value": "openshift"} in pod["containers"][0]["env"]
    kubernetes = operator_pod(render(OPERATOR_CHART, {}))["securityContext"]
    assert (kubernetes["runAsUser"], kubernetes["runAsGroup"]) == (1000, 1000)


@pytest.mark.parametrize(
    ("values", "api_versions", "platform"),
    [
        ({}, [OPENSHIFT_API], "openshift"),
        ({}, ["example.com/v1"], "kubernetes"),
        ({"platform": "kubernetes"}, [OPENSHIFT_API], "kubernetes"),
    ],
    ids=["detected", "not-openshift", "value-wins"],
)
def test_the_platform_is_detected_by_the_openshift_api(
    values: dict[str, Any], api_versions: list[str], platform: str
) -> None:
    pod = operator_pod(render_with_api_versions(values, api_versions))
    assert {"name": "LLMSERVICE_PLATFORM", "value": platform} in pod["containers"][0]["env"]
    assert ("runAsUser" in pod["securityContext"]) is (platform == "kubernetes")


def test_operator_pod_meets_the_restricted_profile() -> None:
    for values in VARIANTS.values():
        for document in of_kind(render(OPERATOR_CHART, values), "Deployment"):
            assert restricted_violations(document["spec"]["template"]["spec"]) == []
        for pod in of_kind(render(OPERATOR_CHART, values), "Pod"):
            assert restricted_violations(pod["spec"]) == []


@pytest.mark.parametrize("example", ["support-bot.yaml", "demo-cpu.yaml"])
def test_inference_pods_meet_the_restricted_profile_and_validate(example: str) -> None:
    manifest = yaml.safe_load((ROOT / "examples" / example).read_text())
    for platform in ("kubernetes", "openshift"):
        children = build_children(parse_manifest(manifest), OperatorSettings(platform=platform)).desired
        (deployment,) = [child for child in children if child["kind"] == "Deployment"]
        assert restricted_violations(deployment["spec"]["template"]["spec"]) == []
        for version in KUBE_VERSIONS:
            assert [error for child in children if (error := schema_errors(child, version))] == []


def test_a_pvc_sourced_inference_pod_is_still_restricted() -> None:
    manifest = {
        "apiVersion": "serving.llmservice.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": "p"},
        "spec": {"model": {"source": "pvc://weights/llama"}, "cache": {"claimName": "cache"}},
    }
    pod = next(
        c
        for c in build_children(parse_manifest(manifest), OperatorSettings()).desired
        if c["kind"] == "Deployment"
    )["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []


def test_name_overrides_name_every_object() -> None:
    documents = render(OPERATOR_CHART, VARIANTS["names"])
    (deployment,) = of_kind(documents, "Deployment")
    assert deployment["metadata"]["name"] == "llm-operator"
    assert deployment["metadata"]["labels"]["app.kubernetes.io/name"] == "llmops"
    assert of_kind(documents, "ServiceAccount")[0]["metadata"]["name"] == "llm-operator"


def test_openshift_fixes_no_uid_in_any_pod() -> None:
    """The operator's pod and `helm test`'s: restricted-v2 assigns UID, GID and fsGroup itself."""
    documents = render(OPERATOR_CHART, VARIANTS["openshift"])
    pods = [d["spec"]["template"]["spec"] for d in of_kind(documents, "Deployment")]
    pods += [d["spec"] for d in of_kind(documents, "Pod")]
    assert len(pods) == 2
    for pod in pods:
        contexts = [
            pod.get("securityContext") or {},
            *(c.get("securityContext") or {} for c in pod["containers"]),
        ]
        assert [key for c in contexts for key in ("runAsUser", "runAsGroup", "fsGroup") if key in c] == []
