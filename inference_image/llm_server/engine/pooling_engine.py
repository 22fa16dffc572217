"""Batched pooling (embed, classify, score): the inputs of every client's requests are gathered into
batches, one forward each, in worker threads.

A request's inputs (one per text, token list or pair) join a first-come-first-served queue, longest first
within the request. Each forward takes inputs from the front while it has fewer than LLM_MAX_BATCH_SIZE and
its tokens stay within LLM_MAX_BATCH_TOKENS (pooling.batch_rows); a request larger than that spans several
forwards, and a single input longer than the budget runs alone. A request is answered when its last input is
done; one whose client left or timed out gives up its inputs still queued. The event loop only receives
answers (call_soon_threadsafe), one wake-up per forward.

An embedding model packs a forward's inputs side by side into one row (positions restarting, attention per
input: ragged_attention.py), so that clients' mixed lengths cost their own tokens rather than rows x the
longest: padding 8-64 token inputs in arrival order wasted about 40% of each forward. Packing is used when, at
start-up, a packed forward gives the same embeddings as separate ones (models that derive positions from the
ids, such as RoBERTa's, do not: they are padded). Classifiers are always padded: their heads read each row's
first token.

On a CPU several worker threads each run a forward on one torch thread (LLM_POOLING_WORKERS, default torch's
thread count), rather than one forward on all of them: measured on 2 cores beside a load generator taking 0.4
of a core, 183 vs 123 embeddings/s, because a forward on all threads waits at every op for a thread the OS
preempted. On a GPU one worker feeds the device.

A worker whose sibling is in a forward holds its own while inputs keep arriving (LLM_POOLING_BATCH_WAIT_MS
between arrivals at most), until the next forward is full or no other forward runs: the cores are busy
anyway, and a forward of 16 inputs costs 6.8 ms of a core per embedding against 8.5 for 4 (all-MiniLM-L6-v2,
one thread). It waits for as many inputs as the largest forward running, and at least for its share
(1/workers) of the most inputs the engine held at once in the last second. Without the first, under 32
closed-loop clients each forward took the 4 or 5 inputs that had arrived since the last; without the
second, they settled into three groups of 10-11 (two in forwards, one on its way back through HTTP) rather
than two of 13-15: 3-5% fewer embeddings/s (A/B of two servers, interleaved, 2 cores). Alone (one worker,
or none busy) a forward starts at once: no latency is added.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from llm_server.engine.interface import (
    AdapterError,
    ContextTooLong,
    InvalidInput,
    ModelCard,
    PoolingInfo,
    PoolInput,
    PoolKind,
    QueueFull,
    StepTimes,
    Task,
    UnknownModel,
)
from llm_server.engine.loading import LoadedPoolingModel
from llm_server.engine.pooling import (
    activate,
    batch_rows,
    finish_embedding,
    pad_batch,
    pool_tokens,
    ragged_batch,
    unragged,
)
from llm_server.engine.ragged_attention import RAGGED_ATTENTION

logger = logging.getLogger(__name__)
PEAK_WINDOW_S = 1.0  # how far back the engine's recent load is remembered: several forwards of a busy engine


class RecentPeak:
    """The largest value recorded in the last `window` seconds (a sliding-window maximum: the deque keeps
    only values that a later, smaller one cannot outlast)."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._candidates: collections.deque[tuple[float, int]] = collections.deque()

    def record(self, now: float, value: int) -> None:
        while self._candidates and self._candidates[-1][1] <= value:
            self._candidates.pop()
        self._candidates.append((now, value))

    def peak(self, now: float) -> int:
        while self._candidates and self._candidates[0][0] < now - self._window:
            self._candidates.popleft()
        return self._candidates[0][1] if self._candidates else 0


