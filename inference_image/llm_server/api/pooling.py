"""From a pooling request to vectors: tokenizing with its limits, admission, timeout, disconnects and
metrics, shared by the embed, classify, score and rerank routes (generation.py is the generating twin)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

from starlette.requests import Request

from llm_server.api.errors import APIError, from_engine_error
from llm_server.api.generation import INLINE_ENCODE_CHARS, wait_for_disconnect
from llm_server.api.metrics import ServerMetrics
from llm_server.config import ServerSettings
from llm_server.engine.interface import (
    ContextTooLong,
    EngineError,
    InvalidInput,
    PoolingEngine,
    PoolInput,
    PoolKind,
)

logger = logging.getLogger(__name__)
Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


def prompt_tokens(inputs: Sequence[PoolInput]) -> int:
    return sum(len(item.token_ids) for item in inputs)


def cosine(first: Sequence[float], second: Sequence[float]) -> float:
    norms = math.sqrt(sum(x * x for x in first)) * math.sqrt(sum(y * y for y in second))
    return sum(x * y for x, y in zip(first, second, strict=True)) / norms if norms else 0.0


def as_list(inputs: Inputs) -> list[str] | list[list[int]]:
    """OpenAI's four input shapes as a list of texts or a list of token lists."""
    if isinstance(inputs, str):
        return [inputs]
    if inputs and isinstance(inputs[0], int):
        return [list(inputs)]  # type: ignore[arg-type]
    return list(inputs)  # type: ignore[arg-type]


class Pooling:
    def __init__(self, engine: PoolingEngine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine, self._settings, self._metrics = engine, settings, metrics

    def truncation(self, truncate: int | None) -> int | None:
        """vLLM's truncate_prompt_tokens: -1 is the model's limit; more than the limit is a 400."""
        limit = self.engine.max_model_len
        if truncate == -1:
            return limit
        if truncate is not None and truncate > limit:
            raise APIError(
                400,
                f"truncate_prompt_tokens={truncate} cannot be greater than max_model_len={limit}. "
                "Please request a smaller truncation size.",
                param="truncate_prompt_tokens",
            )
        return truncate

    def check_dimensions(self, dimensions: int | None) -> None:
        """OpenAI's `dimensions`, for Matryoshka models only (vLLM's rule and messages)."""
        info, name = self.engine.info, self.engine.base_model
        if dimensions is None:
            return
        if not info.is_matryoshka:
            raise APIError(
                400,
                f'Model "{name}" does not support matryoshka representation, changing output dimensions '
                "will lead to poor results.",
                param="dimensions",
            )
        if info.matryoshka_dimensions and dimensions not in info.matryoshka_dimensions:
            raise APIError(
                400,
                f'Model "{name}" only supports {list(info.matryoshka_dimensions)} matryoshka dimensions, '
                "using other output dimensions will lead to poor results.",
                param="dimensions",
            )
        if info.embedding_width is not None and dimensions > info.embedding_width:
            raise APIError(
                400,
                f"dimensions must be at most {info.embedding_width}, the model's size",
                param="dimensions",
            )

    async def encode(
        self, model: str, inputs: Inputs, truncate: int | None, add_special_tokens: bool = True
    ) -> list[PoolInput]:
        items = as_list(inputs)
        truncate = self.truncation(truncate)

        def encode_all() -> list[PoolInput]:
            encoded = []
            for index, item in enumerate(items):
                try:
                    if isinstance(item, str):
                        encoded.append(self.engine.encode_text(model, item, truncate, add_special_tokens))
                    else:
                        encoded.append(self.engine.encode_ids(model, item, truncate))
                except EngineError as error:
                    raise _input_error(error, index if len(items) > 1 else None) from None
            return encoded

        # Tokenizing a lot of text takes a while: off the event loop, which serves every request.
        size = sum(len(item) for item in items)
        return encode_all() if size < INLINE_ENCODE_CHARS else await asyncio.to_thread(encode_all)

    async def encode_pairs(
        self, model: str, pairs: Sequence[tuple[str, str]], truncate: int | None
    ) -> list[PoolInput]:
        truncate = self.truncation(truncate)

        def encode_all() -> list[PoolInput]:
            encoded = []
            for index, (first, second) in enumerate(pairs):
                try:
                    encoded.append(self.engine.encode_pair(model, first, second, truncate))
                except EngineError as error:
                    raise _input_error(error, index if len(pairs) > 1 else None) from None
            return encoded

        size = sum(len(first) + len(second) for first, second in pairs)
        return encode_all() if size < INLINE_ENCODE_CHARS else await asyncio.to_thread(encode_all)

    async def run(
        self, kind: PoolKind, inputs: list[PoolInput], request: Request, dimensions: int | None = None
    ) -> list[list[float]]:
        """One list per input. Admission happens here (429 before anything runs); a client that leaves, or
        the request timeout, frees its inputs still queued."""
        started = time.perf_counter()
        try:
            handle = self.engine.pool(kind, inputs, dimensions)
        except EngineError as error:
            raise from_engine_error(error) from None
        answer = asyncio.ensure_future(handle.result())
        watching = asyncio.ensure_future(wait_for_disconnect(request))
        timeout = self._settings.request_timeout
        try:
            done, _ = await asyncio.wait(
                {answer, watching}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            watching.cancel()
            handle.cancel()  # a no-op once answered
            if not answer.done():
                answer.cancel()
        if watching in done and answer not in done:
            raise APIError(400, "the client disconnected before the result was ready")
        if answer not in done:
            raise APIError(504, f"the request exceeded the request timeout of {timeout:g} s and was stopped")
        results = answer.result()
        seconds, tokens, model = (
            time.perf_counter() - started,
            prompt_tokens(inputs),
            self._metrics.model_name,
        )
        logger.info(
            "pooling finished",
            extra={
                "task": kind,
                "inputs": len(inputs),
                "prompt_tokens": tokens,
                "seconds": round(seconds, 3),
            },
        )
        self._metrics.prompt_tokens.labels(model).inc(tokens)
        self._metrics.e2e.labels(model).observe(seconds)
        self._metrics.success.labels(model, "stop").inc()  # vLLM finishes pooling requests as stopped
        return results

    async def score_pairs(
        self, model: str, pairs: Sequence[tuple[str, str]], truncate: int | None, request: Request
    ) -> tuple[list[float], int]:
        """(a score per pair, prompt tokens). A cross-encoder reads each pair; an embedding model scores
        the cosine similarity of the two embeddings, as vLLM's score API does for it."""
        if self.engine.task != "embed":
            inputs = await self.encode_pairs(model, pairs, truncate)
            return [result[0] for result in await self.run("score", inputs, request)], prompt_tokens(inputs)
        texts = list(dict.fromkeys(text for pair in pairs for text in pair))
        inputs = await self.encode(model, texts, truncate)
        vectors = dict(zip(texts, await self.run("embed", inputs, request), strict=True))
        return [cosine(vectors[first], vectors[second]) for first, second in pairs], prompt_tokens(inputs)


def _input_error(error: EngineError, index: int | None) -> APIError:
    """An input the model cannot take is a 400 on `input`, naming which one when the request has several."""
    if isinstance(error, ContextTooLong | InvalidInput):
        return APIError(400, (f"input {index}: " if index is not None else "") + str(error), param="input")
    return from_engine_error(error)
