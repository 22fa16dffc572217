"""create_app(settings): the FastAPI app, with a lifespan that loads the engine in the background so that
/health/ready can answer 503 while the model loads. The engine generates, or pools (embed, classify, score)
as LLM_TASK says or the model directory shows."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from llm_server.adapters import AdapterManager
from llm_server.api import (
    adapter_routes,
    health_routes,
    lora_routes,
    openai_routes,
    pooling_routes,
    simple_routes,
    tokenize_routes,
)
from llm_server.api.errors import install_error_handlers
from llm_server.api.generation import Generation
from llm_server.api.metrics import ServerMetrics
from llm_server.api.middleware import RequestContext
from llm_server.api.pooling import Pooling
from llm_server.config import ServerSettings
from llm_server.engine.interface import Engine, PoolingEngine, ServingEngine

logger = logging.getLogger(__name__)
EngineFactory = Callable[[ServerSettings], ServingEngine]


@dataclasses.dataclass
class ServerState:
    phase: str = "loading"  # loading -> ready -> draining; or failed
    engine: ServingEngine | None = None
    generation: Generation | None = None  # task generate
    pooling: Pooling | None = None  # tasks embed, classify, score
    adapters: AdapterManager | None = None  # task generate
    failure: str | None = None


def build_engine(settings: ServerSettings, engine_class: type | None = None) -> ServingEngine:
    """Loads the model (and its adapters) and starts the engine for its task: continuous batching for
    generation (or `engine_class`), batched pooling for embed, classify and score."""
    from llm_server.engine.tasks import TaskError, resolve_task

    task = resolve_task(settings.model, settings.task)
    if task.task != "generate":
        if settings.adapters:
            raise TaskError(f"LoRA adapters serve generation only; task {task.task} takes none")
        from llm_server.engine.loading import load_pooling_model
        from llm_server.engine.pooling_engine import BatchPoolingEngine

        pooling = load_pooling_model(
            settings.model, task, settings.dtype, settings.device, settings.max_model_len,
            prepack=settings.prepack_weights,
        )  # fmt: skip
        return BatchPoolingEngine(
            pooling,
            settings.model_name,
            settings.max_batch_size,
            settings.max_queued_requests,
            settings.max_batch_tokens,
            settings.pooling_workers,
            settings.pooling_batch_wait_ms / 1000,
        )
    from llm_server.engine.batching import BatchingEngine
    from llm_server.engine.loading import load_model

    # Adapters come after the engine starts (AdapterManager): one that fails must not fail the server.
    loaded = load_model(
        settings.model, {}, settings.dtype, settings.device, settings.max_model_len,
        split_linear=settings.split_linear_layers,
    )  # fmt: skip
    return (engine_class or BatchingEngine)(
        loaded,
        settings.model_name,
        settings.max_batch_size,
        settings.max_queued_requests,
        settings.max_batch_tokens,
        settings.max_prefill_tokens,
        settings.prefill_chunk_tokens,
        settings.decode_steps_between_prefills,
        settings.enable_prefix_caching,
        settings.block_size,
        settings.prefix_cache_tokens,
    )


def write_termination_message(path: Path, message: str) -> None:
    """Kubernetes shows this file's content in the pod status (the operator surfaces it)."""
    with contextlib.suppress(OSError):
        if path.parent.exists():
            path.write_text(message[:4096], encoding="utf-8")


def create_app(
    settings: ServerSettings,
    engine_factory: EngineFactory = build_engine,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    state = ServerState()
    metrics = ServerMetrics(CollectorRegistry(), settings.model_name)

    async def load() -> None:
        try:
            engine = await asyncio.to_thread(engine_factory, settings)
        except Exception as error:
            state.phase, state.failure = "failed", f"startup failed: {error}"
            logger.error(state.failure)
            write_termination_message(settings.termination_log, state.failure)
            if on_fatal is not None:
                on_fatal(state.failure)
            return
        metrics.watch_engine(
            lambda: engine.running,
            lambda: engine.waiting,
            engine.adapters_in_use,
            max_lora=len(settings.adapters),
            generated_tokens=lambda: engine.generated_tokens,
            step_times=lambda: engine.step_times,
            cache_usage=lambda: engine.cache_usage,
            prefix_cache_tokens=lambda: engine.prefix_cache_tokens,
        )
        if engine.task == "generate":
            state.generation = Generation(cast(Engine, engine), settings, metrics)
            state.adapters = AdapterManager(
                cast(Engine, engine), settings.download_dir, settings.max_lora_rank
            )
            state.adapters.start()
            # Ready only once the adapters it starts with are loaded or have failed: a new pod serves
            # the current set from its first request.
            await state.adapters.apply(dict(settings.adapters))
            await state.adapters.settled()
        else:
            state.pooling = Pooling(cast(PoolingEngine, engine), settings, metrics)
        state.engine = engine
        if state.phase == "loading":
            state.phase = "ready"
        logger.info("ready to serve", extra={"model_name": settings.model_name})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load())
        yield
        loading.cancel()
        if state.adapters is not None:
            await state.adapters.close()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(
        title="llm-server",
        version=simple_routes.VERSION,
        lifespan=lifespan,
        summary="OpenAI-compatible inference for a base model and its LoRA adapters, or for an embedding, "
        "classification or cross-encoder model",
    )
    app.state.settings, app.state.server, app.state.metrics = settings, state, metrics
    install_error_handlers(app)
    app.include_router(health_routes.router)
    app.include_router(simple_routes.router)
    app.include_router(simple_routes.protected)
    app.include_router(openai_routes.router)
    app.include_router(pooling_routes.router)
    app.include_router(tokenize_routes.router)
    if settings.enable_runtime_lora:
        app.include_router(lora_routes.router)
        app.include_router(adapter_routes.router)
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app
