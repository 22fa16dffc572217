"""From a tokenized prompt to text: limits, timeout, disconnects and metrics, shared by every route."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any

from starlette.requests import Request

from llm_server.api.errors import APIError, from_engine_error
from llm_server.api.metrics import ServerMetrics
from llm_server.api.schemas import SamplingFields
from llm_server.config import ServerSettings
from llm_server.engine.interface import (
    Delta,
    Engine,
    EngineError,
    GrammarSpec,
    Prompt,
    SamplingParams,
    ServingEngine,
    TokenLogprob,
)

logger = logging.getLogger(__name__)


def served_model(engine: ServingEngine, requested: str | None) -> str:
    """The model a request names (the base model when it names none), or a 404 naming `model`."""
    if requested is None:
        return engine.base_model
    if requested not in {card.name for card in engine.models()}:
        raise APIError(404, f"The model `{requested}` does not exist.", param="model")
    return requested


def check_vocabulary(token_ids: Iterable[int], vocab: int, param: str) -> None:
    """A 400 naming `param` for the first id outside 0..vocab-1."""
    outside = next((token for token in token_ids if not 0 <= token < vocab), None)
    if outside is not None:
        raise APIError(
            400, f"token id {outside} is outside the model's vocabulary (0 to {vocab - 1})", param=param
        )


@dataclasses.dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # when asked, one per token
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


class ObservedStream:
    """Deltas with metrics and the timeout applied; aclose() reaches the engine even if iteration never
    began, so a client that leaves before the first token cancels its request."""

    def __init__(self, observed: AsyncGenerator[Delta, None], engine_stream: AsyncIterator[Delta]) -> None:
        self._observed, self._engine_stream = observed, engine_stream

    def __aiter__(self) -> ObservedStream:
        return self

    async def __anext__(self) -> Delta:
        return await self._observed.__anext__()

    async def aclose(self) -> None:
        # The engine first: its aclose() never suspends, so it completes even inside a cancelled scope
        # (a disconnect cancels the response's task group, and every later await there is cancelled too).
        await self._engine_stream.aclose()  # type: ignore[attr-defined]
        with contextlib.suppress(RuntimeError):  # the generator may be mid-step in a cancelled task
            await self._observed.aclose()


class StreamGroup:
    """Several generations streamed as one response (n choices, several prompts): (index, delta) as they
    come; aclose() ends every one of them."""

    def __init__(self, streams: list[ObservedStream]) -> None:
        self._streams = streams

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        if len(self._streams) == 1:  # no tasks and no queue for the common case
            async for delta in self._streams[0]:
                yield 0, delta
            return
        arrived: asyncio.Queue[tuple[int, Delta | Exception | None]] = asyncio.Queue()

        async def pump(index: int, stream: ObservedStream) -> None:
            try:
                async for delta in stream:
                    arrived.put_nowait((index, delta))
            except Exception as error:  # raised where the response is written (an error event)
                arrived.put_nowait((index, error))
            arrived.put_nowait((index, None))

        pumps = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(self._streams)]
        try:
            running = len(pumps)
            while running:
                index, item = await arrived.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in pumps:
                task.cancel()

    async def aclose(self) -> None:
        for stream in self._streams:
            await stream.aclose()


INLINE_ENCODE_CHARS = 16_384  # about a millisecond of tokenizing


class Generation:
    def __init__(self, engine: Engine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine, self._settings, self._metrics = engine, settings, metrics

    # Tokenizing (and templating) a long prompt takes a while: off the event loop, which serves every
    # stream. A short one stays on it: the thread hop would cost more than the encoding.
    async def encode_chat(
        self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> Prompt:
        size = sum(len(message["content"]) + 100 for message in messages)  # templating costs per message too
        if tools is None:
            return await self._encode(self.engine.encode_chat, model, messages, size=size)
        encode = functools.partial(self.engine.encode_chat, tools=tools)
        return await self._encode(encode, model, messages, size=size + len(json.dumps(tools)))

    async def encode_text(self, model: str, text: str) -> Prompt:
        return await self._encode(self.engine.encode_text, model, text, size=len(text))

    def prompt_of_ids(self, model: str, token_ids: list[int], param: str) -> Prompt:
        """A prompt sent as token ids: each within the vocabulary, the model one this server serves."""
        served_model(self.engine, model)
        check_vocabulary(token_ids, self.engine.vocab_size, param)
        return Prompt(model=model, token_ids=tuple(token_ids))

    @staticmethod
    async def _encode(encode: Callable[[str, Any], Prompt], model: str, content: Any, size: int) -> Prompt:
        try:
            if size < INLINE_ENCODE_CHARS:
                return encode(model, content)
            return await asyncio.to_thread(encode, model, content)
        except EngineError as error:
            raise from_engine_error(error) from None

    def params(
        self,
        prompt: Prompt,
        max_tokens: int | None,
        fields: SamplingFields,
        grammar: GrammarSpec | None = None,
    ) -> SamplingParams:
        """The engine's parameters for one request: without max_tokens it may use the rest of the context
        (as vLLM), or LLM_DEFAULT_MAX_TOKENS where set; LLM_MAX_NEW_TOKENS, where set, caps either."""
        cap = self._settings.max_new_tokens
        if max_tokens is not None and cap is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens must be at most {cap}; got {max_tokens}", param="max_tokens")
        room = self.engine.max_model_len - len(prompt.token_ids)
        if max_tokens is None:
            limits = [room, self._settings.default_max_tokens, cap]
            max_tokens = max(min(limit for limit in limits if limit is not None), 1)
        try:
            self.engine.check_budget(prompt, max_tokens)
        except EngineError as error:
            raise from_engine_error(error) from None
        if fields.min_tokens > max_tokens:
            raise APIError(
                400, f"min_tokens ({fields.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens"
            )
        vocab = self.engine.vocab_size
        if fields.min_tokens and len(set(fields.stop_token_ids or ())) >= vocab - 1:
            raise APIError(
                400, "stop_token_ids leave no token to generate before min_tokens", param="stop_token_ids"
            )
        biases = fields.logit_biases()
        check_vocabulary([token for token, _ in biases], vocab, "logit_bias")
        check_vocabulary(fields.stop_token_ids or (), vocab, "stop_token_ids")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=fields.temperature,
            top_p=fields.top_p,
            top_k=fields.top_k if 0 < fields.top_k < vocab else 0,  # at least the vocabulary: every token
            min_p=fields.min_p,
            seed=fields.seed,
            ignore_eos=fields.ignore_eos,
            stop=fields.stop_strings(),
            stop_token_ids=tuple(fields.stop_token_ids or ()),
            min_tokens=fields.min_tokens,
            repetition_penalty=fields.repetition_penalty,
            presence_penalty=fields.presence_penalty,
            frequency_penalty=fields.frequency_penalty,
            logit_bias=biases,
            grammar=grammar,
            cache_salt=fields.cache_salt,
        )

    def start(self, prompt: Prompt, params: SamplingParams) -> ObservedStream:
        """Admission happens here, so a full queue is a 429 before any response starts."""
        try:
            deltas = self.engine.generate(prompt, params)
        except EngineError as error:
            raise from_engine_error(error) from None
        return ObservedStream(self._observed(prompt, deltas), deltas)

    async def _observed(self, prompt: Prompt, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        metrics, model = self._metrics, self._metrics.model_name
        started = last = time.perf_counter()
        seen = 0
        generated: list[str] = []
        if self._settings.log_prompts:  # off by default: prompts may hold personal data
            logger.info("prompt", extra={"model": prompt.model, "prompt": prompt.text})
        deadline = started + self._settings.request_timeout
        try:
            while True:
                try:
                    delta = await asyncio.wait_for(
                        anext(deltas), timeout=max(deadline - time.perf_counter(), 0)
                    )
                except StopAsyncIteration:
                    return
                except EngineError as error:  # e.g. its adapter was unloaded while it waited: 404
                    raise from_engine_error(error) from None
                except TimeoutError:
                    raise APIError(
                        504,
                        f"generation exceeded the request timeout of "
                        f"{self._settings.request_timeout:g} s and was stopped",
                    ) from None
                now = time.perf_counter()
                new_tokens = delta.completion_tokens - seen
                if seen == 0:
                    metrics.ttft.labels(model).observe(now - started)
                    new_tokens -= 1
                for _ in range(max(new_tokens, 0)):
                    metrics.itl.labels(model).observe((now - last) / max(new_tokens, 1))
                seen, last = delta.completion_tokens, now
                if self._settings.log_prompts:
                    generated.append(delta.text)
                if delta.finish_reason is not None:
                    logger.info(
                        "generation finished",
                        extra={
                            "model": prompt.model,
                            "prompt_tokens": len(prompt.token_ids),
                            "completion_tokens": delta.completion_tokens,
                            "finish_reason": delta.finish_reason,
                            "seconds": round(now - started, 3),
                            **({"completion": "".join(generated)} if self._settings.log_prompts else {}),
                        },
                    )
                    metrics.prompt_tokens.labels(model).inc(len(prompt.token_ids))
                    metrics.e2e.labels(model).observe(now - started)
                    metrics.success.labels(model, delta.finish_reason).inc()
                yield delta
        finally:
            await deltas.aclose()  # cancels the generation if it is still running

    async def complete(self, prompt: Prompt, params: SamplingParams, request: Request) -> Completion:
        """The whole text; a client that disconnects first cancels the generation."""
        (completion,) = await self.complete_many([(prompt, params)], request)
        return completion

    async def start_many(self, jobs: list[tuple[Prompt, SamplingParams]], param: str) -> list[ObservedStream]:
        """All admitted or none: a 429 leaves nothing running."""
        capacity = self._settings.max_batch_size + self._settings.max_queued_requests
        if len(jobs) > capacity:  # it could never be admitted whole: a 429 would be retried forever
            raise APIError(
                400,
                f"a batch of {len(jobs)} prompts exceeds what this server holds at once ({capacity})",
                param=param,
            )
        started: list[ObservedStream] = []
        try:
            for prompt, params in jobs:
                started.append(self.start(prompt, params))
        except APIError:
            for deltas in started:
                await deltas.aclose()
            raise
        return started

    async def complete_many(
        self, jobs: list[tuple[Prompt, SamplingParams]], request: Request, param: str = "prompts"
    ) -> list[Completion]:
        """All admitted or none (a 429 leaves nothing running); all cancelled if the client leaves."""
        started = await self.start_many(jobs, param)

        async def collect(prompt: Prompt, deltas: AsyncIterator[Delta]) -> Completion:
            parts, last = [], None
            completion = Completion("", len(prompt.token_ids), 0, "")
            async for delta in deltas:
                parts.append(delta.text)
                completion.token_ids += delta.token_ids
                completion.logprobs += delta.logprobs
                if delta.prompt_logprobs is not None:
                    completion.prompt_logprobs = delta.prompt_logprobs
                last = delta
            assert last is not None and last.finish_reason is not None
            completion.text, completion.completion_tokens = "".join(parts), last.completion_tokens
            completion.finish_reason = last.finish_reason
            return completion

        gathered = asyncio.gather(
            *(collect(prompt, deltas) for (prompt, _), deltas in zip(jobs, started, strict=True))
        )
        collecting = asyncio.ensure_future(gathered)
        watching = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            if not collecting.done():
                collecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collecting
        if collecting not in done:
            raise APIError(400, "the client disconnected before the completion was ready")
        return collecting.result()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is read: what is left to receive is its disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