@dataclasses.dataclass(eq=False)
class PoolJob:
    kind: PoolKind
    inputs: list[PoolInput]
    dimensions: int | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[list[float]]]
    order: list[int]  # indices of `inputs`, longest first
    results: list[list[float]]
    taken: int = 0  # of `order`, in a batch already
    done: int = 0
    cancelled: bool = False

    @property
    def untaken(self) -> int:
        """How many of its inputs are not yet in a batch."""
        return len(self.order) - self.taken

    def remaining(self) -> Iterator[int]:
        """The lengths of its inputs not yet in a batch, in the order they will be taken."""
        return (len(self.inputs[index].token_ids) for index in self.order[self.taken :])


def queued_lengths(jobs: Iterable[PoolJob]) -> list[int]:
    """The lengths of the inputs not yet in a batch, in the order the forwards will take them."""
    return [length for job in jobs for length in job.remaining()]


class PoolRequest:
    """The answer to one request; `cancel()` (the client left or timed out) frees what is still queued."""

    def __init__(self, job: PoolJob, release: Callable[[PoolJob], None]) -> None:
        self._job, self._release = job, release

    async def result(self) -> list[list[float]]:
        return await self._job.future

    def cancel(self) -> None:
        self._release(self._job)


def _answer(items: list[tuple[PoolJob, list[list[float]] | BaseException]]) -> None:
    for job, answer in items:
        if job.future.done():  # cancelled: its client is gone
            continue
        if isinstance(answer, BaseException):
            job.future.set_exception(answer)
        else:
            job.future.set_result(answer)


def _forward(loaded: LoadedPoolingModel, inputs: list[PoolInput], packed: bool) -> torch.Tensor:
    """One row per input: its pooled embedding (embed) or its logits (classify, score)."""
    if not loaded.embeds:
        return loaded.model(
            **pad_batch(inputs, loaded.pad_id, loaded.token_types, loaded.device)
        ).logits.float()
    pooling = loaded.task.pooling
    assert pooling is not None
    if packed:
        batch, spans = ragged_batch(inputs, loaded.token_types, loaded.device)
        hidden, mask = unragged(loaded.model(**batch, ragged_spans=spans).last_hidden_state, spans)
        return pool_tokens(hidden, mask, pooling.modes)
    batch = pad_batch(inputs, loaded.pad_id, loaded.token_types, loaded.device)
    return pool_tokens(loaded.model(**batch).last_hidden_state, batch["attention_mask"], pooling.modes)


PACKING_PROBE = ("Packing check: one sentence.", "And a second, somewhat longer sentence to pack beside it.")


def _packing_agrees(loaded: LoadedPoolingModel) -> bool:
    """Whether this model, its attention switched to ragged_attention.py's, embeds inputs packed into one row
    as it embeds each alone (cosine 0.9999 at least); if not, its own attention is put back."""
    model, tokenizer = loaded.model, loaded.tokenizer
    inputs = []
    for text in PACKING_PROBE:
        encoded = tokenizer(text)
        types = encoded.get("token_type_ids") if loaded.token_types else None
        inputs.append(PoolInput(tuple(encoded["input_ids"]), tuple(types) if types is not None else None))
    own = model.config._attn_implementation
    try:
        model.set_attn_implementation(RAGGED_ATTENTION)
        with torch.inference_mode():
            alone = torch.cat([_forward(loaded, [item], packed=False) for item in inputs])
            packed = _forward(loaded, inputs, packed=True)
        agrees = bool(torch.nn.functional.cosine_similarity(alone.float(), packed.float()).min() >= 0.9999)
    except Exception as error:  # a model that takes no position ids or no attention implementation
        logger.info("inputs are padded: packed forward failed", extra={"error": repr(error)})
        agrees = False
    if not agrees:
        with contextlib.suppress(Exception):  # it never left the model's own
            model.set_attn_implementation(own)
    logger.info("inputs are packed" if agrees else "inputs are padded: packing changes the embeddings")
    return agrees


