"""vLLM's /tokenize and /detokenize. The ids are those a request is served with: a prompt or a chat goes
through the encoding /v1/completions and /v1/chat/completions use (the pooling routes' for an embed,
classify or score model), so an option that encoding lacks is a 400 naming it, not ids that differ."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar, cast

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, Strict

from llm_server.api.auth import require_api_key
from llm_server.api.dependencies import EngineDep
from llm_server.api.errors import APIError
from llm_server.api.generation import INLINE_ENCODE_CHARS, check_vocabulary, served_model
from llm_server.api.schemas import MAX_MESSAGES, MAX_PROMPT_CHARS, ChatMessage, Tool, error_responses
from llm_server.api.tools import template_tools
from llm_server.engine.interface import ServingEngine

if TYPE_CHECKING:
    from llm_server.main import ServerState

router = APIRouter(
    dependencies=[Depends(require_api_key)],
    tags=["tokenize"],
    responses=error_responses(400, 401, 404, 413, 500, 503),
)
T = TypeVar("T")
CHARS_PER_TOKEN = 4  # to weigh a token list against INLINE_ENCODE_CHARS


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) and TokenizeChatRequest (`messages`): one of the two."""

    model: str | None = None  # the served model when absent
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool | None = None  # vLLM's default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    return_token_strs: bool | None = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Strict()]]


class DetokenizeResponse(BaseModel):
    prompt: str


class Tokenizer(Protocol):
    """What these routes need beyond the engines' encode calls."""

    def __len__(self) -> int: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...


def tokenizer_of(engine: ServingEngine) -> Tokenizer:
    return cast(Tokenizer, engine.tokenizer)


def refused_chat_option(body: TokenizeRequest) -> str | None:
    """The first option asking for another rendering than /v1/chat/completions' (its template as the model
    ships it, with the generation prompt, no special tokens added on top), or None."""
    asked = {
        "add_generation_prompt": not body.add_generation_prompt,
        "continue_final_message": body.continue_final_message,
        "add_special_tokens": bool(body.add_special_tokens),
        "chat_template": body.chat_template is not None,
        "chat_template_kwargs": bool(body.chat_template_kwargs),
    }
    return next((option for option, differs in asked.items() if differs), None)


async def _off_loop(work: Callable[[], T], size: int) -> T:
    """A large input's work off the event loop, which serves every stream (generation.py's rule)."""
    return work() if size < INLINE_ENCODE_CHARS else await asyncio.to_thread(work)


async def _chat_ids(
    state: ServerState, engine: ServingEngine, model: str, messages: list[ChatMessage], body: TokenizeRequest
) -> tuple[int, ...]:
    if state.generation is None:
        raise APIError(
            400,
            f"The model `{engine.base_model}` is served for {engine.task} and has no chat template to "
            "apply; send a `prompt`.",
            param="messages",
        )
    refused = refused_chat_option(body)
    if refused is not None:
        raise APIError(
            400,
            f"{refused} is not supported by this server: messages are tokenized as "
            "/v1/chat/completions renders them",
            param=refused,
        )
    chat = [message.for_template() for message in messages]
    return (await state.generation.encode_chat(model, chat, template_tools(body.tools))).token_ids


async def _prompt_ids(
    state: ServerState, model: str, prompt: str, add_special_tokens: bool
) -> tuple[int, ...]:
    if state.generation is not None:
        if not add_special_tokens:
            raise APIError(
                400,
                "add_special_tokens=false is not supported by this server for a generating model: prompts "
                "are tokenized as /v1/completions encodes them",
                param="add_special_tokens",
            )
        return (await state.generation.encode_text(model, prompt)).token_ids
    assert state.pooling is not None  # the engine is loaded: one of the two is set
    try:
        (encoded,) = await state.pooling.encode(model, prompt, None, add_special_tokens)
    except APIError as error:  # the pooling routes' field is `input`
        if error.param == "input":
            raise APIError(error.status, error.message, param="prompt") from None
        raise
    return encoded.token_ids


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request, engine: EngineDep) -> TokenizeResponse:
    state: ServerState = request.app.state.server
    if body.prompt is not None and body.messages is not None:
        raise APIError(400, "Only one of `prompt` or `messages` should be provided.", param="messages")
    model = served_model(engine, body.model)
    if body.messages is not None:
        ids = list(await _chat_ids(state, engine, model, body.messages, body))
    elif body.prompt is not None:
        ids = list(await _prompt_ids(state, model, body.prompt, body.add_special_tokens is not False))
    else:
        raise APIError(400, "Either `prompt` or `messages` should be provided.", param="prompt")
    token_strs = None
    if body.return_token_strs:
        to_tokens = tokenizer_of(engine).convert_ids_to_tokens
        token_strs = await _off_loop(lambda: to_tokens(ids), len(ids) * CHARS_PER_TOKEN)
    return TokenizeResponse(
        count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=token_strs
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, engine: EngineDep) -> DetokenizeResponse:
    served_model(engine, body.model)
    tokenizer = tokenizer_of(engine)
    check_vocabulary(body.tokens, len(tokenizer), "tokens")
    text = await _off_loop(lambda: tokenizer.decode(body.tokens), len(body.tokens) * CHARS_PER_TOKEN)
    return DetokenizeResponse(prompt=text)
