"""The fields vLLM's OpenAI server documents that this server does not implement: a request that sets one
to anything but its default (null, empty, or the value vLLM assumes) is a 400 naming it, never a 200 that
quietly lacks it. Fields neither server knows are ignored and their names logged, as vLLM does."""

from __future__ import annotations

import logging
from typing import Any, Literal

from llm_server.api.errors import APIError

logger = logging.getLogger(__name__)

Endpoint = Literal["chat", "completions"]

# vLLM's sampling and engine fields, shared by both endpoints, with the value that asks for nothing.
_SHARED: dict[str, Any] = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "structural_tag": None,
    "guided_decoding_backend": None,
    "guided_whitespace_pattern": None,
    "priority": 0,
    "logits_processors": None,
    "return_tokens_as_token_ids": None,
    "kv_transfer_params": None,
    "vllm_xargs": None,
    "mm_processor_kwargs": None,
    "request_id": None,
}
UNSUPPORTED: dict[Endpoint, dict[str, Any]] = {
    "chat": {
        **_SHARED,
        "echo": False,
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": False,
        "documents": None,
        "chat_template": None,
        "chat_template_kwargs": None,
        "reasoning_effort": None,
        "functions": None,
        "function_call": None,
        "return_token_ids": None,  # completions only, here
    },
    "completions": {
        **_SHARED,
        "suffix": None,
        "best_of": 1,
        "prompt_embeds": None,
        "add_special_tokens": True,
        "tools": None,  # chat only, as in vLLM
    },
}
# Known to vLLM or OpenAI and harmless to leave unused here: no output changes with them.
HARMLESS = frozenset({"user", "parallel_tool_calls", "include_reasoning", "metadata", "store"})
_NOTHING = (None, [], {}, "")


def _asks_nothing(value: Any, default: Any) -> bool:
    return value in _NOTHING or value == default


def check_fields(extra: dict[str, Any], endpoint: Endpoint) -> None:
    """`extra`: the request's fields this server's schema does not declare."""
    unsupported = UNSUPPORTED[endpoint]
    for name, value in extra.items():
        if name in unsupported and not _asks_nothing(value, unsupported[name]):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    unknown = sorted(name for name in extra if name not in unsupported and name not in HARMLESS)
    if unknown:  # names only: values may hold anything
        logger.warning("the request's fields %s are unknown and were ignored", unknown[:20])
