"""Starts and stops a loopback cluster: the I/O around components.py, pki.py and kwok/.

`up` returns once the operator, running as a local process with the chart's ServiceAccount token, is
live. Every process is started in a session of its own, so the cluster outlives the command that
started it (`make cluster-up`); `down` stops them all from the pids in state.json and removes the state.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import httpx
import yaml

from controlplane import components
from controlplane.components import Layout
from controlplane.pki import write_pki

REPO = Path(__file__).resolve().parent.parent
KWOK_DIR = Path(__file__).resolve().parent / "kwok"
CHART = REPO / "charts" / "llmservice-operator"
RELEASE = "llmservice-operator"
OPERATOR_NAMESPACE = "llm-system"
SERVICE_ACCOUNT = "llmservice-operator"  # the chart's fullname for this release name
START_TIMEOUT = 60.0


class ClusterError(RuntimeError):
    pass


def build_binaries() -> Path:
    """Builds what is missing (build.sh prints what it does) and returns the binaries' directory."""
    script = Path(__file__).resolve().parent / "build.sh"
    result = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(result.stdout.strip().splitlines()[-1])


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat): another one, another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it ends (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _kubeconfig(server: str, ca: Path, user: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "loopback", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "loopback", "context": {"cluster": "loopback", "user": "user"}}],
        "current-context": "loopback",
    }


def _write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


