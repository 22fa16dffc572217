"""kopf peering in charts/llmservice-operator: shared CRDs no release owns, and a peering object that stays.

kopf's peering CRDs are the same for every kopf-based operator in a cluster, so they sit in the chart's
crds/: Helm creates them on install where missing (and waits until they are established before it builds
the templates), skips them where present, and never upgrades or deletes them. The release renders only
what it owns, among which is its peering object: a plain resource, so an upgrade or sync patches it in
place instead of deleting and recreating it as a hook would (while it is missing, every replica is active).
"""

from typing import Any

import helm_python
import pytest
import yaml

from tests.charts.rendering import KUBE_VERSIONS, OPERATOR_CHART, of_kind, render, schema_errors

KOPF_CRDS = {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
PEERING_KINDS = ("ClusterKopfPeering", "KopfPeering")
GITOPS_KEEP = {
    "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
    "kustomize.toolkit.fluxcd.io/prune": "disabled",
}
VARIANTS = {
    "cluster": {"peering": {"enabled": True}, "replicaCount": 2},
    "namespaced": {
        "peering": {"enabled": True},
        "replicaCount": 2,
        "watch": {"namespaces": ["team-a", "team-b"]},
    },
}


def chart_crds() -> list[dict[str, Any]]:
    """What `helm install` creates from crds/ before the release (and `helm show crds` prints)."""
    with helm_python.Chart.load(OPERATOR_CHART) as chart:
        return [document for crd in chart.crds for document in yaml.safe_load_all(crd["data"]) if document]


def peering_objects(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [document for kind in PEERING_KINDS for document in of_kind(documents, kind)]


def identities(documents: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (document["kind"], document["metadata"].get("namespace", ""), document["metadata"]["name"])
        for document in documents
    }


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_peering_object_is_a_release_resource_not_a_hook(values: dict[str, Any]) -> None:
    objects = peering_objects(render(OPERATOR_CHART, values, name="ops"))
    expected = 2 if values.get("watch") else 1
    assert len(objects) == expected
    for peering in objects:
        hook_annotations = [
            key for key in peering["metadata"].get("annotations", {}) if key.startswith("helm.sh/")
        ]
        assert hook_annotations == [], f"{peering['kind']}/{peering['metadata']['name']} is a hook"
        assert peering["metadata"]["name"] == "ops-llmservice-operator"
        assert peering["metadata"]["labels"]["app.kubernetes.io/instance"] == "ops"


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_release_renders_no_kopf_crd(values: dict[str, Any]) -> None:
    rendered = {
        crd["metadata"]["name"] for crd in of_kind(render(OPERATOR_CHART, values), "CustomResourceDefinition")
    }
    assert rendered & KOPF_CRDS == set()


def test_the_kopf_crds_are_in_crds_as_plain_manifests() -> None:
    crds = chart_crds()
    assert {crd["metadata"]["name"] for crd in crds} == KOPF_CRDS
    for crd in crds:
        # Nothing ties them to a release (no labels), and GitOps tools that render crds/ never prune them.
        assert set(crd["metadata"]) == {"name", "annotations"}
        assert crd["metadata"]["annotations"] == GITOPS_KEEP
    # Helm does not template crds/: a directive there would reach the API server as it is.
    with helm_python.Chart.load(OPERATOR_CHART) as chart:
        assert [crd["name"] for crd in chart.crds if "{{" in crd["data"]] == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_kopf_crds_validate_against_kubernetes_schemas(version: str) -> None:
    crds = chart_crds()
    assert len(crds) == len(KOPF_CRDS)
    assert [error for crd in crds if (error := schema_errors(crd, version))] == []


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_peering_object_has_its_crd_in_crds(values: dict[str, Any]) -> None:
    served = {
        (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"]): crd["spec"]["scope"]
        for crd in chart_crds()
        for version in crd["spec"]["versions"]
        if version["served"]
    }
    for peering in peering_objects(render(OPERATOR_CHART, values)):
        scope = served.get((peering["apiVersion"], peering["kind"]))
        assert scope == ("Namespaced" if "namespace" in peering["metadata"] else "Cluster"), peering


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_two_releases_own_no_object_in_common(values: dict[str, Any]) -> None:
    # The second release leaves the LLMService CRD (one per cluster, owned by the first) to the first.
    first = render(OPERATOR_CHART, values, name="first")
    second = render(OPERATOR_CHART, {**values, "crds": {"enabled": False}}, name="second")
    assert identities(first) & identities(second) == set()
    assert len(peering_objects(first)) == len(peering_objects(second)) > 0
