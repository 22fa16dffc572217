"""The emulated cluster (one per session) and the real operator running against it (one per module)."""

import itertools
from collections.abc import Iterator

import pytest
from lightkube import Client

from tests.operator.harness import Cluster, RunningOperator, running_operator

_namespaces = itertools.count()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[RunningOperator]:
    with running_operator(cluster) as running:
        yield running


@pytest.fixture()
def kube(cluster: Cluster) -> Client:
    return cluster.client()


@pytest.fixture()
def namespace() -> str:
    """A fresh namespace per test, so tests sharing the emulator never see each other's objects."""
    return f"test-{next(_namespaces)}"
