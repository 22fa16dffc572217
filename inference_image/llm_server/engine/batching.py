"""Continuous batching: every step runs all active requests together, whatever their adapter.

A request joins at the next step: its prompt is prefilled in the same forward that decodes the running
requests (attention.py), and its first token comes out of that step. It leaves the batch the moment it
finishes, hits a stop string, runs out of tokens or its client goes away; its row of the KV cache goes
with it. Rows end at a common column of one preallocated cache (slots.py), each with its own mask and
positions; at most LLM_MAX_PREFILL_TOKENS of prompt join per step, a prompt longer than
LLM_PREFILL_CHUNK_TOKENS is prefilled over several steps (slots.py places it), and while fewer wait than
decode a step that prefilled is followed by LLM_DECODE_STEPS_BETWEEN_PREFILLS steps that only decode. peft
picks each token's adapter (or none) in the same forward pass. One worker thread runs the model; the
event loop only receives deltas (call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import jinja2
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from llm_server.engine.attention import StepPlan
from llm_server.engine.detokenizer import IncrementalDetokenizer
from llm_server.engine.grammar import GrammarCompiler
from llm_server.engine.interface import (
    AdapterError,
    ContextTooLong,
    Delta,
    MessagesRejected,
    ModelCard,
    Prompt,
    QueueFull,
    SamplingParams,
    StepTimes,
    Task,
    TokenLogprob,
    UnknownModel,
)
from llm_server.engine.kv_blocks import BlockTable
from llm_server.engine.loading import BASE_ADAPTER, LoadedModel, attach_adapter, detach_adapter
from llm_server.engine.logits_adjust import LogitsState, adjust_rows
from llm_server.engine.logprobs import token_logprobs
from llm_server.engine.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache
from llm_server.engine.sampling import make_generator, sample_rows
from llm_server.engine.slots import PromptPart, SlotCache
from llm_server.engine.stops import StopMatcher

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Job:
    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Delta | BaseException]
    outbox: list[tuple[Job, Delta | BaseException]]  # the engine's: delivered once per step
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    # The adapter version chosen at admission: a replaced or removed adapter stays loaded until the
    # requests admitted before the change are done with it.
    adapter: str | None = None
    block_hashes: list[bytes] | None = None  # its prompt's, for the prefix cache: computed once

    def emit(self, item: Delta | BaseException) -> None:
        self.outbox.append((self, item))


def _deliver(items: list[tuple[Job, Delta | BaseException]]) -> None:
    for job, item in items:
        job.out.put_nowait(item)


class JobStream:
    """The deltas of one request. Closing it cancels the request, also when it was never iterated (a
    client that leaves before its first token must not leave work behind), which an async generator's
    aclose() would not do."""

    def __init__(self, job: Job, release: Callable[[Job], None]) -> None:
        self._job, self._release, self._done = job, release, False

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._job.out.get()
        except BaseException:
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            await self.aclose()
            raise item
        if item.finish_reason is not None:
            await self.aclose()
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._release(self._job)


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request in the running batch: its row of the cache, sampling state and text state."""

    job: Job
    adapter: str | None
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    length: int  # tokens in its cache (prompt + generated so far, excluding the pending token)
    next_token: int  # sampled, not yet fed to the model
    prefilled: int = 0  # prompt tokens in the cache; below the prompt's length it is not decoding yet
    chunk: int = 0  # prompt tokens per step when its prompt is prefilled in chunks (0: at once)
    produced: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)  # the tokens sampled so far
    logits_state: LogitsState | None = None  # penalties, bias, min_tokens, a grammar: only if it asks
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled while its prompt is prefilled
    token_logprob: TokenLogprob | None = None  # of the token just sampled, when asked
    # Its prompt's blocks in the prefix cache, from admission until its prefill ends (then stored).
    cache_table: BlockTable | None = None

    def delta(self, text: str, finish_reason: str | None = None) -> Delta:
        """The delta of the token just sampled (the first also carries the prompt's log probabilities)."""
        prompt = (
            tuple(self.prompt_logprobs) if self.prompt_logprobs is not None and self.produced == 1 else None
        )
        logprobs = (self.token_logprob,) if self.token_logprob is not None else ()
        return Delta(text, self.produced, finish_reason, (self.next_token,), logprobs, prompt)


