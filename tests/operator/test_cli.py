"""The CLI as a user runs it: `llmservice-operator render` and `run --help`."""

import subprocess
import sys
from pathlib import Path

import yaml

from llmservice_operator.cli import replica_priority
from tests.conftest import ROOT

CLI = [sys.executable, "-m", "llmservice_operator.cli"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_render_prints_the_children_as_a_yaml_stream() -> None:
    result = run("render", "-f", "examples/support-bot.yaml")
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    assert [(doc["kind"], doc["metadata"]["name"]) for doc in documents] == [
        ("ConfigMap", "support-bot-config"),
        ("Service", "support-bot"),
        ("Deployment", "support-bot"),
        ("HorizontalPodAutoscaler", "support-bot"),
        ("PodDisruptionBudget", "support-bot"),
    ]
    assert all("ownerReferences" not in doc["metadata"] for doc in documents)


def test_render_takes_several_documents_and_a_namespace_from_stdin(tmp_path: Path) -> None:
    manifest = (ROOT / "examples" / "support-bot.yaml").read_text()
    second = manifest.replace("name: support-bot", "name: other-bot")
    result = run("render", "-f", "-", "--namespace", "ml", stdin=manifest + "---\n" + second)
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    assert {doc["metadata"]["namespace"] for doc in documents} == {"ml"}
    assert len(documents) == 10


def test_render_rejects_an_invalid_spec_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: serving.llmservice.io/v1alpha1\nkind: LLMService\nmetadata: {name: bot}\n"
        "spec: {model: {source: 'hf://a/b'}, autoscaling: {minReplicas: 3, maxReplicas: 1}, gpus: 12}\n"
    )
    result = run("render", "-f", str(bad))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "LLMService 'bot'" in result.stderr
    assert "spec.gpus: Input should be less than or equal to 8" in result.stderr
    assert (
        "spec.autoscaling: autoscaling.minReplicas must not exceed autoscaling.maxReplicas" in result.stderr
    )


def test_render_rejects_what_is_not_an_llmservice(tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    result = run("render", "-f", str(other))
    assert result.returncode == 1
    assert "expected serving.llmservice.io/v1alpha1 LLMService" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    assert "not valid YAML" in run("render", "-f", str(broken)).stderr


def test_run_passes_kopf_options_through() -> None:
    result = run("run", "--help")
    assert result.returncode == 0
    for option in (
        "--namespace",
        "--all-namespaces",
        "--standalone",
        "--peering",
        "--priority",
        "--liveness",
    ):
        assert option in result.stdout


def test_replicas_with_peering_draw_their_own_priority() -> None:
    """Two replicas of one Deployment get the same args: with the same priority kopf would pause both."""
    drawn = {replica_priority(None, peering=True) for _ in range(20)}
    assert len(drawn) == 20 and all(priority > 0 for priority in drawn)
    assert replica_priority(7, peering=True) == 7
    assert replica_priority(None, peering=False) is None


def test_the_examples_name_no_namespace_so_kubectl_n_places_them() -> None:
    """The README applies them with `kubectl -n llm apply -f`: a namespace in the file would be refused."""
    for example in (ROOT / "examples").glob("*.yaml"):
        for document in yaml.safe_load_all(example.read_text()):
            assert "namespace" not in document["metadata"], example.name
