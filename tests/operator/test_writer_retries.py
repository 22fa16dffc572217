"""The writer repeats requests the API server did not answer (timeouts, dropped connections) as it repeats
a 503, and what still fails is a short TemporaryError: kopf's default retry is 60 s later, and an event
handler's exception is dropped altogether (an API server under load timed requests out in make
bench-operator: 78 passes failed that way)."""

import asyncio
from typing import Any

import httpx
import kopf
import pytest
from prometheus_client import CollectorRegistry, Counter

from llmservice_operator.k8s import ChildWriter
from llmservice_operator.metrics import OperatorMetrics
from llmservice_operator.reconcile import Reconciler
from llmservice_operator.settings import OperatorSettings

MANIFEST = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "bot-config", "namespace": "team"},
    "data": {},
}


class TimingOutClient:
    """lightkube's client as seen under load: the first `failures` patches time out."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def patch(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise httpx.ReadTimeout("timed out")
        return type("Applied", (), {"to_dict": lambda self: dict(MANIFEST)})()

    get = patch  # the name-free check before a creation


def writer(client: TimingOutClient, retries: Counter | None = None) -> ChildWriter:
    return ChildWriter(client, retries, delays=(0, 0, 0))  # type: ignore[arg-type]


def test_a_timed_out_apply_is_repeated_and_counted() -> None:
    client = TimingOutClient(failures=2)
    retries = Counter("retries", "", ["code"], registry=CollectorRegistry())
    assert asyncio.run(writer(client, retries).apply(MANIFEST)) == MANIFEST
    assert client.calls == 3
    assert retries.labels("ReadTimeout")._value.get() == 2


def test_timeouts_that_outlast_the_retries_are_a_short_temporary_error() -> None:
    client = TimingOutClient(failures=100)
    reconciler = Reconciler(OperatorSettings(), OperatorMetrics(CollectorRegistry()))
    body = {
        "metadata": {"name": "bot", "namespace": "team", "uid": "u1", "generation": 1},
        "spec": {"model": {"source": "hf://acme/llama"}},
    }
    indexes: dict[str, Any] = {name: {} for name in _index_names()}
    with pytest.raises(kopf.TemporaryError) as raised:
        asyncio.run(reconciler.reconcile(body=body, writer=writer(client), indexes=indexes, trigger="change"))
    assert raised.value.delay == 10
    assert "did not answer" in str(raised.value)


def _index_names() -> list[str]:
    from llmservice_operator.reconcile import CHILD_INDEXES, LLMSERVICE_INDEX, POD_INDEX

    return [*CHILD_INDEXES.values(), LLMSERVICE_INDEX, POD_INDEX]