class BatchPoolingEngine:
    def __init__(
        self,
        loaded: LoadedPoolingModel,
        base_model: str,
        max_batch_size: int,
        max_queued: int,
        max_batch_tokens: int,
        workers: int | None = None,
        batch_wait_s: float = 0.0,
    ) -> None:
        self._loaded = loaded
        self._base_model = base_model
        self._max_rows = max_batch_size if loaded.batchable else 1
        self._max_queued = max_queued
        self._max_batch_tokens = max_batch_tokens
        self._batch_wait_s = batch_wait_s
        self._packed = loaded.embeds and loaded.batchable and _packing_agrees(loaded)
        task = loaded.task
        self._info = PoolingInfo(
            embedding_width=loaded.embedding_width,
            is_matryoshka=task.is_matryoshka,
            matryoshka_dimensions=task.matryoshka_dimensions,
            labels=task.labels,
        )
        self._lock = threading.Lock()  # guards the queue, the started set, the jobs' counters and below
        self._changed = threading.Condition(self._lock)  # an input arrived, a forward ended, or stopping
        self._intake = threading.Lock()  # held while a worker waits for and takes a forward's inputs
        self._queue: collections.deque[PoolJob] = collections.deque()  # inputs not all in a batch yet
        self._started: set[PoolJob] = set()  # inputs in a batch, not yet answered
        self._forwards: list[int] = []  # the inputs of each forward running now
        self._last_arrival = 0.0  # time.monotonic() of the latest request
        self._held = RecentPeak(PEAK_WINDOW_S)  # inputs queued or in a forward, as each request arrives
        self._outbox: list[tuple[PoolJob, list[list[float]] | BaseException]] = []
        self._step_times = StepTimes()
        self._stopping = False
        if workers is None:
            workers = torch.get_num_threads() if loaded.device.type == "cpu" else 1
        self._threads_before = torch.get_num_threads()
        if workers > 1 and loaded.device.type == "cpu":
            torch.set_num_threads(1)  # process-wide (a server serves one model); shutdown restores it
        self._workers = [
            threading.Thread(target=self._work, name=f"pooling-engine-{index}", daemon=True)
            for index in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    # -- what the HTTP layer reads ------------------------------------------------------------------
    @property
    def task(self) -> Task:
        return self._loaded.task.task

    @property
    def tasks(self) -> frozenset[Task]:
        return self._loaded.task.serves

    @property
    def info(self) -> PoolingInfo:
        return self._info

    @property
    def base_model(self) -> str:
        return self._base_model

    @property
    def tokenizer(self) -> Any:
        return self._loaded.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._loaded.max_model_len

    @property
    def running(self) -> int:
        """Requests with inputs in a forward (or done, while others of theirs wait for the next)."""
        return len(self._started)

    @property
    def waiting(self) -> int:
        """Requests none of whose inputs has reached a forward yet."""
        with self._lock:
            return self._count_waiting()

    def _count_waiting(self) -> int:
        return sum(1 for job in self._queue if job.taken == 0)

    @property
    def generated_tokens(self) -> int:
        return 0

    @property
    def cache_usage(self) -> float:
        """No KV cache: a forward holds its activations only while it runs."""
        return 0.0

    @property
    def step_times(self) -> StepTimes:
        return self._step_times

    @property
    def prefix_cache_tokens(self) -> tuple[int, int]:
        return 0, 0  # nothing is cached between forwards

    def models(self) -> list[ModelCard]:
        return [ModelCard(self._base_model, None, "base")]

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        return [], []

    async def load_adapter(self, name: str, path: str) -> None:
        raise AdapterError(f"LoRA adapters serve generation only; this model is served for {self.task}")

    async def replace_adapter(self, name: str, path: str) -> None:
        await self.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        raise AdapterError(f"adapter {name!r} is not loaded")

    # -- tokenization -------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self._base_model:
            raise UnknownModel(f"The model `{model}` does not exist.")

    def encode_text(self, model: str, text: str, truncate: int | None, add_special_tokens: bool) -> PoolInput:
        self._check_model(model)
        pooling = self._loaded.task.pooling
        if pooling is not None and pooling.do_lower_case:  # sentence-transformers' Transformer module
            text = text.lower()
        encoded = self._loaded.tokenizer(
            text, add_special_tokens=add_special_tokens, truncation=truncate is not None, max_length=truncate
        )
        return self._checked(encoded["input_ids"], encoded.get("token_type_ids"))

    def encode_ids(self, model: str, token_ids: Sequence[int], truncate: int | None) -> PoolInput:
        self._check_model(model)
        vocab = self._loaded.vocab_size
        outside = next((token for token in token_ids if not 0 <= token < vocab), None)
        if outside is not None:
            raise InvalidInput(f"token id {outside} is outside the model's vocabulary (0 to {vocab - 1})")
        ids = list(token_ids)
        if truncate is not None and len(ids) > truncate:  # as the tokenizer truncates text
            ids = ids[-truncate:] if self._loaded.tokenizer.truncation_side == "left" else ids[:truncate]
        return self._checked(ids, None)

    def encode_pair(self, model: str, first: str, second: str, truncate: int | None) -> PoolInput:
        self._check_model(model)
        encoded = self._loaded.tokenizer(first, second, truncation=truncate is not None, max_length=truncate)
        return self._checked(encoded["input_ids"], encoded.get("token_type_ids"))

    def _checked(self, ids: Sequence[int], types: Sequence[int] | None) -> PoolInput:
        limit = self.max_model_len
        if not ids:
            raise InvalidInput("the input is empty after tokenization; send at least one token")
        if len(ids) > limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids)} tokens in the input. Please reduce the length of the input, or set "
                "truncate_prompt_tokens to truncate it."
            )
        return PoolInput(tuple(ids), tuple(types) if types is not None and self._loaded.token_types else None)

    # -- admission ----------------------------------------------------------------------------------
    def pool(self, kind: PoolKind, inputs: list[PoolInput], dimensions: int | None = None) -> PoolRequest:
        if (kind == "embed") != self._loaded.embeds or not inputs:  # the HTTP layer routes by `tasks`
            raise ValueError(f"a {self.task} model cannot {kind} {len(inputs)} inputs")
        loop = asyncio.get_running_loop()
        order = sorted(range(len(inputs)), key=lambda index: -len(inputs[index].token_ids))
        job = PoolJob(kind, inputs, dimensions, loop, loop.create_future(), order, [[] for _ in inputs])
        with self._changed:
            if self._waiting_with(job) > self._max_queued:
                raise QueueFull(self._count_waiting())
            self._queue.append(job)
            self._last_arrival = time.monotonic()
            queued = sum(item.untaken for item in self._queue)
            self._held.record(self._last_arrival, queued + sum(self._forwards))
            self._changed.notify_all()
        return PoolRequest(job, self._release)

    def _waiting_with(self, job: PoolJob) -> int:
        """How many requests would still wait, none of their inputs started, after the next forward with
        `job` queued: the queue bound counts requests as the generation engine's does, not those that the
        next forward takes (in part at least). Called under the lock."""
        queued = [*self._queue, job]
        rows = batch_rows(queued_lengths(queued), self._max_rows, self._max_batch_tokens, self._packed)
        waiting = 0
        for item in queued:
            if rows > 0:
                rows -= item.untaken
            elif item.taken == 0:
                waiting += 1
        return waiting

    def _release(self, job: PoolJob) -> None:
        with self._lock:
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
            self._started.discard(job)

    # -- the worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch: list[tuple[PoolJob, int]] = []
            in_forward = False
            with self._changed:  # idle without the intake: another worker may wait in it for a fuller forward
                while not self._stopping and not self._queue:
                    self._changed.wait()
            try:
                with self._intake, self._changed:
                    if self._stopping:
                        return
                    if not self._queue:  # another worker took them
                        continue
                    batch = self._take(self._await_fuller_forward())
                    self._forwards.append(len(batch))
                    in_forward = True
                if batch:
                    started = time.perf_counter()
                    with torch.inference_mode():
                        self._run(batch)
                    with self._lock:
                        self._step_times.observe(time.perf_counter() - started)
            except Exception as error:  # a failure fails the requests in the forward, not the worker
                logger.exception("pooling forward failed")
                self._fail({job for job, _ in batch}, error)
            finally:
                if in_forward:
                    with self._changed:
                        self._forwards.remove(len(batch))
                        self._changed.notify_all()
                self._flush()
            time.sleep(0)  # let the event loop take requests and send answers before the next forward

    def _await_fuller_forward(self) -> int:
        """While other forwards run, wait until the next one would take as many inputs as the largest of
        them and its share of the engine's recent peak (or is full), as long as inputs keep arriving (no gap
        longer than the batch wait). Matching the running forward's size, rather than waiting for it to end,
        keeps both forwards running side by side. Returns how many inputs the next forward takes. Under the
        lock, with inputs queued."""
        while True:
            lengths = queued_lengths(self._queue)
            taken = batch_rows(lengths, self._max_rows, self._max_batch_tokens, self._packed)
            if not self._forwards or self._stopping:
                return taken
            now = time.monotonic()
            share = -(-self._held.peak(now) // len(self._workers))  # rounded up
            if taken == self._max_rows or taken < len(lengths) or taken >= max(*self._forwards, share):
                return taken
            quiet_until = self._last_arrival + self._batch_wait_s
            if now >= quiet_until:
                return taken
            self._changed.wait(quiet_until - now)

    def _take(self, rows: int) -> list[tuple[PoolJob, int]]:
        """The next forward's `rows` inputs, (job, input index), from the front of the queue. Under the
        lock."""
        batch: list[tuple[PoolJob, int]] = []
        while rows and self._queue:
            job = self._queue[0]
            count = min(rows, job.untaken)
            batch += [(job, index) for index in job.order[job.taken : job.taken + count]]
            job.taken += count
            rows -= count
            self._started.add(job)
            if job.taken == len(job.order):
                self._queue.popleft()
        return batch

    def _run(self, batch: list[tuple[PoolJob, int]]) -> None:
        rows = _forward(self._loaded, [job.inputs[index] for job, index in batch], self._packed).cpu()
        answers = [self._finish(job, row) for (job, _), row in zip(batch, rows, strict=True)]
        with self._lock:
            for (job, index), answer in zip(batch, answers, strict=True):
                if job.cancelled:
                    continue
                job.results[index] = answer
                job.done += 1
                if job.done == len(job.inputs):
                    self._started.discard(job)
                    self._outbox.append((job, job.results))

    def _finish(self, job: PoolJob, row: torch.Tensor) -> list[float]:
        task = self._loaded.task
        if job.kind == "embed":
            normalize = task.pooling is not None and task.pooling.normalize
            return finish_embedding(row, job.dimensions, normalize).tolist()
        if job.kind == "classify":
            return activate(task.classify_activation, row).tolist()
        return activate(task.score_activation, row[:1]).tolist()

    def _fail(self, jobs: set[PoolJob], error: Exception) -> None:
        """Every request in a failed forward fails, also for its inputs still queued."""
        with self._lock:
            for job in jobs:
                if job in self._queue:
                    self._queue.remove(job)
                self._started.discard(job)
                self._outbox.append((job, RuntimeError(f"pooling failed: {type(error).__name__}")))

    def _flush(self) -> None:
        with self._lock:
            items, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[PoolJob, list[list[float]] | BaseException]]] = {}
        for job, answer in items:
            by_loop.setdefault(job.loop, []).append((job, answer))
        for loop, answers in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is left to read these
                loop.call_soon_threadsafe(_answer, answers)

    def shutdown(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for worker in self._workers:
            worker.join(timeout=10)
        torch.set_num_threads(self._threads_before)