def _prompt_positions(prefilling: list[Sequence], plan: StepPlan) -> list[tuple[Sequence, int, int]]:
    """(sequence, position in the step, index of the prompt token it predicts) for every prompt position in
    this step whose next token is a prompt token of a sequence that asked for prompt log probabilities."""
    scored = []
    for sequence, part in zip(prefilling, plan.prefills, strict=True):
        if sequence.prompt_logprobs is None:
            continue
        done = sequence.prefilled
        for step in range(part.length):
            predicted = done + step + 1
            if predicted < len(sequence.job.prompt.token_ids):
                scored.append((sequence, part.offset + step, predicted))
    return scored


def _prompt_result(sequence: Sequence) -> tuple[TokenLogprob | None, ...] | None:
    return tuple(sequence.prompt_logprobs) if sequence.prompt_logprobs is not None else None


class Batch:
    """The running sequences, row for row with their KV cache (see slots.py)."""

    def __init__(self, cache: SlotCache) -> None:
        self.sequences: list[Sequence] = []
        self.cache = cache

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def prefilling(self) -> Sequence | None:
        """The sequence whose prompt is part-way in the cache: always the last row (see `remove`)."""
        last = self.sequences[-1] if self.sequences else None
        return last if last is not None and last.prefilled < len(last.job.prompt.token_ids) else None

    def plan(self, newcomers: list[Sequence]) -> tuple[StepPlan, list[Sequence], list[Sequence]]:
        """The next step and who is in it: (plan, decoding, prefilling). Every sequence decodes except the
        prompts being prefilled: the last row's unfinished one, or the newcomers' (appended as new rows)."""
        continuing = self.prefilling
        decoding = [sequence for sequence in self.sequences if sequence is not continuing]
        prefilling = [continuing] if continuing is not None else newcomers
        parts = [
            PromptPart(len(sequence.job.prompt.token_ids), sequence.prefilled, sequence.chunk)
            for sequence in prefilling
        ]
        plan = self.cache.plan(parts, continuing=continuing is not None)
        self.sequences.extend(newcomers)
        return plan, decoding, prefilling

    def remove(self, finished: list[Sequence]) -> None:
        prefilling = self.prefilling
        rows = [row for row, sequence in enumerate(self.sequences) if sequence in finished]
        for source, target in self.cache.remove(rows):
            self.sequences[target] = self.sequences[source]
        del self.sequences[self.cache.rows :]
        if prefilling is not None and prefilling in self.sequences and self.sequences[-1] is not prefilling:
            # It filled a hole: back to the end, where decoding rows [0, n) leave it (attention.py).
            row, last = self.sequences.index(prefilling), len(self.sequences) - 1
            self.cache.swap(row, last)
            self.sequences[row], self.sequences[last] = self.sequences[last], prefilling

    def clear(self) -> None:
        self.sequences.clear()
        self.cache.clear()


