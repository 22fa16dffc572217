"""The seed documents' approach, as an engine for the benchmark's comparison: one `model.generate` per
request, one request at a time, streamed through transformers' streamer (what a FastAPI handler around
`model.generate` does). It is a baseline to measure against, not part of the product."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from llm_server.config import ServerSettings
from llm_server.engine.batching import BatchingEngine
from llm_server.engine.interface import Delta, Engine, Prompt, SamplingParams
from llm_server.engine.loading import BASE_ADAPTER
from llm_server.main import build_engine


class _TokenStreamer(BaseStreamer):
    def __init__(self, on_token: Any) -> None:
        self._on_token, self._prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._on_token(token)

    def end(self) -> None:
        pass


class SeedEngine(BatchingEngine):
    """Everything (tokenization, limits, adapters) as the product engine, but generation is the seed's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._generate_lock = threading.Lock()

    def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        threading.Thread(target=self._run, args=(prompt, params, loop, out), daemon=True).start()

        async def stream() -> AsyncIterator[Delta]:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return

        return stream()

    def _adapter_selection(self, model: str) -> dict[str, Any]:
        if not self._loaded.has_peft:
            return {}
        return {"adapter_names": [self._adapter_for(model) or BASE_ADAPTER]}

    def _run(
        self,
        prompt: Prompt,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
        out: asyncio.Queue[Delta | BaseException],
    ) -> None:
        loaded = self._loaded
        produced = [0]

        def on_token(token: int) -> None:
            produced[0] += 1
            self._generated_tokens += 1
            text = loaded.tokenizer.decode([token], skip_special_tokens=True)
            finish = "length" if produced[0] >= params.max_tokens else None
            loop.call_soon_threadsafe(out.put_nowait, Delta(text, produced[0], finish, (token,)))

        ids = torch.tensor([prompt.token_ids], device=loaded.device)
        with self._generate_lock, torch.inference_mode():  # serialized, as behind one model object
            loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=params.max_tokens,
                min_new_tokens=params.max_tokens if params.ignore_eos else None,
                do_sample=params.temperature > 0,
                temperature=params.temperature or None,
                streamer=_TokenStreamer(on_token),
                pad_token_id=loaded.tokenizer.pad_token_id,
                **self._adapter_selection(prompt.model),
            )
        if produced[0] < params.max_tokens:
            loop.call_soon_threadsafe(out.put_nowait, Delta("", produced[0], "stop"))


def build_seed_engine(settings: ServerSettings) -> Engine:
    return build_engine(settings, engine_class=SeedEngine)
