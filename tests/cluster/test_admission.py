"""The CRD on a real API server: established, and every case of the CRD tests judged by the server itself
(schema, list-map keys and CEL), with a refusal that names the field."""

import json

import pytest

from tests.cluster.conftest import Kube
from tests.operator.test_crd import INVALID_CASES, VALID_CASES, InvalidCase, ValidCase


def dry_run(kube: Kube, manifest: dict) -> tuple[int, str]:
    manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": kube.namespace}}
    result = kube.cluster.kubectl(
        "create", "--dry-run=server", "-f", "-", check=False, stdin=json.dumps(manifest)
    )
    return result.returncode, result.stderr


def test_the_crd_is_established(kube: Kube) -> None:
    crd = json.loads(
        kube.cluster.kubectl("get", "crd", "llmservices.serving.llmservice.io", "-o", "json").stdout
    )
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert "llms" in crd["status"]["acceptedNames"]["shortNames"]


@pytest.mark.parametrize("case", VALID_CASES, ids=[case.name for case in VALID_CASES])
def test_the_api_server_accepts(kube: Kube, case: ValidCase) -> None:
    code, stderr = dry_run(kube, case.manifest)
    assert code == 0, stderr


@pytest.mark.parametrize("case", INVALID_CASES, ids=[case.name for case in INVALID_CASES])
def test_the_api_server_rejects_naming_the_field(kube: Kube, case: InvalidCase) -> None:
    code, stderr = dry_run(kube, case.manifest)
    assert code != 0, f"accepted: {case.name}"
    assert "is invalid" in stderr, stderr
    assert case.field in stderr, stderr
