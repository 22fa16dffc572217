"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models (/v1/embeddings is in
pooling_routes)."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from llm_server.api.auth import require_api_key
from llm_server.api.dependencies import EngineDep, GenerationDep
from llm_server.api.errors import APIError, error_body
from llm_server.api.generation import Generation, StreamGroup
from llm_server.api.logprobs_format import chat_logprobs, completion_logprobs, vllm_prompt_logprobs
from llm_server.api.schemas import (
    STREAMABLE,
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    error_responses,
)
from llm_server.api.streaming import event_json, event_stream
from llm_server.api.structured_outputs import grammar_for
from llm_server.api.tools import (
    ToolCalling,
    ToolCallStream,
    assistant_message,
    chat_grammar,
    template_tools,
    tool_calling,
)
from llm_server.api.vllm_fields import check_fields
from llm_server.engine.interface import Prompt, SamplingParams, TokenLogprob

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key)],
    tags=["openai"],
    responses=error_responses(400, 401, 404, 413, 429, 500, 503, 504),
)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return Usage.of(prompt_tokens, completion_tokens).model_dump()


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


def _choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice `choice` of n: its own row; a seeded request's choices draw from seed, seed + 1, ..."""
    if params.seed is None or choice == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + choice + 2**63) % 2**64 - 2**63)


def _decoder(generation: Generation) -> Callable[[int], str]:
    tokenizer = generation.engine.tokenizer
    return lambda token: tokenizer.decode([token])


@router.post("/chat/completions", response_model=None, responses=STREAMABLE)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, generation: GenerationDep
) -> dict[str, Any] | EventSourceResponse:
    check_fields(body.model_extra or {}, "chat")
    body.model = body.model or generation.engine.base_model
    calling = tool_calling(body)
    grammar = chat_grammar(body, calling)
    messages = [message.for_template() for message in body.messages]
    prompt = await generation.encode_chat(body.model, messages, template_tools(body.tools))
    params = dataclasses.replace(
        generation.params(prompt, body.max_completion_tokens or body.max_tokens, body, grammar=grammar),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        prompt_logprobs=body.prompt_logprobs,
    )
    jobs = [(prompt, _choice_params(params, choice)) for choice in range(body.n)]
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    decode = _decoder(generation)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        group = StreamGroup(await generation.start_many(jobs, param="n"))  # 429 here, before the stream
        chunks = _chat_chunks(group, prompt, body, calling, response_id, created, usage, decode)
        return event_stream(_sse(chunks), group)
    completions = await generation.complete_many(jobs, request, param="n")
    choices = []
    for index, completion in enumerate(completions):
        message, finish_reason = assistant_message(completion.text, completion.finish_reason, calling)
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": chat_logprobs(completion.logprobs, decode) if body.logprobs else None,
                "finish_reason": finish_reason,
            }
        )
    answer: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(len(prompt.token_ids), sum(c.completion_tokens for c in completions)),
    }
    if body.prompt_logprobs is not None and completions[0].prompt_logprobs is not None:
        answer["prompt_logprobs"] = vllm_prompt_logprobs(completions[0].prompt_logprobs, decode)
    return answer


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


async def _chat_chunks(
    group: StreamGroup,
    prompt: Prompt,
    body: ChatCompletionRequest,
    calling: ToolCalling | None,
    response_id: str,
    created: int,
    include_usage: bool,
    decode: Callable[[int], str],
) -> AsyncIterator[dict[str, Any]]:
    base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": body.model}
    for index in range(body.n):
        role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        yield {**base, "choices": [{**role, "finish_reason": None}]}
    completion_tokens = [0] * body.n
    # Text that may be a tool call is held back (empty content) and sent as tool_calls at the end.
    calls = [ToolCallStream(calling) for _ in range(body.n)] if calling is not None else None
    # A chunk per token, as vLLM's: empty content for half a character.
    async for index, delta in group.deltas():
        completion_tokens[index] = delta.completion_tokens
        fields, finish_reason = (
            ({"content": delta.text}, delta.finish_reason)
            if calls is None
            else calls[index].delta(delta.text, delta.finish_reason)
        )
        choice = {
            "index": index,
            "delta": fields,
            "logprobs": chat_logprobs(delta.logprobs, decode) if body.logprobs else None,
            "finish_reason": finish_reason,
        }
        chunk: dict[str, Any] = {**base, "choices": [choice]}
        if delta.prompt_logprobs is not None and body.prompt_logprobs is not None:
            chunk["prompt_logprobs"] = vllm_prompt_logprobs(delta.prompt_logprobs, decode)
        yield chunk
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(len(prompt.token_ids), sum(completion_tokens))}


