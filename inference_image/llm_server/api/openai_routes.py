"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models (/v1/embeddings is in
pooling_routes)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from llm_server.api.auth import require_api_key
from llm_server.api.dependencies import EngineDep, GenerationDep
from llm_server.api.errors import APIError, error_body
from llm_server.api.generation import Generation
from llm_server.api.schemas import (
    STREAMABLE,
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    error_responses,
)
from llm_server.api.streaming import event_json, event_stream
from llm_server.api.vllm_fields import check_fields
from llm_server.engine.interface import Prompt, SamplingParams

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key)],
    tags=["openai"],
    responses=error_responses(400, 401, 404, 413, 429, 500, 503, 504),
)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return Usage.of(prompt_tokens, completion_tokens).model_dump()


def _only_one_choice(n: int) -> None:
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")


@router.get("/models")
async def list_models(engine: EngineDep) -> dict[str, Any]:
    """vLLM's entries (max_model_len included), plus `task`: what the model serves (generate, embed,
    classify or score), which OpenAI's and vLLM's cards do not say."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {
                "id": card.name,
                "object": "model",
                "created": created,
                "owned_by": "llmservice",
                "root": card.path if card.parent else card.name,
                "parent": card.parent,
                "max_model_len": engine.max_model_len,
                "task": engine.task,
            }
            for card in engine.models()
        ],
    }


@router.post("/chat/completions", response_model=None, responses=STREAMABLE)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, generation: GenerationDep
) -> dict[str, Any] | EventSourceResponse:
    check_fields(body.model_extra or {}, "chat")
    _only_one_choice(body.n)
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    prompt = await generation.encode_chat(body.model, messages)
    params = generation.params(prompt, body.max_completion_tokens or body.max_tokens, body)
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _chat_stream(generation, prompt, params, response_id, created, body.model, usage)
    completion = await generation.complete(prompt, params, request)
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": _usage(completion.prompt_tokens, completion.completion_tokens),
    }


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, str]]:
    """OpenAI's stream framing: one JSON per event, an error event if generation fails, then [DONE]."""
    try:
        async for chunk in chunks:
            yield {"data": event_json(chunk)}
    except APIError as error:
        yield {"data": json.dumps(error_body(error.status, error.message, error.param))}
    except Exception:
        yield {"data": json.dumps(error_body(500, "internal server error during generation"))}
    yield {"data": "[DONE]"}


def _chat_stream(
    generation: Generation,
    prompt: Prompt,
    params: SamplingParams,
    response_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> EventSourceResponse:
    deltas = generation.start(prompt, params)  # 429 here, before the stream starts

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model}
        yield {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        completion_tokens = 0
        async for delta in deltas:  # a chunk per token, as vLLM's: empty content for half a character
            completion_tokens = delta.completion_tokens
            yield {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": delta.text},
                        "logprobs": None,
                        "finish_reason": delta.finish_reason,
                    }
                ],
            }
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(len(prompt.token_ids), completion_tokens)}

    return event_stream(_sse(chunks()), deltas)


@router.post("/completions", response_model=None, responses=STREAMABLE)
async def completions(
    body: CompletionRequest, request: Request, generation: GenerationDep
) -> dict[str, Any] | EventSourceResponse:
    check_fields(body.model_extra or {}, "completions")
    _only_one_choice(body.n)
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    prompt = await generation.encode_text(body.model, text)
    params = generation.params(prompt, body.max_tokens, body)
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prefix = text if body.echo else ""
    if body.stream:
        deltas = generation.start(prompt, params)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            base = {"id": response_id, "object": "text_completion", "created": created, "model": body.model}
            completion_tokens, first = 0, True
            async for delta in deltas:
                completion_tokens = delta.completion_tokens
                piece = (prefix if first else "") + delta.text
                first = False
                yield {
                    **base,
                    "choices": [
                        {"index": 0, "text": piece, "logprobs": None, "finish_reason": delta.finish_reason}
                    ],
                }
            if include_usage:
                yield {**base, "choices": [], "usage": _usage(len(prompt.token_ids), completion_tokens)}

        return event_stream(_sse(chunks()), deltas)
    completion = await generation.complete(prompt, params, request)
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "text": prefix + completion.text,
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": _usage(completion.prompt_tokens, completion.completion_tokens),
    }
