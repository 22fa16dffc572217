"""Log probabilities in the shapes clients read: the completions API's (tokens, token_logprobs, top_logprobs,
text_offset; lm-eval reads these), chat's (content entries with bytes), and vLLM's `prompt_logprobs`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from llm_server.engine.interface import TokenLogprob

Decode = Callable[[int], str]
FLOOR = -9999.0  # vLLM's stand-in for -inf, which JSON cannot carry


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def completion_logprobs(
    token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], decode: Decode
) -> dict[str, list[Any]]:
    """`entries`: one per token of `token_ids` (None: the prompt's first, which nothing predicts). Each
    top_logprobs dict holds the token itself and its `top` most likely, as vLLM's; offsets count from the
    first token's text."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = 0
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = decode(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_value(entry.logprob))
        top = {text: _value(entry.logprob)}
        for token, logprob in entry.top:
            top.setdefault(decode(token), _value(logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], decode: Decode) -> dict[str, list[dict[str, Any]]]:
    """OpenAI's chat shape: each token with its UTF-8 bytes and its `top` most likely (top_logprobs)."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = decode(token)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode())}

    return {
        "content": [
            {**item(entry.token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}
            for entry in entries
        ]
    }


def vllm_prompt_logprobs(
    entries: Sequence[TokenLogprob | None], decode: Decode
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first None), its id and its `top` most likely, each
    with logprob, rank and decoded_token."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranked = {entry.token_id: (entry.logprob, entry.rank)}
        for rank, (token, logprob) in enumerate(entry.top, start=1):
            ranked.setdefault(token, (logprob, rank))
        out.append(
            {
                str(token): {"logprob": _value(logprob), "rank": rank, "decoded_token": decode(token)}
                for token, (logprob, rank) in ranked.items()
            }
        )
    return out
