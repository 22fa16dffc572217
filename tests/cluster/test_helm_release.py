"""The chart's release on a real control plane: `helm upgrade` reaches the CRD (a template, not crds/),
and `helm uninstall` keeps the CRD, kopf's peering CRDs and every LLMService with its children; the
release installs again over what was kept and the operator carries on.

Both tests change the session's release and put it back before they end, pass or fail."""

import json
import shutil
import subprocess
from pathlib import Path

from controlplane.cluster import CHART, OPERATOR_NAMESPACE, RELEASE, Cluster
from tests.cluster.conftest import Kube, llmservice
from tests.cluster.test_lifecycle import owned_by, printed_columns
from tests.operator.harness import eventually

CRD = "llmservices.serving.llmservice.io"
PEERING_CRDS = ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")
LAST_COLUMN = """\
        - name: Age
          type: date
          jsonPath: .metadata.creationTimestamp
"""
EXTRA_COLUMN = """\
        - name: Generation
          type: integer
          jsonPath: .metadata.generation
"""


def helm(cluster: Cluster, *args: str) -> str:
    result = cluster.helm(*args, check=False)
    assert result.returncode == 0, f"helm {' '.join(args)} failed: {result.stderr.strip()}"
    return result.stdout


def upgrade(cluster: Cluster, chart: Path) -> None:
    """With the values `Cluster.install_chart` installs with."""
    helm(cluster, "upgrade", RELEASE, str(chart), "-n", OPERATOR_NAMESPACE, "--set", "replicaCount=0")


