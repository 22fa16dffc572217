"""`llmservice-operator run` (the operator) and `llmservice-operator render` (children, offline)."""

import getpass
import os
import random
import secrets
import socket
import sys
from pathlib import Path

import click
import kopf
import yaml
from prometheus_client import start_http_server

from llmservice_operator.builders import build_children
from llmservice_operator.settings import OperatorSettings
from llmservice_operator.spec import InvalidSpec, parse_manifest

LOG_FORMATS = {"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}


class _NoAliasDumper(yaml.SafeDumper):
    """Builders may put one object in several places (a shared securityContext); PyYAML would write it once
    with an anchor (&id001) and alias it after, which reads badly in a diff and hides what each child gets."""

    def ignore_aliases(self, data: object) -> bool:
        return True


@click.group()
def main() -> None:
    """The LLMService operator."""


@main.command()
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    help="Namespace to watch (repeatable; globs allowed). Default: $LLMSERVICE_WATCH_NAMESPACES.",
)
@click.option("-A", "--all-namespaces", "clusterwide", is_flag=True, help="Watch all namespaces.")
@click.option(
    "--standalone", is_flag=True, help="Do not use kopf peering (no coordination between replicas)."
)
@click.option("--peering", "peering_name", default=None, help="kopf peering object name, for HA replicas.")
@click.option(
    "--priority",
    type=int,
    default=None,
    help="kopf peering priority of this replica. Default with --peering: a random one per replica.",
)
@click.option(
    "--liveness",
    "liveness_endpoint",
    default="http://0.0.0.0:8081/healthz",
    show_default=True,
    help="kopf's liveness endpoint URL.",
)
@click.option("--verbose", is_flag=True)
@click.option("--debug", is_flag=True)
@click.option("--quiet", is_flag=True)
def run(
    namespaces: tuple[str, ...],
    clusterwide: bool,
    standalone: bool,
    peering_name: str | None,
    priority: int | None,
    liveness_endpoint: str,
    verbose: bool,
    debug: bool,
    quiet: bool,
) -> None:
    """Run the operator (the kopf options pass through)."""
    from llmservice_operator.handlers import build_registry

    settings = OperatorSettings()
    namespaces = namespaces or tuple(settings.watch_namespaces)
    clusterwide = clusterwide or not namespaces
    # kopf's levels: default INFO, --verbose DEBUG, --debug DEBUG with asyncio's, --quiet WARNING.
    kopf.configure(
        verbose=verbose or settings.log_level == "debug",
        debug=debug,
        quiet=quiet or settings.log_level == "warning",
        log_format=LOG_FORMATS[settings.log_format],
    )
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    registry, _ = build_registry(settings)
    kopf.run(
        registry=registry,
        namespaces=namespaces,
        clusterwide=clusterwide,
        standalone=standalone or None,
        peering_name=peering_name,
        priority=replica_priority(priority, peering=bool(peering_name) and not standalone),
        liveness_endpoint=liveness_endpoint,
        identity=replica_identity(),
    )


def replica_priority(priority: int | None, peering: bool) -> int | None:
    """kopf pauses every replica that sees a live peer of its own priority, so replicas started alike (one
    Deployment, one set of args) would all stand still. Unless one is given, each draws its own: the
    highest works, the others wait to take over."""
    if priority is not None or not peering:
        return priority
    return random.SystemRandom().randint(1, 2**31 - 1)


def replica_identity() -> str | None:
    """kopf names a replica after $POD_ID, else after its login name, and getpass finds none for a UID without
    a passwd entry (OpenShift runs images as one): kopf would not start. The host name stands in (the pod's
    name in a pod), made unique per start as kopf does; None leaves kopf its own name."""
    if os.environ.get("POD_ID"):
        return None
    try:
        getpass.getuser()
    except (KeyError, OSError):  # OSError from Python 3.13 on
        return f"uid-{os.getuid()}@{socket.gethostname()}/{secrets.token_hex(3)}"
    return None


@main.command()
@click.option(
    "-f",
    "--filename",
    "path",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="LLMService manifest(s), YAML; '-' reads standard input.",
)
@click.option(
    "--namespace", default="default", show_default=True, help="Namespace for manifests that name none."
)
def render(path: str, namespace: str) -> None:
    """Print the children of each LLMService in FILE as a YAML stream, without a cluster."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    settings = OperatorSettings()
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise click.ClickException(f"{path}: not valid YAML: {error}") from None
    if not documents:
        raise click.ClickException(f"{path}: no LLMService found")
    manifests = []
    for index, document in enumerate(documents):
        try:
            svc = parse_manifest(document, default_namespace=namespace)
        except InvalidSpec as error:
            name = (document.get("metadata") or {}).get("name") if isinstance(document, dict) else None
            where = f"LLMService {name!r}" if name else f"document {index + 1}"
            raise click.ClickException(f"{path}: {where}: {error}") from None
        manifests.extend(build_children(svc, settings).desired)
    click.echo(yaml.dump_all(manifests, Dumper=_NoAliasDumper, sort_keys=False), nl=False)


if __name__ == "__main__":
    main()
