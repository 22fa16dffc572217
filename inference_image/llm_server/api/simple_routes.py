"""The simple API the seed services were built on: /chat, /generate, /batch, /, /health, /model/info
(/predict and /embeddings: pooling_routes)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from llm_server import __doc__ as summary
from llm_server.api.auth import require_api_key
from llm_server.api.dependencies import EngineDep, GenerationDep
from llm_server.api.errors import APIError, error_body
from llm_server.api.generation import Generation
from llm_server.api.schemas import (
    STREAMABLE,
    BatchRequest,
    BatchResponse,
    GenerateRequest,
    GenerateResponse,
    SimpleChatRequest,
    SimpleChatResponse,
    Usage,
    error_responses,
)
from llm_server.api.streaming import event_json, event_stream
from llm_server.engine.interface import Prompt, SamplingParams

router = APIRouter(tags=["simple"], responses=error_responses(503))
protected = APIRouter(
    dependencies=[Depends(require_api_key)],
    tags=["simple"],
    responses=error_responses(400, 401, 404, 413, 429, 500, 503, 504),
)
VERSION = "0.1.0"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state.server
    ready = state.phase == "ready"
    status = {"ready": "healthy", "loading": "loading", "draining": "draining"}.get(state.phase, "unhealthy")
    return JSONResponse(
        {
            "status": status,
            "model_loaded": state.engine is not None,
            "model_name": request.app.state.settings.model_name,
        },
        status_code=200 if ready else 503,
    )


@protected.get("/")
async def root(request: Request) -> dict[str, str]:
    return {"message": (summary or "").strip(), "version": VERSION, "docs": "/docs", "health": "/health"}


@protected.get("/model/info")
async def model_info(request: Request, engine: EngineDep) -> dict[str, Any]:
    settings = request.app.state.settings
    cards = engine.models()
    return {
        "model_name": settings.model_name,
        "model_path": str(settings.model),
        "adapters": {card.name: card.path for card in cards if card.parent},
        "max_model_len": engine.max_model_len,
        "task": engine.task,
        "status": "loaded",
    }


def _model(generation: Generation, requested: str | None) -> str:
    return requested or generation.engine.base_model


def _text_stream(generation: Generation, prompt: Prompt, params: SamplingParams) -> EventSourceResponse:
    deltas = generation.start(prompt, params)
    message_id = uuid.uuid4().hex

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for delta in deltas:
                if delta.text:
                    yield {"data": event_json({"text": delta.text, "message_id": message_id})}
        except APIError as error:
            yield {"data": json.dumps(error_body(error.status, error.message, error.param))}
        except Exception:
            yield {"data": json.dumps(error_body(500, "internal server error during generation"))}
        yield {"data": "[DONE]"}

    return event_stream(events(), deltas)


@protected.post("/chat", response_model=SimpleChatResponse, responses=STREAMABLE)
async def chat(body: SimpleChatRequest, request: Request, generation: GenerationDep) -> Any:
    model = _model(generation, body.model)
    prompt = await generation.encode_chat(model, [message.for_template() for message in body.messages])
    params = generation.params(prompt, body.max_tokens, body)
    if body.stream:
        return _text_stream(generation, prompt, params)
    completion = await generation.complete(prompt, params, request)
    return SimpleChatResponse(
        response=completion.text,
        model=model,
        usage=Usage.of(completion.prompt_tokens, completion.completion_tokens),
    )


@protected.post("/generate", response_model=GenerateResponse, responses=STREAMABLE)
async def generate(body: GenerateRequest, request: Request, generation: GenerationDep) -> Any:
    model = _model(generation, body.model)
    prompt = await generation.encode_text(model, body.prompt)
    params = generation.params(prompt, body.max_tokens, body)
    if body.stream:
        return _text_stream(generation, prompt, params)
    completion = await generation.complete(prompt, params, request)
    return GenerateResponse(
        generated_text=completion.text,
        model=model,
        usage=Usage.of(completion.prompt_tokens, completion.completion_tokens),
    )


@protected.post("/batch", response_model=BatchResponse)
async def batch(body: BatchRequest, request: Request, generation: GenerationDep) -> Any:
    model = _model(generation, body.model)
    jobs = []
    for text in body.prompts:
        prompt = await generation.encode_text(model, text)
        jobs.append((prompt, generation.params(prompt, body.max_tokens, body)))
    completions = await generation.complete_many(jobs, request)
    return BatchResponse(
        results=[completion.text for completion in completions],
        model=model,
        usage=Usage.of(
            sum(c.prompt_tokens for c in completions), sum(c.completion_tokens for c in completions)
        ),
    )