def crd(cluster: Cluster, name: str = CRD) -> dict | None:
    result = cluster.kubectl("get", "crd", name, "-o", "json", check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    return json.loads(result.stdout)


def column_names(cluster: Cluster) -> list[str]:
    body = crd(cluster)
    assert body is not None
    (version,) = body["spec"]["versions"]
    return [column["name"] for column in version["additionalPrinterColumns"]]


def established(body: dict | None) -> bool:
    conditions = (body or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def test_helm_upgrade_changes_the_crd(kube: Kube, tmp_path: Path) -> None:
    cluster = kube.cluster
    chart = tmp_path / CHART.name
    shutil.copytree(CHART, chart)
    template = chart / "templates" / "crd-llmservices.yaml"
    text = template.read_text()
    assert text.count(LAST_COLUMN) == 1, "the CRD template's last printer column moved: update this test"
    template.write_text(text.replace(LAST_COLUMN, LAST_COLUMN + EXTRA_COLUMN))
    kube.apply(llmservice("bot", gpus=0))
    before = column_names(cluster)
    assert "Generation" not in before

    try:
        upgrade(cluster, chart)
        assert column_names(cluster) == [*before, "Generation"]
        # What a user sees once the API server serves the new version of the CRD.
        eventually(
            lambda: printed_columns(kube.run("get", "llms", "bot")).get("GENERATION") == "1", timeout=30
        )
    finally:
        upgrade(cluster, CHART)
    assert column_names(cluster) == before
    eventually(lambda: "GENERATION" not in printed_columns(kube.run("get", "llms", "bot")), timeout=30)


def test_helm_uninstall_keeps_the_crds_and_the_llmservices(kube: Kube) -> None:
    cluster = kube.cluster
    kube.apply(llmservice("kept", gpus=0))
    deployment = eventually(lambda: kube.get("deployment", "kept"), timeout=60)
    service_account = ("serviceaccount", RELEASE, "-n", OPERATOR_NAMESPACE)

    # helm uninstall deletes the operator's Deployment; here the local process stands in for it.
    cluster.stop_process("operator")
    try:
        uninstall = helm(
            cluster, "uninstall", RELEASE, "-n", OPERATOR_NAMESPACE, "--wait", "--timeout", "60s"
        )
        assert "kept due to the resource policy" in uninstall, uninstall
        assert f"[CustomResourceDefinition] {CRD}" in uninstall, uninstall
        gone = cluster.kubectl("get", *service_account, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr, gone.stdout  # the release is gone

        kept = crd(cluster)
        assert established(kept), kept
        for name in PEERING_CRDS:
            assert established(crd(cluster, name)), name
        owner = kube.get("llms", "kept")
        assert owner is not None
        child = kube.get("deployment", "kept")
        assert child is not None
        assert child["metadata"]["uid"] == deployment["metadata"]["uid"]
        assert owned_by(child, owner)

        # Helm adopts what it kept: the CRD still names this release, so installing it again succeeds.
        annotations = kept["metadata"]["annotations"]
        assert annotations["meta.helm.sh/release-name"] == RELEASE
        assert annotations["meta.helm.sh/release-namespace"] == OPERATOR_NAMESPACE
        try:
            cluster.install_chart()
        except subprocess.CalledProcessError as error:
            raise AssertionError(f"helm install over the kept CRD failed: {error.stderr}") from error
        assert crd(cluster)["metadata"]["uid"] == kept["metadata"]["uid"]
    finally:
        if cluster.helm("status", RELEASE, "-n", OPERATOR_NAMESPACE, check=False).returncode != 0:
            cluster.install_chart()
        # A new ServiceAccount: the old one's token is refused, so the operator logs in with a new one.
        cluster.start_operator()

    kube.run("scale", "llms/kept", "--replicas=2")
    kube.run("wait", "llms/kept", "--for=jsonpath={.status.readyReplicas}=2", "--timeout=60s")
    kube.run("wait", "llms/kept", "--for=condition=Ready", "--timeout=60s")
    assert kube.get("deployment", "kept")["metadata"]["uid"] == deployment["metadata"]["uid"]


def hook_era_chart(root: Path) -> Path:
    """The shape of the chart before kopf's peering CRDs moved to crds/: both CRDs release templates, the
    peering object a post-install hook (so no release owns it)."""
    chart = root / "llmservice-operator"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: llmservice-operator\nversion: 0.0.9\n")
    for name in ("kopf.dev_clusterkopfpeerings.yaml", "kopf.dev_kopfpeerings.yaml"):
        shutil.copy(CHART / "crds" / name, chart / "templates" / name)
    # Behind a value: a first install cannot create it (Helm maps the hook's kind before the CRD exists).
    (chart / "templates" / "peering.yaml").write_text(
        "{{- if .Values.hook }}\napiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata:\n"
        "  name: {{ .Release.Name }}-llmservice-operator\n  annotations:\n"
        "    helm.sh/hook: post-install,post-upgrade\n"
        "    helm.sh/hook-delete-policy: before-hook-creation\n{{- end }}\n"
    )
    return chart


def crds_present(cluster: Cluster) -> set[str]:
    names = cluster.kubectl("get", "crd", "-o", "name").stdout.split()
    return {name.removeprefix("customresourcedefinition.apiextensions.k8s.io/") for name in names}


def test_an_upgrade_from_the_hook_era_chart_keeps_the_shared_peering_crds(
    cluster: Cluster, kube: Kube, tmp_path: Path
) -> None:
    """Upgrading drops the CRD templates from the release: Helm would delete them for every kopf
    operator in the cluster. The chart keeps them, and says how to hand the hook's object over."""
    release, namespace = "peered", kube.namespace
    for crd in PEERING_CRDS:  # as on a cluster that never had this chart's crds/
        cluster.kubectl("delete", "crd", crd, "--wait=true")
    try:
        old_chart = str(hook_era_chart(tmp_path))
        helm(cluster, "install", release, old_chart, "-n", namespace)
        helm(cluster, "upgrade", release, old_chart, "-n", namespace, "--set", "hook=true")
        kube.run(
            "create",
            "-f",
            "-",
            stdin=json.dumps(
                {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "another-operator"}}
            ),
        )
        values = ["--set", "peering.enabled=true,crds.enabled=false,replicaCount=0"]
        refused = cluster.helm("upgrade", release, str(CHART), "-n", namespace, *values, check=False)
        assert refused.returncode != 0
        assert "created by an older chart's hook" in refused.stderr
        handover = refused.stderr.split("hand it to this release first: ")[1].strip().strip('"')
        for command in handover.split(" && "):
            assert cluster.kubectl(*command.split()[1:], check=False).returncode == 0, command
        helm(cluster, "upgrade", release, str(CHART), "-n", namespace, *values)
        assert set(PEERING_CRDS) <= crds_present(cluster)
        assert kube.get("kopfpeering", "another-operator") is not None
        helm(cluster, "uninstall", release, "-n", namespace, "--wait")
        assert set(PEERING_CRDS) <= crds_present(cluster)
    finally:
        cluster.helm("uninstall", release, "-n", namespace, check=False)
        for crd in PEERING_CRDS:  # back as the session's release installed them, from its crds/
            if crd not in crds_present(cluster):
                cluster.kubectl("apply", "-f", str(CHART / "crds" / f"kopf.dev_{crd.split('.')[0]}.yaml"))
