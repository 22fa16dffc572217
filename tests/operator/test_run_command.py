"""`llmservice-operator run` as a process: it reconciles, and serves kopf's liveness probe and /metrics."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
from lightkube.resources.apps_v1 import Deployment

from tests.conftest import ROOT
from tests.inference.harness import free_port
from tests.operator.harness import Cluster, LLMServiceResource, eventually


def test_run_serves_liveness_and_metrics_and_reconciles(cluster: Cluster, tmp_path: Path) -> None:
    liveness, metrics = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": cluster.kubeconfig(str(tmp_path)),
        "LLMSERVICE_METRICS_PORT": str(metrics),
        # All namespaces: kmock 0.8 cannot serve the namespace listing kopf needs to watch a named set.
        "LLMSERVICE_WATCH_NAMESPACES": "",
        "LLMSERVICE_LOG_FORMAT": "json",
    }
    command = [
        sys.executable,
        "-m",
        "llmservice_operator.cli",
        "run",
        "--standalone",
        "--liveness",
        f"http://127.0.0.1:{liveness}/healthz",
    ]
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert eventually(lambda: _ok(f"http://127.0.0.1:{liveness}/healthz"), timeout=30, interval=0.2)

        kube = cluster.client()
        kube.create(
            LLMServiceResource(
                {
                    "apiVersion": "serving.llmservice.io/v1alpha1",
                    "kind": "LLMService",
                    "metadata": {"name": "cli-bot", "namespace": "cli-run"},
                    "spec": {"model": {"source": "file:///models/tiny"}, "gpus": 0},
                }
            ),
            namespace="cli-run",
        )
        deployment = eventually(lambda: kube.get(Deployment, "cli-bot", namespace="cli-run"), timeout=30)
        assert deployment.spec.template.spec.containers[0].image == "ghcr.io/llmservice/inference:0.1.0"

        text = eventually(lambda: _text(f"http://127.0.0.1:{metrics}/metrics"), timeout=10)
        assert 'llmservice_operator_reconciles_total{result="ok",trigger="change"}' in text
        assert 'llmservice_operator_child_writes_total{action="created",kind="Deployment"}' in text
    except AssertionError:
        process.terminate()
        raise AssertionError(f"operator output:\n{process.communicate(timeout=30)[0][-5000:]}") from None
    process.terminate()
    output, _ = process.communicate(timeout=30)
    assert process.returncode in (0, -15), output
    assert '"message":' in output, "JSON log lines"
    assert '"severity": "debug"' not in output, "info level by default"


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _text(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return response.text if "llmservice_operator_child_writes_total{" in response.text else None
