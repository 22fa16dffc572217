"""The CLI as a user runs it: `llmservice-operator render` and `run --help`."""

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from llmservice_operator.cli import replica_identity, replica_priority
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


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_every_example_renders(example: Path) -> None:
    result = run("render", "-f", str(example.relative_to(ROOT)))
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout)]
    assert kinds[:3] == ["ConfigMap", "Service", "Deployment"]


def test_render_serves_an_embedding_model_autoscaled_without_adapters() -> None:
    result = run("render", "-f", "examples/embeddings.yaml")
    assert result.returncode == 0, result.stderr
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout)}
    data = documents["ConfigMap"]["data"]
    assert (data["LLM_TASK"], data["LLM_DEVICE"]) == ("embed", "cpu")
    assert "LLM_ADAPTERS" not in data
    assert documents["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "embeddings"
    (init,) = documents["Deployment"]["spec"]["template"]["spec"]["initContainers"]
    assert init["args"][:3] == ["download", "--source", "hf://sentence-transformers/all-MiniLM-L6-v2"]


def test_render_prints_no_yaml_anchors() -> None:
    """The init containers and the server share one securityContext object; reviewers diff this output."""
    result = run("render", "-f", "examples/support-bot.yaml")
    assert result.returncode == 0, result.stderr
    assert "&id" not in result.stdout and "*id" not in result.stdout
    pod = list(yaml.safe_load_all(result.stdout))[2]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["securityContext"] == pod["containers"][0]["securityContext"]


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
    assert {path.name for path in EXAMPLES} >= {"demo-cpu.yaml", "embeddings.yaml", "support-bot.yaml"}
    for example in EXAMPLES:
        for document in yaml.safe_load_all(example.read_text()):
            assert "namespace" not in document["metadata"], example.name


NO_PASSWD_UID = 4242


def _interpreter_for(uid: int) -> str:
    """This interpreter, or where `uid` may not run it (a pyenv under /root) the system's of its version."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin")):
        if candidate is None:
            continue
        try:
            subprocess.run(
                [candidate, "-c", ""], user=uid, group=uid, extra_groups=[], check=True, timeout=30
            )
        except (PermissionError, subprocess.CalledProcessError):
            continue
        return candidate
    pytest.fail(f"no {version} that UID {uid} may run (Debian's python3.11 is on the project's machines)")


def test_the_cli_needs_no_passwd_entry_nor_home() -> None:
    """OpenShift runs images as a UID from the namespace's range: no passwd entry, no writable HOME."""
    # Tests run as root on the project's machines and in CI; elsewhere this fails rather than skips.
    assert os.geteuid() == 0, "switching to a UID without a passwd entry needs root"
    with pytest.raises(KeyError):
        pwd.getpwuid(NO_PASSWD_UID)
    unset = {"HOME", "USER", "LOGNAME", "LNAME", "USERNAME", "POD_ID"}
    env = {name: value for name, value in os.environ.items() if name not in unset}
    # The package and its dependencies from this environment, whichever interpreter runs them.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator"), sysconfig.get_paths()["purelib"]])
    interpreter = _interpreter_for(NO_PASSWD_UID)
    commands = (
        ["-m", "llmservice_operator.cli", "render", "-f", "examples/demo-cpu.yaml"],
        ["-m", "llmservice_operator.cli", "run", "--help"],
        # What `run` hands kopf, which would otherwise ask getpass for a login name and fail.
        ["-c", "from llmservice_operator.cli import replica_identity; print(replica_identity())"],
    )
    for args in commands:
        result = subprocess.run(
            [interpreter, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            user=NO_PASSWD_UID,
            group=NO_PASSWD_UID,
            extra_groups=[],
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout
    assert result.stdout.startswith(f"uid-{NO_PASSWD_UID}@")


def test_kopf_names_the_replica_itself_where_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_ID", "llmservice-operator-7d9f-abcde")
    assert replica_identity() is None
    monkeypatch.delenv("POD_ID")
    monkeypatch.setenv("USER", "dev")
    assert replica_identity() is None
