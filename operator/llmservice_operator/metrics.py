"""The operator's Prometheus metrics (prometheus-client)."""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class ConditionTracker(Collector):
    """LLMServices by condition type and status, from the last status each one was given."""

    def __init__(self) -> None:
        self._conditions: dict[tuple[str, str], dict[str, str]] = {}

    def record(self, namespace: str, name: str, conditions: list[dict]) -> None:
        self._conditions[(namespace, name)] = {item["type"]: item["status"] for item in conditions}

    def forget(self, namespace: str, name: str) -> None:
        self._conditions.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "llmservice_operator_llmservices", "LLMServices by condition", labels=["condition", "status"]
        )
        counts: dict[tuple[str, str], int] = {}
        for conditions in list(self._conditions.values()):
            for kind, status in conditions.items():
                counts[(kind, status)] = counts.get((kind, status), 0) + 1
        for (kind, status), count in sorted(counts.items()):
            family.add_metric([kind, status], count)
        yield family


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reconciles = Counter(
            "llmservice_operator_reconciles", "Reconcile passes", ["trigger", "result"], registry=registry
        )
        self.errors = Counter(
            "llmservice_operator_errors",
            "Reconcile passes that failed, by reason",
            ["reason"],
            registry=registry,
        )
        self.duration = Histogram(
            "llmservice_operator_reconcile_duration_seconds",
            "Time one reconcile pass took",
            ["trigger"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.writes = Counter(
            "llmservice_operator_child_writes",
            "Children created, updated or deleted",
            ["kind", "action"],
            registry=registry,
        )
        self.api_retries = Counter(
            "llmservice_operator_api_retries",
            "API requests the operator repeated after a retryable error, by HTTP status code (or the "
            "transport error: ReadTimeout, ConnectError, ...)",
            ["code"],
            registry=registry,
        )
        self.conditions = ConditionTracker()
        registry.register(self.conditions)
