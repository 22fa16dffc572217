"""One real control plane for the whole run (controlplane/): tests act as a user would, with kubectl.

The cluster is started here, not found: a test that cannot reach it fails (it never skips). Each test
gets a namespace of its own, so tests do not see each other's LLMServices.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.cluster import Cluster
from tests.conftest import _FIGURES
from tests.operator.harness import eventually

_names = (f"t{number}" for number in itertools.count())


class Kube:
    """kubectl against the test cluster, in one namespace."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace

    def run(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        result = self.cluster.kubectl("-n", self.namespace, *args, check=False, stdin=stdin)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def apply(self, manifest: dict[str, Any]) -> str:
        return self.run("apply", "-f", "-", stdin=json.dumps(manifest))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        result = self.cluster.kubectl(
            "-n", self.namespace, "get", kind, name, "-o", "json", "--show-managed-fields", check=False
        )
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return json.loads(result.stdout)

    def items(self, kind: str, *selector: str) -> list[dict[str, Any]]:
        return json.loads(self.run("get", kind, *selector, "-o", "json"))["items"]

    def condition(self, name: str, condition_type: str) -> dict[str, Any]:
        body = self.get("llms", name) or {}
        conditions = (body.get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == condition_type), {})

    def wait_for_reason(self, name: str, reason: str, condition_type: str = "Ready") -> dict[str, Any]:
        """The LLMService's condition once it gives `reason`."""
        return eventually(
            lambda: (c := self.condition(name, condition_type)).get("reason") == reason and c, timeout=60
        )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(root / "state", outlive_caller=False)  # a killed run leaves nothing running
    seconds = cluster.up()
    _FIGURES.append(("cluster", f"real control plane, start to operator ready: {seconds:.1f} s"))
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture()
def kube(cluster: Cluster) -> Iterator[Kube]:
    namespace = next(_names)
    cluster.kubectl("create", "namespace", namespace)
    yield Kube(cluster, namespace)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def llmservice(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "serving.llmservice.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name},
        "spec": {"model": {"source": "hf://acme/llama"}, **spec},
    }
