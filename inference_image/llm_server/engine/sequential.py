"""An engine that decodes one request at a time on a worker thread, with a KV cache, token by token.

It streams every token as it is made, frees its slot at once when the consumer goes away, and bounds the
queue (429 beyond it). The event loop never runs model code: a dedicated thread does, and hands deltas
back with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch

from llm_server.engine.detokenizer import IncrementalDetokenizer
from llm_server.engine.interface import (
    ContextTooLong,
    Delta,
    ModelCard,
    Prompt,
    QueueFull,
    SamplingParams,
    UnknownModel,
)
from llm_server.engine.loading import LoadedModel, attach_adapter, detach_adapter
from llm_server.engine.sampling import make_generator, sample
from llm_server.engine.stops import StopMatcher

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Job:
    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Delta | BaseException]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def emit(self, item: Delta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class SequentialEngine:
    def __init__(self, loaded: LoadedModel, base_model: str, max_queued: int) -> None:
        self._loaded = loaded
        self._base_model = base_model
        self._max_queued = max_queued
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._current: Job | None = None
        self._lock = threading.Lock()  # guards _waiting and _current
        self._model_lock = threading.Lock()  # held while the model runs or its adapters change
        self._worker = threading.Thread(target=self._work, name="engine", daemon=True)
        self._worker.start()

    # -- what the HTTP layer reads ------------------------------------------------------------------
    @property
    def base_model(self) -> str:
        return self._base_model

    @property
    def max_model_len(self) -> int:
        return self._loaded.max_model_len

    @property
    def running(self) -> int:
        return 0 if self._current is None else 1

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """(running, waiting) adapter names, for vllm:lora_requests_info."""
        with self._lock:
            running = [self._current.prompt.model] if self._current is not None else []
            waiting = [job.prompt.model for job in self._waiting]
        adapters = self._loaded.adapters
        return sorted({m for m in running if m in adapters}), sorted({m for m in waiting if m in adapters})

    def models(self) -> list[ModelCard]:
        cards = [ModelCard(self._base_model, None, "base")]
        cards += [
            ModelCard(name, self._base_model, path) for name, path in sorted(self._loaded.adapters.items())
        ]
        return cards

    def _adapter_for(self, model: str) -> str | None:
        if model == self._base_model:
            return None
        if model in self._loaded.adapters:
            return model
        raise UnknownModel(f"The model `{model}` does not exist.")

    # -- tokenization -------------------------------------------------------------------------------
    def encode_chat(self, model: str, messages: list[dict[str, str]]) -> Prompt:
        self._adapter_for(model)
        ids = self._loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return Prompt(model, tuple(int(i) for i in ids), json.dumps(messages, ensure_ascii=False))

    def encode_text(self, model: str, text: str) -> Prompt:
        self._adapter_for(model)
        return Prompt(model, tuple(self._loaded.tokenizer.encode(text)), text)

    def check_budget(self, prompt: Prompt, max_tokens: int) -> None:
        prompt_len, limit = len(prompt.token_ids), self.max_model_len
        if prompt_len + max_tokens > limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or completion."
            )

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        """Admits the request now (QueueFull here, before any response is started), then streams."""
        self._adapter_for(prompt.model)
        job = Job(prompt, params, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            # One request decodes at a time; max_queued more may wait behind it.
            in_system = len(self._waiting) + (self._current is not None)
            if in_system >= 1 + self._max_queued:
                raise QueueFull(in_system - 1)
            self._waiting.append(job)
        self._queue.put(job)
        return self._stream(job)

    async def _stream(self, job: Job) -> AsyncIterator[Delta]:
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()  # the consumer left (disconnect, timeout) or finished: free the slot
            with self._lock:
                if job in self._waiting:
                    self._waiting.remove(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job not in self._waiting:
                    continue  # cancelled while waiting
                self._waiting.remove(job)
                self._current = job
            try:
                if not job.cancelled.is_set():
                    with self._model_lock:
                        self._run(job)
            except Exception as error:  # a failure of one request must not stop the worker
                logger.exception("generation failed")
                job.emit(RuntimeError(f"generation failed: {type(error).__name__}"))
            finally:
                with self._lock:
                    self._current = None

    @torch.inference_mode()
    def _run(self, job: Job) -> None:
        loaded, params = self._loaded, job.params
        adapter = self._adapter_for(job.prompt.model)
        selection: dict[str, Any] = loaded.adapter_names(adapter)
        generator = make_generator(params, loaded.device)
        detokenizer = IncrementalDetokenizer(loaded.tokenizer)
        stops = StopMatcher(params.stop)
        eos = loaded.tokenizer.eos_token_id
        input_ids = torch.tensor([job.prompt.token_ids], device=loaded.device)
        past = None
        produced = 0
        while True:
            output = loaded.model(input_ids=input_ids, past_key_values=past, use_cache=True, **selection)
            past = output.past_key_values
            token = sample(output.logits[0, -1], params, generator)
            produced += 1
            if job.cancelled.is_set():
                return
            if token == eos and not params.ignore_eos:
                job.emit(Delta(stops.feed(detokenizer.flush()) + stops.flush(), produced, "stop"))
                return
            text = stops.feed(detokenizer.push(token))
            if stops.stopped:
                job.emit(Delta(text, produced, "stop"))
                return
            if produced >= params.max_tokens:
                job.emit(Delta(text + stops.feed(detokenizer.flush()) + stops.flush(), produced, "length"))
                return
            if text:
                job.emit(Delta(text, produced))
            input_ids = torch.tensor([[token]], device=loaded.device)

    # -- adapters at run time -----------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.to_thread(self._locked, attach_adapter, name, path)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._locked, detach_adapter, name)

    def _locked(self, change: Any, name: str, *args: str) -> None:
        with self._model_lock:  # after the request in progress, which may be using the adapter
            change(self._loaded, name, *args)

    def shutdown(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)