@router.post("/completions", response_model=None, responses=STREAMABLE)
async def completions(
    body: CompletionRequest, request: Request, generation: GenerationDep
) -> dict[str, Any] | EventSourceResponse:
    check_fields(body.model_extra or {}, "completions")
    body.model = body.model or generation.engine.base_model
    prompts: list[Prompt] = []
    for item in body.prompts():
        if isinstance(item, str):
            prompts.append(await generation.encode_text(body.model, item))
        else:
            prompts.append(generation.prompt_of_ids(body.model, item, "prompt"))
    # echo with logprobs: the prompt's tokens get theirs too, with the same number of most likely tokens
    scored = (
        max(body.logprobs, body.prompt_logprobs or 0) if body.echo and body.logprobs is not None else None
    )
    jobs = []
    for prompt in prompts:
        params = dataclasses.replace(
            generation.params(prompt, body.max_tokens, body, grammar=grammar_for(body)),
            logprobs=body.logprobs,
            prompt_logprobs=scored if scored is not None else body.prompt_logprobs,
        )
        jobs += [(prompt, _choice_params(params, choice)) for choice in range(body.n)]
    choice_prompts = [prompt for prompt, _ in jobs]  # choice i answers prompt i // n
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    decode = _decoder(generation)
    texts = [_prompt_text(item, decode) for item in body.prompts()] if body.echo else None
    prompt_tokens = sum(len(prompt.token_ids) for prompt in prompts)
    if body.stream:
        group = StreamGroup(await generation.start_many(jobs, param="prompt"))
        chunks = _completion_chunks(
            group, choice_prompts, body, texts, response_id, created, prompt_tokens, decode
        )
        return event_stream(_sse(chunks), group)
    completions = await generation.complete_many(jobs, request, param="prompt")
    choices = []
    for index, completion in enumerate(completions):
        prompt = choice_prompts[index]
        choice: dict[str, Any] = {
            "index": index,
            "text": (texts[index // body.n] if texts else "") + completion.text,
            "logprobs": _completion_logprobs(
                body, prompt, completion.token_ids, completion.logprobs, completion.prompt_logprobs, decode
            ),
            "finish_reason": completion.finish_reason,
        }
        if body.return_token_ids:
            choice["prompt_token_ids"] = list(prompt.token_ids)
            choice["token_ids"] = list(completion.token_ids)
        if body.prompt_logprobs is not None and completion.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(completion.prompt_logprobs, decode)
        choices.append(choice)
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in completions)),
    }


def _prompt_text(item: str | list[int], decode: Callable[[int], str]) -> str:
    return item if isinstance(item, str) else "".join(decode(token) for token in item)


def _completion_logprobs(
    body: CompletionRequest,
    prompt: Prompt,
    token_ids: list[int] | tuple[int, ...],
    logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...],
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None,
    decode: Callable[[int], str],
) -> dict[str, list[Any]] | None:
    """The completions shape for these tokens, the prompt's first when echoed (and it is their first)."""
    if body.logprobs is None:
        return None
    ids, entries = list(token_ids), list[TokenLogprob | None](logprobs)
    if body.echo and prompt_logprobs is not None:
        ids, entries = [*prompt.token_ids, *ids], [*prompt_logprobs, *entries]
    return completion_logprobs(ids, entries, decode)


async def _completion_chunks(
    group: StreamGroup,
    choice_prompts: list[Prompt],
    body: CompletionRequest,
    texts: list[str] | None,
    response_id: str,
    created: int,
    prompt_tokens: int,
    decode: Callable[[int], str],
) -> AsyncIterator[dict[str, Any]]:
    base = {"id": response_id, "object": "text_completion", "created": created, "model": body.model}
    completion_tokens = [0] * len(choice_prompts)
    started: set[int] = set()
    async for index, delta in group.deltas():
        completion_tokens[index] = delta.completion_tokens
        first = index not in started
        started.add(index)
        prefix = texts[index // body.n] if texts and first else ""
        echoed = delta.prompt_logprobs if first else None
        choice: dict[str, Any] = {
            "index": index,
            "text": prefix + delta.text,
            "logprobs": _completion_logprobs(
                body, choice_prompts[index], delta.token_ids, delta.logprobs, echoed, decode
            ),
            "finish_reason": delta.finish_reason,
        }
        if body.return_token_ids:
            if first:
                choice["prompt_token_ids"] = list(choice_prompts[index].token_ids)
            choice["token_ids"] = list(delta.token_ids)
        if body.prompt_logprobs is not None and delta.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(delta.prompt_logprobs, decode)
        yield {**base, "choices": [choice]}
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": _usage(prompt_tokens, sum(completion_tokens))}