@contextlib.contextmanager
def logits_only_for(model: Any, rows: list[int]) -> Iterator[None]:
    """The output layer sees only `rows` of the step's tokens: a prompt needs its last token's logits, and
    computing them for every prompt token would cost a vocabulary-wide matmul per token (128k wide on
    Llama 3). peft's per-row adapter names would no longer line up with the rows of an adapted output
    layer, so one of those is left whole (its logits are picked afterwards)."""
    head = model.get_output_embeddings()
    if head is None or isinstance(head, BaseTunerLayer):
        yield
        return
    index = torch.tensor(rows, dtype=torch.long, device=head.weight.device)
    handle = head.register_forward_pre_hook(lambda _, args: (args[0].index_select(0, index), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


GPU_PREFILL_TOKENS = 2048  # vLLM's default per-step budget: a GPU prefills that in about one decoding step
CPU_PREFILL_TOKENS_PER_ROW = 8
CPU_CHUNK_TOKENS = 512  # about 160 ms of prompt per step on the 2-core bench machine


def _reserved_tokens(job: Job) -> int:
    """Cache a request holds in the budget: what it may reach, its prompt and all its max_tokens."""
    return len(job.prompt.token_ids) + job.params.max_tokens


def chunk_tokens(device: torch.device) -> int:
    """By default, a prompt longer than this is prefilled in chunks of it while other requests decode, so
    one long prompt pauses their streams for a bounded time per step instead of all at once."""
    return GPU_PREFILL_TOKENS if device.type == "cuda" else CPU_CHUNK_TOKENS


def decode_steps_between_prefills_default(device: torch.device) -> int:
    """By default on a CPU, a step that prefilled is followed by one that only decodes, while fewer requests
    wait than decode (once as many wait as decode, their first tokens matter as much: they join step after
    step as the prefill budget allows, as with TGI's waiting_served_ratio). There a 64-token prompt costs
    about two 8-row decoding steps. The rule breaks the lockstep of closed-loop clients with equal lengths,
    where each newcomer otherwise arrives during the previous one's prefill and waits for all of it: TTFT
    p50 at 8 streams 54-56 vs 73-74 ms. With mixed lengths TTFT p50, ITL and tokens/s are the same within
    noise, and a burst's TTFT p99 rises 40-70 ms (`make bench`, docs/performance.md). On a GPU a prompt
    adds little to a step: none, as vLLM."""
    return 0 if device.type == "cuda" else 1


def prefill_budget(device: torch.device, running: int) -> int:
    """Prompt tokens one step may prefill by default (one request always fits).

    On a CPU prefill is compute-bound: prompts joining together all wait for the last one's tokens, and
    the step's decoding waits for them all, so the budget grows with the rows a prefill holds up and a
    step's pause stays in proportion to the step: about one 64-token prompt per step while few run. Measured
    at 8 streams with 64-token prompts: TTFT p50 78-79 ms with this or one prompt per step, 106 ms with 128
    tokens per step, 153 ms with 256; tokens/s at 32 streams within noise of each other."""
    if device.type == "cuda":
        return GPU_PREFILL_TOKENS
    return CPU_PREFILL_TOKENS_PER_ROW * running


class BatchingEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        base_model: str,
        max_batch_size: int,
        max_queued: int,
        max_batch_tokens: int,
        max_prefill_tokens: int | None = None,
        prefill_chunk_tokens: int | None = None,
        decode_steps_between_prefills: int | None = None,
        enable_prefix_caching: bool = True,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefix_cache_tokens: int | None = None,
    ) -> None:
        self._loaded = loaded
        self._base_model = base_model
        self._max_batch_size = max_batch_size
        self._max_queued = max_queued
        self._max_batch_tokens = max_batch_tokens
        self._max_prefill_tokens = max_prefill_tokens  # None: prefill_budget()
        self._chunk_tokens = prefill_chunk_tokens  # None: chunk_tokens(); 0: never chunk
        self._decode_steps_between_prefills = (
            decode_steps_between_prefills_default(loaded.device)
            if decode_steps_between_prefills is None
            else decode_steps_between_prefills
        )
        self._decoded_since_prefill = 0  # decoding-only steps since the last step that prefilled
        self._lock = threading.Lock()  # guards _waiting and _batch membership as seen by readers
        self._model_lock = threading.Lock()  # held while the model steps or its adapters change
        self._waiting: list[Job] = []
        # Served adapter name -> its loaded version (peft's adapter name); retired versions wait to be
        # unloaded until no request uses them.
        self._routes: dict[str, str] = {name: name for name in loaded.adapters}
        self._retired: set[str] = set()
        self._versions = itertools.count(1)
        # What the prefix cache hashes for each loaded version: a version's name comes back once the version
        # that had it is unloaded, its keys and values must not.
        self._attachments = itertools.count()
        self._weights_of: dict[str, str] = {
            key: f"{key}#{next(self._attachments)}" for key in loaded.adapters
        }
        self._joining: list[Job] = []  # out of the queue, not yet in the batch: the step being planned
        self._wakeup: queue.Queue[None] = queue.Queue()
        layers = loaded.model.config.num_hidden_layers
        self._batch = Batch(SlotCache(layers, max_batch_size, loaded.device))
        cache_tokens = max_batch_tokens // 2 if prefix_cache_tokens is None else prefix_cache_tokens
        self._prefix = (
            PrefixCache(layers, max(cache_tokens // block_size, 1), block_size)
            if enable_prefix_caching
            else None
        )
        self._outbox: list[tuple[Job, Delta | BaseException]] = []
        self._generated_tokens = 0
        self._step_times = StepTimes()
        self._grammars = GrammarCompiler(loaded.tokenizer, self.vocab_size, loaded.end_ids)  # lazy: no cost
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="engine", daemon=True)
        self._worker.start()

    # -- what the HTTP layer reads ------------------------------------------------------------------
    @property
    def task(self) -> Task:
        return "generate"

    @property
    def tasks(self) -> frozenset[Task]:
        return frozenset({"generate"})

    @property
    def base_model(self) -> str:
        return self._base_model

    @property
    def vocab_size(self) -> int:
        return int(self._loaded.model.config.vocab_size)

    @property
    def tokenizer(self) -> Any:
        return self._loaded.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._loaded.max_model_len

    @property
    def running(self) -> int:
        return len(self._batch)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def generated_tokens(self) -> int:
        return self._generated_tokens

    @property
    def cache_usage(self) -> float:
        """Held, not touched: each running or joining request holds its prompt + max_tokens of
        LLM_MAX_BATCH_TOKENS, what admission counts (a request alone may exceed it: 1)."""
        with self._lock:
            reserved = sum(map(_reserved_tokens, self._holding()))
        return min(reserved / self._max_batch_tokens, 1.0)

    @property
    def step_times(self) -> StepTimes:
        return self._step_times

    @property
    def prefix_cache_tokens(self) -> tuple[int, int]:
        prefix = self._prefix
        return (prefix.queried_tokens, prefix.hit_tokens) if prefix is not None else (0, 0)

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """Served names of the adapters running and waiting requests use."""
        with self._lock:
            running = {sequence.job.prompt.model for sequence in self._batch.sequences if sequence.adapter}
            waiting = {job.prompt.model for job in self._waiting if job.adapter}
        return sorted(running), sorted(waiting)

    def _versions_in_use(self) -> set[str]:
        """Under the lock."""
        jobs = [sequence.job for sequence in self._batch.sequences] + self._waiting + self._joining
        return {job.adapter for job in jobs if job.adapter}

    def models(self) -> list[ModelCard]:
        with self._lock:
            routes = sorted(self._routes.items())
            paths = dict(self._loaded.adapters)
        cards = [ModelCard(self._base_model, None, "base")]
        return cards + [ModelCard(name, self._base_model, paths[key]) for name, key in routes if key in paths]

    def _adapter_for(self, model: str) -> str | None:
        if model == self._base_model:
            return None
        key = self._routes.get(model)
        if key is not None:
            return key
        raise UnknownModel(f"The model `{model}` does not exist.")

    # -- tokenization -------------------------------------------------------------------------------
    def encode_chat(
        self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> Prompt:
        self._adapter_for(model)
        try:
            ids = self._loaded.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=True
            )
        except (jinja2.TemplateError, TypeError) as error:  # raise_exception, or a shape it cannot render
            raise MessagesRejected(f"the model's chat template rejected the messages: {error}") from None
        except ValueError as error:  # transformers: this tokenizer has no chat template
            raise MessagesRejected(f"this model cannot chat: {error}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return Prompt(model, tuple(int(i) for i in ids), json.dumps(messages, ensure_ascii=False))

    def encode_text(self, model: str, text: str) -> Prompt:
        self._adapter_for(model)
        return Prompt(model, tuple(self._loaded.tokenizer.encode(text)), text)

    def check_budget(self, prompt: Prompt, max_tokens: int) -> None:
        prompt_len, limit = len(prompt.token_ids), self.max_model_len
        if prompt_len == 0:  # nothing to condition on, and a step needs a token per newcomer
            raise ContextTooLong("The prompt is empty after tokenization; send at least one token.")
        if prompt_len + max_tokens > limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or completion."
            )

    # -- admission and streaming --------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        """Admits the request now (QueueFull here, before any response is started), then streams."""
        job = Job(prompt, params, asyncio.get_running_loop(), asyncio.Queue(), self._outbox)
        with self._lock:  # the version chosen and the job queued at once: no retirement unloads it between
            job.adapter = self._adapter_for(prompt.model)
            if self._queued_with(job) > self._max_queued:
                raise QueueFull(len(self._waiting))
            self._waiting.append(job)
        self._wakeup.put(None)
        return JobStream(job, self._release)

    def _queued_with(self, job: Job) -> int:
        """How many would still wait after the next admission with `job` in the queue, by `_admit`'s rule
        (free rows, then the cache budget, first come first served): the queue bound also holds when the
        cache budget, not the rows, is what keeps requests waiting. Called under the lock."""
        holding = self._holding()
        reserved = sum(map(_reserved_tokens, holding))
        queue = [*self._waiting, job]
        starting = 0
        for waiting in queue:
            if len(holding) + starting == self._max_batch_size or not self._cache_admits(
                waiting, reserved, anyone=bool(holding or starting)
            ):
                break
            reserved, starting = reserved + _reserved_tokens(waiting), starting + 1
        return len(queue) - starting

    def _holding(self) -> list[Job]:
        """The requests that hold rows and cache budget: in the batch, or taken in for the step being
        planned. Called under the lock."""
        return [sequence.job for sequence in self._batch.sequences] + self._joining

    def _cache_admits(self, job: Job, reserved: int, anyone: bool) -> bool:
        """The cache budget's rule: a request joins if its reservation fits beside what is held; alone,
        always (one request larger than the budget still runs)."""
        return not anyone or reserved + _reserved_tokens(job) <= self._max_batch_tokens

    def _release(self, job: Job) -> None:
        """The consumer finished or left (disconnect, timeout): free the queue place or the batch row."""
        job.cancelled.set()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
        self._wakeup.put(None)

    # -- the worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping:
            if self._retired:
                self._unload_retired()
            if not self._batch and not self._waiting:
                self._wakeup.get()
                continue
            newcomers: list[Sequence] = []
            try:
                with self._model_lock, torch.inference_mode():
                    self._drop_cancelled()
                    newcomers = self._admit()
                    if self._batch or newcomers:
                        started = time.perf_counter()
                        prefilled = self._step(newcomers)
                        self._decoded_since_prefill = 0 if prefilled else self._decoded_since_prefill + 1
                        self._step_times.observe(time.perf_counter() - started)
            except Exception as error:  # a failure fails the requests in the step, not the worker
                logger.exception("decoding step failed")
                self._fail_all(error, newcomers)
            finally:
                with self._lock:
                    self._joining = []  # in the batch, failed, or never started
                self._flush()
            # Model code holds the GIL for much of a small step: let the event loop take new requests
            # and send the deltas just flushed before the next step starts.
            time.sleep(0)

    def _flush(self) -> None:
        """One wake-up of each event loop per step, not one per token (the loop serves every stream)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Delta | BaseException]]] = {}
        for job, item in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, item))
        self._outbox.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is left to read these requests
                for job, _ in items:
                    job.cancelled.set()

    def _admit(self) -> list[Sequence]:
        """Takes waiting requests into the next step while slots, the cache budget and the step's prefill
        budget allow."""
        admitted: list[tuple[Job, BlockTable | None]] = []
        if self._batch.prefilling is not None:
            return []  # first come, first served: a prompt in chunks has the steps' prompt budget
        if (
            len(self._waiting) < len(self._batch)
            and self._decoded_since_prefill < self._decode_steps_between_prefills
        ):
            return []  # the decoding streams get their decoding-only step(s) between two prefills
        chunk = chunk_tokens(self._loaded.device) if self._chunk_tokens is None else self._chunk_tokens
        chunk = chunk or 2**62  # 0: never
        with self._lock:
            in_use = sum(map(_reserved_tokens, self._holding()))  # nobody is joining between steps
            prefill = 0
            budget = self._max_prefill_tokens or prefill_budget(self._loaded.device, len(self._batch))

            def joins_later(tokens: int) -> bool:  # running streams only pause for a bounded prefill
                return bool(admitted) and (prefill + tokens > budget or tokens > chunk)

            while self._waiting and len(self._batch) + len(admitted) < self._max_batch_size:
                job = self._waiting[0]
                if job.cancelled.is_set():
                    self._waiting.pop(0)
                    continue
                if not self._cache_admits(job, in_use, anyone=bool(self._batch or admitted)):
                    break  # waits for a finishing request to free cache room
                # The prefill budget and chunking count the tokens a prefill computes: past cached blocks.
                prompt = len(job.prompt.token_ids) - self._cached_prefix(job)
                if joins_later(prompt):
                    break
                table = self._cache_table(job)  # takes what _cached_prefix found: nothing changed between
                if table is None and prompt < len(job.prompt.token_ids):  # the store is too small for it
                    prompt = len(job.prompt.token_ids)
                    if joins_later(prompt):
                        break
                self._waiting.pop(0)
                admitted.append((job, table))
                in_use += _reserved_tokens(job)
                prefill += prompt
                if prompt > chunk:
                    break  # prefilled alone, in chunks while others decode
            self._joining = [job for job, _ in admitted]
        newcomers = []
        for job, table in admitted:  # each is out of the queue now: it gets a sequence or its own error
            try:
                newcomers.append(self._start(job, table, chunk if self._batch else 0))
            except UnknownModel as error:  # its adapter was unloaded while it waited
                self._release_table(table)
                job.emit(error)
            except Exception as error:
                self._release_table(table)
                logger.exception("request could not start")
                job.emit(RuntimeError(f"generation failed: {type(error).__name__}"))
        return newcomers

    def _caches(self, job: Job) -> bool:
        """Not a request that asks for its prompt's log probabilities: they need every prompt position
        computed (as vLLM)."""
        prefix = self._prefix
        return prefix is not None and not prefix.disabled and job.params.prompt_logprobs is None

    def _weights(self, job: Job) -> str:
        """What the prefix cache hashes besides the tokens: the request's adapter weights ("" for none)
        and its cache_salt. Under the lock."""
        weights = self._weights_of.get(job.adapter, job.adapter) if job.adapter is not None else ""
        salt = job.params.cache_salt
        return weights if salt is None else f"{weights}\0salt\0{salt}"

    def _hashes(self, job: Job) -> list[bytes]:
        """Under the lock."""
        if job.block_hashes is None:
            assert self._prefix is not None
            job.block_hashes = self._prefix.hashes(job.prompt.token_ids, self._weights(job))
        return job.block_hashes

    def _cached_prefix(self, job: Job) -> int:
        """Leading prompt tokens a prefill would take from the prefix cache now (nothing is counted)."""
        if self._prefix is None or not self._caches(job):
            return 0
        return self._prefix.cached_prefix(job.prompt.token_ids, self._weights(job), self._hashes(job))

    def _cache_table(self, job: Job) -> BlockTable | None:
        """The prefix cache's blocks for a joining prompt, its cached leading blocks among them; None
        without caching, for a prompt larger than the cache, and where `_caches` says no."""
        if self._prefix is None or not self._caches(job):
            return None
        return self._prefix.admit(job.prompt.token_ids, self._weights(job), self._hashes(job))

    def _release_table(self, table: BlockTable | None) -> None:
        if table is not None and self._prefix is not None:
            self._prefix.release(table)

    def _admitted_adapter(self, job: Job) -> str | None:
        if job.adapter is not None and job.adapter not in self._loaded.adapters:
            raise UnknownModel(f"The model `{job.prompt.model}` does not exist.")
        return job.adapter

    def _start(self, job: Job, table: BlockTable | None, chunk: int) -> Sequence:
        """`chunk`: tokens per step if its prompt is longer (0: all at once, nobody is decoding); `table`:
        its blocks in the prefix cache, the cached ones copied into its row when its step is planned."""
        return Sequence(
            job=job,
            adapter=self._admitted_adapter(job),
            generator=make_generator(job.params, self._loaded.device),
            detokenizer=IncrementalDetokenizer(self._loaded.tokenizer),
            stops=StopMatcher(job.params.stop),
            length=len(job.prompt.token_ids),
            next_token=0,  # sampled by the step that prefills it
            chunk=chunk
            if len(job.prompt.token_ids) - (table.cached_tokens if table else 0) > chunk > 0
            else 0,
            prefilled=table.cached_tokens if table is not None else 0,
            cache_table=table,
            prompt_logprobs=[None] if job.params.prompt_logprobs is not None else None,  # the first: none
            logits_state=LogitsState(
                job.params,
                job.prompt.token_ids,
                self._loaded.end_ids,
                self.vocab_size,
                self._loaded.device,
                self._grammars,
            )
            if job.params.adjusts_logits
            else None,
        )

    def _step(self, newcomers: list[Sequence]) -> bool:
        """One forward: every running sequence decodes its pending token, and the prompts being prefilled
        (the newcomers', or the next chunk of a long one) go through with them; sequences whose prompt is
        complete then sample their next token from their last position. True if it prefilled."""
        loaded, batch = self._loaded, self._batch
        with self._lock:
            plan, decoding, prefilling = batch.plan(newcomers)
            self._joining = []
        if self._prefix is not None:
            for sequence, part in zip(prefilling, plan.prefills, strict=True):
                if sequence.cache_table is not None and sequence in newcomers:
                    column = batch.cache.prompt_column(part)
                    self._prefix.load(batch.cache, sequence.cache_table, part.row, column)
        tokens = [sequence.next_token for sequence in decoding]
        positions = [sequence.length for sequence in decoding]
        adapters = [sequence.adapter or BASE_ADAPTER for sequence in decoding]
        for sequence, part in zip(prefilling, plan.prefills, strict=True):
            done = sequence.prefilled
            tokens += sequence.job.prompt.token_ids[done : done + part.length]
            positions += range(done, done + part.length)
            adapters += [sequence.adapter or BASE_ADAPTER] * part.length
        selection = loaded.rows.selecting(adapters) if loaded.has_peft else contextlib.nullcontext()
        device = loaded.device
        last = plan.last_tokens()
        scored = _prompt_positions(prefilling, plan)  # prompt tokens whose log probabilities were asked for
        wanted = last + [position for _, position, _ in scored]
        with selection, logits_only_for(loaded.model, wanted):
            output = loaded.model(
                input_ids=torch.tensor(tokens, device=device)[:, None],
                attention_mask=plan.decode_mask,  # 4D: transformers builds no mask of its own
                position_ids=torch.tensor(positions, device=device)[:, None],
                past_key_values=batch.cache,
                use_cache=True,
                slot_step=plan,
            )
        if self._prefix is not None:
            for sequence, part in zip(prefilling, plan.prefills, strict=True):
                if sequence.cache_table is not None and part.final:
                    column = batch.cache.prompt_column(part)
                    self._prefix.store(
                        batch.cache, sequence.cache_table, sequence.job.prompt.token_ids, part.row, column
                    )
                    sequence.cache_table = None
        batch.cache.advance()
        logits = output.logits[:, -1]
        stepped = decoding + [seq for seq, part in zip(prefilling, plan.prefills, strict=True) if part.final]
        if logits.shape[0] != len(wanted):  # an adapted output layer computed them for every token
            logits = logits[wanted]
        if scored:
            prompt_tokens = [sequence.job.prompt.token_ids[index] for sequence, _, index in scored]
            tops = [sequence.job.params.prompt_logprobs or 0 for sequence, _, _ in scored]
            for (sequence, _, _), logprob in zip(
                scored, token_logprobs(logits[len(last) :], prompt_tokens, tops), strict=True
            ):
                assert sequence.prompt_logprobs is not None
                sequence.prompt_logprobs.append(logprob)
        logits = logits[: len(last)]
        for sequence in decoding:
            sequence.length += 1
        for sequence, part in zip(prefilling, plan.prefills, strict=True):
            sequence.prefilled += part.length
        finished = []
        params, generators = [s.job.params for s in stepped], [s.generator for s in stepped]
        raw = logits
        logits = adjust_rows(logits, [s.logits_state for s in stepped])
        sampled = sample_rows(logits, params, generators)
        asking = [row for row, p in enumerate(params) if p.logprobs is not None]
        if asking:
            chosen = token_logprobs(
                raw[asking], [sampled[row] for row in asking], [params[row].logprobs or 0 for row in asking]
            )
            for row, logprob in zip(asking, chosen, strict=True):
                stepped[row].token_logprob = logprob
        for sequence, token in zip(stepped, sampled, strict=True):
            if sequence.job.params.max_tokens == 0:  # its prompt's log probabilities were all it asked for
                sequence.job.emit(Delta("", 0, "length", (), (), _prompt_result(sequence)))
                finished.append(sequence)
                continue
            sequence.next_token = token
            sequence.generated.append(token)
            if sequence.logits_state is not None:
                sequence.logits_state.observe(token)
            if self._emit(sequence):
                finished.append(sequence)
        if finished:
            self._store_histories(finished)
            self._retire(finished)
        return bool(prefilling)

    def _store_histories(self, finished: list[Sequence]) -> None:
        """Finished requests' prompts and answers go to the prefix cache (the cache is past this step's
        forward: every row's tokens end at its end column)."""
        prefix, cache = self._prefix, self._batch.cache
        if prefix is None or prefix.disabled:
            return
        end = cache.region.end
        for sequence in finished:
            if not self._caches(sequence.job) or sequence.produced < 2:
                continue  # nothing generated is in the cache yet: its last token was never fed back
            row = self._batch.sequences.index(sequence)
            history = sequence.job.prompt.token_ids + tuple(sequence.generated[:-1])
            assert len(history) == sequence.length
            with self._lock:
                weights, hashes = self._weights(sequence.job), self._hashes(sequence.job)
            prefix.store_history(cache, history, weights, hashes, row, end - sequence.length)

    def _emit(self, sequence: Sequence) -> bool:
        """Hands the sampled token to the client; True when the sequence is done. Every token makes a
        delta, also one that completes no character yet (empty text, its id): the API's time to first token
        is the first token's, and the OpenAI streams send a chunk per token, as vLLM's do."""
        job, token = sequence.job, sequence.next_token
        sequence.produced += 1
        self._generated_tokens += 1
        stops, detokenizer = sequence.stops, sequence.detokenizer
        ends = token in job.params.stop_token_ids or (
            token in self._loaded.end_ids and not job.params.ignore_eos
        )
        if ends:  # as vLLM: the ending token's text is not part of the output
            job.emit(sequence.delta(stops.feed(detokenizer.flush()) + stops.flush(), "stop"))
            return True
        if sequence.logits_state is not None and sequence.logits_state.finished:  # its grammar is complete
            text = stops.feed(detokenizer.push(token)) + stops.feed(detokenizer.flush())
            job.emit(sequence.delta(text + stops.flush(), "stop"))
            return True
        text = stops.feed(detokenizer.push(token))
        if stops.stopped:
            job.emit(sequence.delta(text, "stop"))
            return True
        if sequence.produced >= job.params.max_tokens:
            text += stops.feed(detokenizer.flush())  # the held-back text may complete a stop string
            job.emit(sequence.delta(text + stops.flush(), "stop" if stops.stopped else "length"))
            return True
        job.emit(sequence.delta(text))
        return False

    def _drop_cancelled(self) -> None:
        cancelled = [sequence for sequence in self._batch.sequences if sequence.job.cancelled.is_set()]
        if cancelled:
            self._retire(cancelled)

    def _retire(self, sequences: list[Sequence]) -> None:
        with self._lock:
            self._batch.remove(sequences)
        self._release_tables(sequences)

    def _release_tables(self, sequences: list[Sequence]) -> None:
        """Prompts that end before their prefill did (cancelled, failed) store nothing."""
        for sequence in sequences:
            self._release_table(sequence.cache_table)
            sequence.cache_table = None

    def _fail_all(self, error: Exception, newcomers: list[Sequence]) -> None:
        """A failed step may have written part of its cache: every request in it fails, the cache restarts.
        Newcomers fail too, also those the failure stopped before they joined the batch (its planning)."""
        with self._lock:
            failed = list(self._batch.sequences)
            failed += [sequence for sequence in newcomers if sequence not in failed]
            self._batch.clear()
        self._release_tables(failed)
        for sequence in failed:
            sequence.job.emit(RuntimeError(f"generation failed: {type(error).__name__}"))

    # -- adapters at run time -----------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        """vLLM's load: a name already served is refused."""
        if name in self._routes:
            raise AdapterError(f"adapter {name!r} is already loaded")
        await self.replace_adapter(name, path)

    async def replace_adapter(self, name: str, path: str) -> None:
        """Serves `name` from `path`: requests admitted before finish on the version they started with."""
        await asyncio.to_thread(self._replace_adapter, name, path)

    async def unload_adapter(self, name: str) -> None:
        """New requests for `name` get 404 at once; those admitted before it finish first."""
        with self._lock:
            key = self._routes.pop(name, None)
            if key is None:
                raise AdapterError(f"adapter {name!r} is not loaded")
            self._retired.add(key)
        self._wakeup.put(None)

    def _replace_adapter(self, name: str, path: str) -> None:
        with self._model_lock:  # between two steps
            key = name
            while key in self._loaded.adapters:
                key = f"{name}@{next(self._versions)}"
            attach_adapter(self._loaded, key, path)
            with self._lock:
                self._weights_of[key] = f"{key}#{next(self._attachments)}"
                previous = self._routes.get(name)
                self._routes[name] = key
                if previous is not None:
                    self._retired.add(previous)
        self._wakeup.put(None)

    def _unload_retired(self) -> None:
        with self._model_lock:
            with self._lock:
                idle = sorted(self._retired - self._versions_in_use())
                self._retired.difference_update(idle)
            for key in idle:
                try:
                    detach_adapter(self._loaded, key)
                except Exception:  # the model still serves: a leaked version costs memory, not requests
                    logger.exception("unloading a retired adapter failed", extra={"adapter": key})

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.put(None)
        self._worker.join(timeout=10)
