"""The command line of each control-plane process, as pure functions of the cluster's layout."""

from dataclasses import dataclass
from pathlib import Path

SERVICE_CIDR = "10.96.0.0/16"  # holds pki.SERVICE_IP
# Loopback: kwok's pods get addresses this machine answers on, so a test can run a real server as a
# pod (tests/cluster/pod_processes.py binds one to each pod's IP).
POD_CIDR = "127.244.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Layout:
    """Where one cluster keeps its state, and the loopback ports its processes listen on."""

    root: Path
    bin: Path
    etcd_port: int
    etcd_peer_port: int
    apiserver_port: int
    controller_manager_port: int
    scheduler_port: int
    kwok_port: int

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (group system:masters)."""
        return self.root / "kubeconfig"

    @property
    def operator_kubeconfig(self) -> Path:
        """The operator's: a token of the chart's ServiceAccount, so the chart's RBAC applies."""
        return self.root / "operator.kubeconfig"

    @property
    def audit_log(self) -> Path:
        """One JSON line per request the operator's ServiceAccount makes (see kube_apiserver)."""
        return self.root / "logs" / "audit-operator.jsonl"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"


def etcd(layout: Layout) -> list[str]:
    return [
        str(layout.bin / "etcd"),
        f"--data-dir={layout.root / 'etcd'}",
        f"--listen-client-urls=http://127.0.0.1:{layout.etcd_port}",
        f"--advertise-client-urls=http://127.0.0.1:{layout.etcd_port}",
        f"--listen-peer-urls=http://127.0.0.1:{layout.etcd_peer_port}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{layout.etcd_peer_port}",
        f"--initial-cluster=default=http://127.0.0.1:{layout.etcd_peer_port}",
        # A throwaway cluster: fsync on every write only slows tests down.
        "--unsafe-no-fsync",
        "--quota-backend-bytes=4294967296",
        "--log-level=warn",
    ]


def kube_apiserver(layout: Layout) -> list[str]:
    pki = layout.pki
    return [
        str(layout.bin / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{layout.etcd_port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={layout.apiserver_port}",
        f"--cert-dir={layout.root / 'apiserver-certs'}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # RBAC enforced for everyone but system:masters; admission plugins are the release's defaults.
        "--authorization-mode=RBAC",
        "--allow-privileged=true",
        # The API server's own record of the operator's requests: what tests and make bench-operator count.
        f"--audit-policy-file={Path(__file__).resolve().parent / 'audit-policy.yaml'}",
        f"--audit-log-path={layout.audit_log}",
        "--audit-log-format=json",
        "--audit-log-mode=blocking",
        "--profiling=false",
        "--v=1",
    ]


def _controller(layout: Layout, binary: str, port: int) -> list[str]:
    """What the controller manager and the scheduler share: the admin's kubeconfig for the API and for
    checking who calls their own /healthz port, no leader election (one of each)."""
    kubeconfig = str(layout.kubeconfig)
    return [
        str(layout.bin / binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={layout.root / (binary + '-certs')}",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def kube_controller_manager(layout: Layout) -> list[str]:
    return [
        *_controller(layout, "kube-controller-manager", layout.controller_manager_port),
        # The release's default controllers (garbage collector, Deployment, ReplicaSet, HPA, Job, ...);
        # nodes and routes belong to kwok here.
        "--controllers=*,-nodeipam,-route,-cloud-node-lifecycle,-service-lb-controller",
        f"--service-account-private-key-file={layout.pki / 'sa.key'}",
        f"--root-ca-file={layout.pki / 'ca.crt'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--cluster-cidr={POD_CIDR}",
        "--horizontal-pod-autoscaler-sync-period=5s",
    ]


def kube_scheduler(layout: Layout) -> list[str]:
    return _controller(layout, "kube-scheduler", layout.scheduler_port)


def kwok(layout: Layout, config: Path) -> list[str]:
    return [
        str(layout.bin / "kwok"),
        f"--kubeconfig={layout.kubeconfig}",
        f"--config={config}",
        # Only the nodes this cluster creates with the annotation (kwok/nodes.yaml).
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        f"--cidr={POD_CIDR.replace('0.0/16', '0.1/16')}",
        "--node-ip=127.0.0.1",
        f"--server-address=127.0.0.1:{layout.kwok_port}",
        "--node-lease-duration-seconds=40",
    ]
