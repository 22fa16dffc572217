"""No secret value reaches the operator's logs, events, status or manifests; pods get secrets by reference.

A Secret holds canary values (an API key, a Hugging Face token, one more for env) that an LLMService
references every way the CRD allows: apiKeySecretRef, hfTokenSecretRef, env valueFrom.secretKeyRef and
envFrom.secretRef. The real operator runs against the emulator with every log record captured; then the
canaries are looked for in everything the operator wrote or said, and in `render`'s output.
"""

import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from lightkube import Client
from lightkube.codecs import from_dict
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Event, Pod
from lightkube.types import PatchType

from llmservice_operator.handlers import CHILD_RESOURCES
from tests.conftest import ROOT
from tests.operator.harness import Cluster, LLMServiceResource, eventually, running_operator

SECRET = "bot-secrets"
CANARIES = {
    "api-key": f"sk-canary-{uuid.uuid4().hex}",
    "token": f"hf_canary{uuid.uuid4().hex}",
    "db-password": f"canary-password-{uuid.uuid4().hex}",
}
SPEC: dict[str, Any] = {
    "model": {"source": "hf://acme/gated-llama", "revision": "v1"},
    "adapters": [{"name": "support", "source": "hf://acme/support-lora"}],
    "replicas": 2,
    "apiKeySecretRef": {"name": SECRET},
    "hfTokenSecretRef": {"name": SECRET},
    "env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "db-password"}}}],
    "envFrom": [{"secretRef": {"name": SECRET}, "prefix": "SECRET_"}],
}
# Threads whose records are not the operator's: the emulated API server (it holds the Secret, as etcd
# would) and the test itself.
NOT_THE_OPERATOR = {"kmock", "MainThread"}


class OperatorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(threadName)s %(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName not in NOT_THE_OPERATOR:
            self.lines.append(self.format(record))  # with the traceback, if any


@pytest.fixture(scope="module")
def operator_log(cluster: Cluster) -> Iterator[OperatorLog]:
    """The real operator, every record it logs captured at DEBUG from before it starts."""
    handler = OperatorLog()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with running_operator(cluster):
            yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def manifest(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.llmservice.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": "bot", "namespace": namespace},
        "spec": SPEC,
    }


def condition(kube: Client, namespace: str, kind: str) -> dict[str, Any]:
    status = kube.get(LLMServiceResource, "bot", namespace=namespace).to_dict().get("status") or {}
    return next(item for item in status.get("conditions", []) if item["type"] == kind)


def child_objects(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    """Every object of every kind the operator writes, straight from the API (not through a typed client)."""
    objects = []
    with httpx.Client(base_url=cluster.url) as api:
        for group, version, plural in CHILD_RESOURCES.values():
            prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
            response = api.get(f"{prefix}/namespaces/{namespace}/{plural}")
            response.raise_for_status()
            objects += response.json()["items"]
    return objects


def leaked(text: str) -> list[str]:
    return [key for key, value in CANARIES.items() if value in text]


def test_no_secret_value_leaves_the_secret(
    cluster: Cluster, kube: Client, namespace: str, operator_log: OperatorLog, tmp_path: Path
) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": namespace},
        "type": "Opaque",
        "stringData": CANARIES,
    }
    kube.create(from_dict(secret), namespace=namespace)
    kube.create(LLMServiceResource(manifest(namespace)), namespace=namespace)
    deployment = eventually(lambda: kube.get(Deployment, "bot", namespace=namespace).to_dict())
    eventually(lambda: len(child_objects(cluster, namespace)) >= 4)  # ConfigMap, Service, Deployment, PDB

    # A pod that cannot start because of the secret: its message travels into status and events.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "bot-7d9c-abcde",
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "llmservice",
                "app.kubernetes.io/instance": "bot",
                "app.kubernetes.io/managed-by": "llmservice-operator",
            },
        },
        "spec": deployment["spec"]["template"]["spec"],
    }
    kube.create(from_dict(pod), namespace=namespace)
    waiting = {
        "reason": "CreateContainerConfigError",
        "message": f'couldn\'t find key api-key in Secret "{SECRET}"',
    }
    kube.patch(
        Pod.Status,
        pod["metadata"]["name"],
        {
            "status": {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": "server",
                        "image": "llm",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"waiting": waiting},
                    }
                ],
            }
        },
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    degraded = eventually(
        lambda: (c := condition(kube, namespace, "Degraded"))["reason"] == "CreateContainerConfigError" and c
    )
    assert SECRET in degraded["message"]

    # Where the operator writes and speaks.
    llmservice = kube.get(LLMServiceResource, "bot", namespace=namespace).to_dict()
    events = [event.to_dict() for event in kube.list(Event, namespace=namespace)]
    children = child_objects(cluster, namespace)
    assert {child["kind"] for child in children} >= {
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
    }
    assert any(event["reason"] == "CreateContainerConfigError" for event in events)
    # kopf logs the LLMService's body at DEBUG: the capture sees the operator handle this very object.
    assert any(SECRET in line for line in operator_log.lines), "no record of the operator handling it"
    assert leaked(json.dumps(llmservice["status"])) == []
    assert leaked(json.dumps(events)) == []
    assert leaked(json.dumps(children)) == []
    assert leaked("\n".join(operator_log.lines)) == []

    # Offline rendering of the same manifest.
    path = tmp_path / "bot.yaml"
    path.write_text(yaml.safe_dump(manifest(namespace)))
    rendered = subprocess.run(
        [sys.executable, "-m", "llmservice_operator.cli", "render", "-f", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    assert leaked(rendered.stdout + rendered.stderr) == []

    # The operator never asks for the Secret: the only call on secrets is the test's own create.
    assert cluster.emulator is not None
    assert [(call.method, call.plural) for call in cluster.emulator.log if call.plural == "secrets"] == [
        ("POST", "secrets")
    ]


def secret_references(pod_spec: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(container, env name, key) per secretKeyRef; asserts no other way of carrying a secret is used."""
    references = set()
    for container in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        for env in container.get("env", []):
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] == SECRET and "value" not in env
                references.add((container["name"], env["name"], ref["key"]))
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                assert source["secretRef"]["name"] == SECRET
                references.add((container["name"], f"{source.get('prefix', '')}*", "*"))
    assert not [
        volume for volume in pod_spec.get("volumes", []) if "secret" in volume or "projected" in volume
    ]
    return references


def test_secrets_reach_pods_only_through_secret_key_refs(
    kube: Client, namespace: str, operator_log: OperatorLog
) -> None:
    kube.create(LLMServiceResource(manifest(namespace)), namespace=namespace)
    deployment = eventually(lambda: kube.get(Deployment, "bot", namespace=namespace).to_dict())
    assert secret_references(deployment["spec"]["template"]["spec"]) == {
        ("fetch-model", "HF_TOKEN", "token"),
        ("server", "LLM_API_KEY", "api-key"),
        ("server", "HF_TOKEN", "token"),  # the server downloads hf:// adapters at run time
        ("server", "DB_PASSWORD", "db-password"),
        ("server", "SECRET_*", "*"),
    }