class Cluster:
    """One cluster's state directory; the processes it started are recorded in state.json."""

    def __init__(self, root: Path, outlive_caller: bool = True) -> None:
        """`outlive_caller`: the processes keep running after this Python process ends (`make
        cluster-up`); otherwise the kernel kills each one when it does, however it ends (a test run)."""
        self.root = root.resolve()
        self._state_path = self.root / "state.json"
        self._outlive_caller = outlive_caller

    # -- state -----------------------------------------------------------------------------------

    def _state(self) -> dict:
        if not self._state_path.exists():
            raise ClusterError(f"no cluster at {self.root} (make cluster-up starts one)")
        return json.loads(self._state_path.read_text())

    def _save(self, state: dict) -> None:
        self._state_path.write_text(json.dumps(state, indent=2))

    @property
    def layout(self) -> Layout:
        fields = self._state()["layout"]
        return Layout(**{**fields, "root": Path(fields["root"]), "bin": Path(fields["bin"])})

    def env(self) -> dict[str, str]:
        """The environment a test or user needs: admin kubeconfig, the built helm and kubectl first."""
        layout = self.layout
        return {
            **os.environ,
            "KUBECONFIG": str(layout.kubeconfig),
            "PATH": f"{layout.bin}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def _tool(
        self, tool: str, args: tuple[str, ...], check: bool, stdin: str | None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.layout.bin / tool), *args],
            env=self.env(),
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
        )

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        return self._tool("kubectl", args, check, stdin)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._tool("helm", args, check, None)

    # -- processes -------------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        log = (self.root / "logs" / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: stop_process signals it whole
            preexec_fn=None if self._outlive_caller else _die_with_parent,
        )
        state = self._state()
        state["pids"][name] = process.pid
        state.setdefault("started", {})[name] = _start_time(process.pid)
        self._save(state)
        return process.pid

    def pid(self, name: str) -> int | None:
        """The process's pid, unless it is gone and the pid may be someone else's now (after a reboot
        or a crash, state.json outlives its processes)."""
        state = self._state()
        pid = state["pids"].get(name)
        if pid is None or _start_time(pid) != state.get("started", {}).get(name):
            return None
        return pid

    def _alive(self, name: str) -> bool:
        pid = self.pid(name)
        if pid is None:
            return False
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return False  # our own child that exited
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive(name):
                raise ClusterError(f"{name} exited; its log:\n{self._log_tail(name)}")
            with contextlib.suppress(httpx.HTTPError, subprocess.SubprocessError, OSError):
                if ready():
                    return
            time.sleep(0.2)
        raise ClusterError(f"{name} not ready after {timeout:.0f} s; its log:\n{self._log_tail(name)}")

    def _log_tail(self, name: str, lines: int = 30) -> str:
        path = self.root / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop_process(self, name: str, timeout: float = 10.0) -> None:
        pid = self.pid(name)
        if pid is None:
            self._forget(name)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._alive(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        self._forget(name)

    def _forget(self, name: str) -> None:
        state = self._state()
        state["pids"].pop(name, None)
        state.get("started", {}).pop(name, None)
        self._save(state)

    # -- health ----------------------------------------------------------------------------------

    def _admin_client(self) -> httpx.Client:
        pki = self.layout.pki
        # One SSL context for both sides: httpx 0.28 sends no client certificate given verify=<path>.
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return httpx.Client(base_url=self.layout.server, verify=context, timeout=5.0)

    def _apiserver_ready(self) -> bool:
        with self._admin_client() as client:
            return client.get("/readyz").status_code == 200

    @staticmethod
    def _healthz(port: int) -> bool:
        # Their serving certificates are self-signed; /healthz is open to anyone.
        return httpx.get(f"https://127.0.0.1:{port}/healthz", verify=False, timeout=2.0).status_code == 200

    # -- up and down -----------------------------------------------------------------------------

    def up(self, operator: bool = True) -> float:
        """Starts everything; returns the seconds from start to a live operator."""
        if self._state_path.exists():
            raise ClusterError(f"a cluster is already at {self.root} (make cluster-down stops it)")
        binaries = build_binaries()
        built = time.monotonic()
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        ports = _free_ports(6)
        layout = Layout(self.root, binaries, *ports)
        self._save(
            {
                "layout": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(layout).items()},
                "pids": {},
            }
        )
        try:
            self._up(layout, operator)
        except BaseException:
            self.down()
            raise
        return time.monotonic() - built  # start-up alone: the build (if any) is not counted

    def _up(self, layout: Layout, operator: bool) -> None:
        write_pki(layout.pki)
        admin = {
            "client-certificate": str(layout.pki / "admin.crt"),
            "client-key": str(layout.pki / "admin.key"),
        }
        _write_private(
            layout.kubeconfig, yaml.safe_dump(_kubeconfig(layout.server, layout.pki / "ca.crt", admin))
        )

        self._start("etcd", components.etcd(layout))
        self._wait(
            "etcd",
            lambda: httpx.get(f"http://127.0.0.1:{layout.etcd_port}/health", timeout=2.0).status_code == 200,
        )
        self._start("kube-apiserver", components.kube_apiserver(layout))
        self._wait("kube-apiserver", self._apiserver_ready)
        self._start("kube-controller-manager", components.kube_controller_manager(layout))
        self._start("kube-scheduler", components.kube_scheduler(layout))
        self.kubectl("apply", "-f", str(KWOK_DIR / "nodes.yaml"))
        self._start("kwok", components.kwok(layout, KWOK_DIR / "kwok.yaml"))
        self._wait("kube-controller-manager", lambda: self._healthz(layout.controller_manager_port))
        self._wait("kube-scheduler", lambda: self._healthz(layout.scheduler_port))
        self._wait(
            "kwok",
            lambda: (
                self.kubectl(
                    "wait", "--for=condition=Ready", "node", "--all", "--timeout=1s", check=False
                ).returncode
                == 0
            ),
        )
        # The default ServiceAccount appears with the controller manager: pods are refused without it.
        self._wait(
            "kube-controller-manager",
            lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
        )
        self.install_chart()
        if operator:
            self.start_operator()

    def install_chart(self, *extra: str) -> None:
        # No operator pod: the operator runs as a local process (start_operator) under the same identity.
        self.helm(
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--create-namespace",
            "--set",
            "replicaCount=0",
            "--wait",
            "--timeout",
            "60s",
            *extra,
        )

    def start_operator(self) -> None:
        layout = self.layout
        token = self.kubectl(
            "create", "token", SERVICE_ACCOUNT, "-n", OPERATOR_NAMESPACE, "--duration=24h"
        ).stdout.strip()
        _write_private(
            layout.operator_kubeconfig,
            yaml.safe_dump(_kubeconfig(layout.server, layout.pki / "ca.crt", {"token": token})),
        )
        health_port, metrics_port = _free_ports(2)
        env = {
            **os.environ,
            "KUBECONFIG": str(layout.operator_kubeconfig),
            "LLMSERVICE_METRICS_PORT": str(metrics_port),
            "LLMSERVICE_LOG_FORMAT": "plain",
            "LLMSERVICE_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,  # as the chart sets it
        }
        argv = [
            sys.executable,
            "-m",
            "llmservice_operator.cli",
            "run",
            "--all-namespaces",
            "--standalone",
            f"--liveness=http://127.0.0.1:{health_port}/healthz",
        ]
        self._start("operator", argv, env)
        state = self._state()
        state["operator"] = {"health_port": health_port, "metrics_port": metrics_port}
        self._save(state)
        self._wait(
            "operator",
            lambda: httpx.get(f"http://127.0.0.1:{health_port}/healthz", timeout=2.0).status_code == 200,
        )

    def operator_identity(self) -> str:
        return f"system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}"

    def operator_requests(self) -> list[dict]:
        """The API server's audit events for the operator's requests so far, oldest first, one per
        request: a watch as it starts (it completes only when it ends), anything else as it completes."""
        path = self.layout.audit_log
        if not path.exists():
            return []
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [
            event
            for event in events
            if event.get("stage")
            == ("ResponseStarted" if event.get("verb") == "watch" else "ResponseComplete")
        ]

    def operator_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self._state()['operator']['metrics_port']}/metrics"

    def down(self) -> None:
        if not self._state_path.exists():
            return
        for name in reversed(list(self._state()["pids"])):
            self.stop_process(name)
        shutil.rmtree(self.root)
