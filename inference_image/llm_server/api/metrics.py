"""Prometheus metrics under vLLM's names, so dashboards, KEDA and the Gateway API inference extension read
them unchanged; plus HTTP request counts by route and status."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from llm_server.engine.interface import STEP_BUCKETS, StepTimes

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


class _LoraInfo(Collector):
    def __init__(
        self, model_name: str, max_lora: int, adapters: Callable[[], tuple[list[str], list[str]]]
    ) -> None:
        self._model_name, self._max_lora, self._adapters = model_name, max_lora, adapters

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on LoRA requests.",
            labels=["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        running, waiting = self._adapters()
        family.add_metric(
            [self._model_name, str(self._max_lora), ",".join(running), ",".join(waiting)], time.time()
        )
        yield family


class _EngineCounters(Collector):
    """Counted by the engine, not by the HTTP layer: tokens decoded for a client that left count too."""

    def __init__(
        self,
        model_name: str,
        generated_tokens: Callable[[], int],
        step_times: Callable[[], StepTimes],
        prefix_cache_tokens: Callable[[], tuple[int, int]],
    ) -> None:
        self._model_name, self._generated_tokens, self._step_times = model_name, generated_tokens, step_times
        self._prefix_cache_tokens = prefix_cache_tokens

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        family = CounterMetricFamily("vllm:generation_tokens", "Tokens generated.", labels=["model_name"])
        family.add_metric([self._model_name], self._generated_tokens())
        yield family
        queried, hit = self._prefix_cache_tokens()
        for name, help_text, value in (
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queried),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed).", hit),
        ):
            counter = CounterMetricFamily(name, help_text, labels=["model_name"])
            counter.add_metric([self._model_name], value)
            yield counter
        times = self._step_times()
        steps = HistogramMetricFamily(
            "llm_engine_step_duration_seconds",
            "Duration of one batched step (every running stream waits one step per token).",
            labels=["model_name"],
        )
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, STEP_BUCKETS), "+Inf"], times.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        steps.add_metric([self._model_name], buckets, times.total_seconds)
        yield steps


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.registry = registry
        self.model_name = model_name
        labels = ["model_name"]
        self.running = Gauge(
            "vllm:num_requests_running", "Requests being decoded.", labels, registry=registry
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be decoded.", labels, registry=registry
        )
        # vLLM's name, and the one it had before 0.10 that the Gateway API inference extension still reads.
        self.cache_usage = [
            Gauge(name, "KV-cache usage. 1 means 100 percent usage.", labels, registry=registry)
            for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
        ]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between tokens.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Request latency.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=registry
        )
        self.success = Counter(
            "vllm:request_success", "Requests finished.", [*labels, "finished_reason"], registry=registry
        )
        self.http_requests = Counter(
            "llm_server_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=registry,
        )

    def watch_engine(
        self,
        running: Callable[[], int],
        waiting: Callable[[], int],
        adapters: Callable[[], tuple[list[str], list[str]]],
        max_lora: int,
        generated_tokens: Callable[[], int],
        step_times: Callable[[], StepTimes],
        cache_usage: Callable[[], float],
        prefix_cache_tokens: Callable[[], tuple[int, int]],
    ) -> None:
        self.running.labels(self.model_name).set_function(running)
        for gauge in self.cache_usage:
            gauge.labels(self.model_name).set_function(cache_usage)
        self.waiting.labels(self.model_name).set_function(waiting)
        self.registry.register(
            _EngineCounters(self.model_name, generated_tokens, step_times, prefix_cache_tokens)
        )
        self.registry.register(_LoraInfo(self.model_name, max_lora, adapters))
