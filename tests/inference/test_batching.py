"""The batching engine against `model.generate` run alone: greedy, float32, CPU, token for token."""

import asyncio
import contextlib
import itertools
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llm_server.engine.attention import SLOT_ATTENTION
from llm_server.engine.batching import BatchingEngine
from llm_server.engine.interface import ContextTooLong, Delta, Prompt, QueueFull, SamplingParams
from llm_server.engine.loading import BASE_ADAPTER, LoadedModel, load_model, pick_dtype
from llm_server.engine.stops import StopMatcher
from tests.inference.causal_models import save_windowed_model

PROMPTS = [
    "The quick brown fox",
    "Serving language models on Kubernetes: replicas, GPUs, adapters and autoscaling. Tell me more about it",
    "Hi",
    "def fibonacci(n):",
    "Bonjour, ça va ? Très bien, merci.",
]


@pytest.fixture(scope="module")
def loaded(demo: tuple[Path, Path]) -> LoadedModel:
    model, adapter = demo
    return load_model(model, {"support": adapter, "other": adapter}, "float32", "cpu", None)


@pytest.fixture()
def engine(loaded: LoadedModel):  # type: ignore[no-untyped-def]
    engine = BatchingEngine(loaded, "tiny", max_batch_size=8, max_queued=16, max_batch_tokens=4096)
    yield engine
    engine.shutdown()


@contextlib.contextmanager
def transformers_sdpa(loaded: LoadedModel) -> Iterator[None]:
    """transformers' own attention, not the engine's (attention.py), for the reference."""
    model = loaded.model.get_base_model() if loaded.has_peft else loaded.model
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(SLOT_ATTENTION)


def reference(loaded: LoadedModel, prompt: Prompt, max_tokens: int, ignore_eos: bool = False) -> list[int]:
    """What the model makes for this prompt alone: transformers' own generate and attention, greedy."""
    ids = torch.tensor([prompt.token_ids])
    adapter = prompt.model if prompt.model in loaded.adapters else BASE_ADAPTER
    with torch.inference_mode(), transformers_sdpa(loaded):
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens if ignore_eos else None,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
            **({"adapter_names": [adapter]} if loaded.has_peft else {}),
        )
    return out[0, ids.shape[1] :].tolist()


def encoded(loaded: LoadedModel, text: str) -> Prompt:
    """The prompt the engine's encode_text makes, without starting an engine."""
    return Prompt(model="tiny", token_ids=tuple(loaded.tokenizer.encode(text)))


async def collect(
    engine: BatchingEngine, prompt: Prompt, params: SamplingParams, started: asyncio.Event | None = None
) -> list[Delta]:
    deltas = []
    async for delta in engine.generate(prompt, params):
        deltas.append(delta)
        if started is not None and delta.completion_tokens >= 5:
            started.set()
    return deltas


def tokens(deltas: list[Delta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


class PrefillSpy:
    """Records (prompt tokens already in the cache, tokens computed) of every prompt part the engine plans."""

    def __init__(self, engine: BatchingEngine) -> None:
        self.parts: list[tuple[int, int]] = []
        self._plan = engine._batch.cache.plan
        engine._batch.cache.plan = self  # type: ignore[method-assign]

    def __call__(self, parts, continuing=False):  # type: ignore[no-untyped-def]
        step = self._plan(parts, continuing)
        self.parts.extend((prefill.past, prefill.length) for prefill in step.prefills)
        return step


def test_each_request_matches_generate_alone_with_mixed_adapters_and_late_joiners(
    engine: BatchingEngine, loaded: LoadedModel
) -> None:
    models = ["tiny", "support", "other", "tiny", "support"]
    prompts = [engine.encode_text(model, text) for model, text in zip(models, PROMPTS, strict=True)]
    lengths = [40, 25, 33, 12, 30]

    async def scenario() -> list[list[Delta]]:
        first_running = asyncio.Event()
        first = asyncio.create_task(
            collect(engine, prompts[0], SamplingParams(40, temperature=0), first_running)
        )
        await first_running.wait()  # the others join a batch that is already decoding
        assert engine.running == 1
        rest = [
            asyncio.create_task(collect(engine, prompt, SamplingParams(n, temperature=0)))
            for prompt, n in zip(prompts[1:], lengths[1:], strict=True)
        ]
        return await asyncio.gather(first, *rest)

    results = asyncio.run(scenario())
    for prompt, n, deltas in zip(prompts, lengths, results, strict=True):
        expected = reference(loaded, prompt, n)
        assert tokens(deltas) == expected, prompt.model
        assert deltas[-1].completion_tokens == len(expected)
        finish = "stop" if expected[-1] == loaded.tokenizer.eos_token_id else "length"
        assert deltas[-1].finish_reason == finish
        text = "".join(delta.text for delta in deltas)
        assert text == loaded.tokenizer.decode(expected, skip_special_tokens=True)
    assert engine.running == 0


def test_stop_strings_cut_the_text_where_generate_would(engine: BatchingEngine, loaded: LoadedModel) -> None:
    prompt = engine.encode_text("support", PROMPTS[1])
    expected = loaded.tokenizer.decode(reference(loaded, prompt, 30), skip_special_tokens=True)
    stop = expected[10:13]
    other = engine.encode_text("tiny", PROMPTS[0])

    async def scenario() -> tuple[list[Delta], list[Delta]]:
        return await asyncio.gather(
            collect(engine, prompt, SamplingParams(30, temperature=0, stop=(stop,))),
            collect(engine, other, SamplingParams(30, temperature=0, ignore_eos=True)),
        )

    stopped, running_on = asyncio.run(scenario())
    assert stopped[-1].finish_reason == "stop"
    assert "".join(delta.text for delta in stopped) == expected[: expected.index(stop)]
    assert running_on[-1].completion_tokens == 30, "the other request went on after its neighbour stopped"


def test_cancellation_frees_the_slot(loaded: LoadedModel) -> None:
    engine = BatchingEngine(loaded, "tiny", max_batch_size=2, max_queued=0, max_batch_tokens=4096)
    prompt = engine.encode_text("tiny", PROMPTS[0])
    long = SamplingParams(400, temperature=0, ignore_eos=True)

    async def scenario() -> None:
        streams = [engine.generate(prompt, long), engine.generate(prompt, long)]
        for stream in streams:
            await anext(stream)
        assert engine.running == 2
        with pytest.raises(QueueFull):
            engine.generate(prompt, long)
        await streams[0].aclose()  # the client went away
        for _ in range(200):
            if engine.running == 1:
                break
            await asyncio.sleep(0.01)
        assert engine.running == 1
        third = await collect(engine, prompt, SamplingParams(5, temperature=0))  # the slot is free again
        assert third[-1].completion_tokens == 5
        await streams[1].aclose()

    try:
        asyncio.run(scenario())
        for _ in range(200):
            if engine.running == 0:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert engine.running == 0
    finally:
        engine.shutdown()


def test_seeded_sampling_does_not_depend_on_the_neighbours(engine: BatchingEngine) -> None:
    prompt = engine.encode_text("tiny", PROMPTS[3])
    params = SamplingParams(20, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)

    async def alone() -> list[Delta]:
        return await collect(engine, prompt, params)

    async def crowded() -> list[Delta]:
        others = [
            collect(engine, engine.encode_text("support", text), SamplingParams(20, temperature=1.0))
            for text in PROMPTS
        ]
        results = await asyncio.gather(collect(engine, prompt, params), *others)
        return results[0]

    assert tokens(asyncio.run(alone())) == tokens(asyncio.run(crowded()))


@pytest.mark.parametrize("prefill_tokens", [None, 5], ids=["default-prefill", "5-token-chunks"])
def test_requests_arriving_and_leaving_at_random_match_generate_alone(
    loaded: LoadedModel, prefill_tokens: int | None
) -> None:
    """Churn through a small batch: rows are freed and reused, longer prompts join shorter rows and the
    cache outgrows its buffers (with 5-token chunks: long prompts prefilled over several steps while rows
    around them finish), and every request still gets exactly its solo output."""
    engine = BatchingEngine(
        loaded,
        "tiny",
        max_batch_size=3,
        max_queued=64,
        max_batch_tokens=100_000,
        prefill_chunk_tokens=prefill_tokens,
    )
    rng = random.Random(7)
    models = ["tiny", "support", "other"]
    cases = [
        (
            engine.encode_text(
                rng.choice(models), " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 6)))
            ),
            rng.randint(1, 45),
            rng.random() * 0.05,
        )
        for _ in range(18)
    ]

    async def one(prompt: Prompt, max_tokens: int, delay: float) -> list[Delta]:
        await asyncio.sleep(delay)
        return await collect(engine, prompt, SamplingParams(max_tokens, temperature=0, ignore_eos=True))

    async def scenario() -> list[list[Delta]]:
        return await asyncio.gather(*(one(*case) for case in cases))

    try:
        results = asyncio.run(scenario())
    finally:
        engine.shutdown()
    for (prompt, max_tokens, _), deltas in zip(cases, results, strict=True):
        assert len(tokens(deltas)) == max_tokens
        expected = reference(loaded, prompt, max_tokens)
        assert tokens(deltas)[: len(expected)] == expected, (prompt.model, len(prompt.token_ids))


def test_a_prompt_with_no_tokens_is_refused_before_it_reaches_a_step(engine: BatchingEngine) -> None:
    with pytest.raises(ContextTooLong, match="empty after tokenization"):
        engine.check_budget(Prompt("tiny", (), ""), 5)


def test_a_sliding_window_model_matches_generate_past_its_window(
    demo: tuple[Path, Path], tmp_path: Path
) -> None:
    """Mistral-shaped, window of 6 positions: prompts and generations well past it, several in one batch,
    prompts longer than 5 tokens prefilled in chunks."""
    save_windowed_model(demo[0], tmp_path)
    loaded = load_model(tmp_path, {}, "float32", "cpu", None)
    engine = BatchingEngine(
        loaded, "windowed", max_batch_size=4, max_queued=8, max_batch_tokens=4096, prefill_chunk_tokens=5
    )
    try:
        prompts = [engine.encode_text("windowed", text) for text in PROMPTS[:4]]
        assert max(len(prompt.token_ids) for prompt in prompts) > 6

        async def scenario() -> list[list[Delta]]:
            params = SamplingParams(24, temperature=0, ignore_eos=True)
            return await asyncio.gather(*(collect(engine, prompt, params) for prompt in prompts))

        for prompt, deltas in zip(prompts, asyncio.run(scenario()), strict=True):
            ids = torch.tensor([prompt.token_ids])
            with torch.inference_mode(), transformers_sdpa(loaded):
                out = loaded.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=24,
                    min_new_tokens=24,
                    do_sample=False,
                    pad_token_id=loaded.tokenizer.pad_token_id,
                )
            assert tokens(deltas) == out[0, ids.shape[1] :].tolist()
    finally:
        engine.shutdown()


def test_a_request_that_cannot_start_fails_alone(engine: BatchingEngine) -> None:
    """Its error reaches its own stream (no silent loss: its client would wait forever); others run on."""
    prompt = engine.encode_text("tiny", PROMPTS[0])

    async def scenario() -> tuple[BaseException | list[Delta], list[Delta]]:
        broken = collect(engine, prompt, SamplingParams(5, temperature=1.0, seed=2**64))  # no torch seed
        fine = collect(engine, prompt, SamplingParams(5, temperature=0))
        first, second = await asyncio.wait_for(asyncio.gather(broken, fine, return_exceptions=True), 30)
        return first, second

    failed, served = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and "generation failed" in str(failed)
    assert isinstance(served, list) and served[-1].finish_reason is not None
    assert engine.running == 0 and engine.waiting == 0


def test_prompts_prefilled_in_chunks_match_generate_alone(loaded: LoadedModel) -> None:
    """Prompts longer than the chunk size (4 tokens here) are prefilled over several steps while
    the others decode; requests finish in the middle of a chunked prefill (its row moves back to the end)."""
    engine = BatchingEngine(
        loaded, "tiny", max_batch_size=8, max_queued=16, max_batch_tokens=4096, prefill_chunk_tokens=4
    )
    spy = PrefillSpy(engine)
    models = ["tiny", "support", "other", "tiny", "support"]
    prompts = [engine.encode_text(model, text) for model, text in zip(models, PROMPTS, strict=True)]
    lengths = [40, 12, 3, 20, 2]
    try:

        async def scenario() -> list[list[Delta]]:
            first_running = asyncio.Event()
            first = asyncio.create_task(
                collect(engine, prompts[2], SamplingParams(lengths[0], temperature=0), first_running)
            )
            await first_running.wait()
            rest = [
                asyncio.create_task(collect(engine, prompt, SamplingParams(n, temperature=0)))
                for prompt, n in zip(prompts[:2] + prompts[3:], lengths[1:], strict=True)
            ]
            return await asyncio.gather(first, *rest)

        results = asyncio.run(scenario())
        order = [prompts[2], *prompts[:2], *prompts[3:]]
        for prompt, n, deltas in zip(order, lengths, results, strict=True):
            assert tokens(deltas) == reference(loaded, prompt, n), prompt.model
        assert any(past for past, _ in spy.parts), "no prompt was prefilled in chunks"
        assert engine.running == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("between", "decoding", "gaps"),
    [
        (0, 4, [1, 1]),  # vLLM's way: a newcomer joins at the next step, whatever the last step did
        (1, 4, [2, 2]),  # the CPU default: a decoding-only step after each prefill
        (1, 1, [1, 2]),  # as many waiting as decoding: they join step after step until fewer wait
    ],
)
def test_prompts_joining_a_decoding_batch_are_spaced_by_decoding_steps(
    loaded: LoadedModel, between: int, decoding: int, gaps: list[int]
) -> None:
    """LLM_DECODE_STEPS_BETWEEN_PREFILLS: while fewer requests wait than decode, a step that prefilled is
    followed by that many steps that only decode. Three prompts arrive together at a batch already
    decoding; one prompt joins per step (a 1-token prefill budget)."""
    engine = BatchingEngine(
        loaded,
        "tiny",
        max_batch_size=8,
        max_queued=16,
        max_batch_tokens=4096,
        max_prefill_tokens=1,
        decode_steps_between_prefills=between,
    )
    prefilled: list[int] = []  # prompts prefilled, step by step
    plan = engine._batch.cache.plan

    def spy(parts, continuing=False):  # type: ignore[no-untyped-def]
        step = plan(parts, continuing)
        prefilled.append(len(step.prefills))
        return step

    engine._batch.cache.plan = spy  # type: ignore[method-assign]
    prompt = engine.encode_text("tiny", PROMPTS[0])
    long, short = (SamplingParams(n, temperature=0, ignore_eos=True) for n in (60, 3))
    try:

        async def scenario() -> list[list[Delta]]:
            running = [asyncio.Event() for _ in range(decoding)]
            first = [asyncio.create_task(collect(engine, prompt, long, event)) for event in running]
            for event in running:
                await event.wait()
            with engine._model_lock:  # no step starts until all three wait
                prefilled.clear()
                joiners = [asyncio.create_task(collect(engine, prompt, short)) for _ in range(3)]
                while engine.waiting < 3:
                    await asyncio.sleep(0.001)
            return await asyncio.gather(*first, *joiners)

        results = asyncio.run(scenario())
        assert [deltas[-1].completion_tokens for deltas in results] == [60] * decoding + [3] * 3
        steps = [index for index, prompts in enumerate(prefilled) if prompts]
        assert [later - earlier for earlier, later in itertools.pairwise(steps)] == gaps
    finally:
        engine.shutdown()


def test_bfloat16_what_a_gpu_gets_by_default_serves_mixed_adapters_like_generate(
    demo: tuple[Path, Path],
) -> None:
    """The engine's bf16 path (the CUDA default), run on this CPU: the KV cache follows the model's dtype
    and greedy tokens follow model.generate in bf16. Only the first tokens are compared: bf16 rounding
    depends on the matrix shapes, which batching changes, so a near tie may later go the other way."""
    assert pick_dtype("auto", torch.device("cuda")) is torch.bfloat16
    model, adapter = demo
    loaded = load_model(model, {"support": adapter}, "bfloat16", "cpu", None)
    engine = BatchingEngine(loaded, "tiny", max_batch_size=8, max_queued=16, max_batch_tokens=4096)
    try:
        models = ["tiny", "support", "tiny", "support", "tiny"]
        prompts = [engine.encode_text(name, text) for name, text in zip(models, PROMPTS, strict=True)]
        params = SamplingParams(20, temperature=0, ignore_eos=True)

        async def scenario() -> list[list[Delta]]:
            with engine._model_lock:  # all five wait before the first step: the same batches every run
                streams = [asyncio.create_task(collect(engine, prompt, params)) for prompt in prompts]
                while engine.waiting < len(prompts):
                    await asyncio.sleep(0.001)
            return await asyncio.gather(*streams)

        results = asyncio.run(scenario())
        assert {layer.keys.dtype for layer in engine._batch.cache.layers if layer.keys is not None} == {
            torch.bfloat16
        }
        for prompt, deltas in zip(prompts, results, strict=True):
            assert deltas[-1].completion_tokens == 20
            expected = reference(loaded, prompt, 20)[:8]
            assert tokens(deltas)[: len(expected)] == expected, prompt.model
    finally:
        engine.shutdown()


def test_the_earliest_stop_string_ends_the_text_whichever_is_listed_first() -> None:
    """One token (or the final flush) can bring several stop strings in at once: the text ends at the first
    to appear, not at the first listed."""
    for stops in (("world", "o"), ("o", "world")):
        matcher = StopMatcher(stops)
        assert matcher.feed("hel") + matcher.feed("lo world") == "hell"
        assert matcher.stopped


def test_a_step_that_fails_before_its_newcomers_join_fails_them_too(engine: BatchingEngine) -> None:
    """A failure while the step is planned (the cache growing out of GPU memory) reaches the requests that
    were about to join: their clients get an error now, not silence until the request timeout."""
    prompt = engine.encode_text("tiny", PROMPTS[0])
    plan = engine._batch.cache.plan
    failures = iter([RuntimeError("CUDA out of memory")])

    def fails_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        for failure in failures:
            raise failure
        return plan(*args, **kwargs)

    engine._batch.cache.plan = fails_once  # type: ignore[method-assign]

    async def scenario() -> tuple[BaseException | list[Delta], ...]:
        first = collect(engine, prompt, SamplingParams(5, temperature=0))
        return tuple(await asyncio.wait_for(asyncio.gather(first, return_exceptions=True), 30))

    (failed,) = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and "generation failed" in str(failed)
    served = asyncio.run(collect(engine, prompt, SamplingParams(5, temperature=0)))
    assert served[-1].completion_tokens == 5
    assert engine.running == 0 and engine.waiting == 0


def test_every_end_of_turn_id_of_the_generation_config_ends_a_request(
    demo: tuple[Path, Path], tmp_path: Path
) -> None:
    """Chat models list end-of-turn ids beside EOS in generation_config.json (Llama 3's <|eot_id|>):
    the engine stops on each, as model.generate does, instead of running on to max_tokens."""
    model_dir = tmp_path / "model"
    shutil.copytree(demo[0], model_dir)
    plain = load_model(model_dir, {}, "float32", "cpu", None)
    prompt = encoded(plain, PROMPTS[3])
    free = reference(plain, prompt, 12, ignore_eos=True)
    turn_end = next(token for i, token in enumerate(free) if i >= 2 and token not in free[:i])
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [plain.tokenizer.eos_token_id, turn_end]
    (model_dir / "generation_config.json").write_text(json.dumps(config))

    loaded = load_model(model_dir, {}, "float32", "cpu", None)
    engine = BatchingEngine(loaded, "tiny", max_batch_size=4, max_queued=4, max_batch_tokens=4096)
    try:
        deltas = asyncio.run(collect(engine, prompt, SamplingParams(12, temperature=0)))
    finally:
        engine.shutdown()
    expected = reference(loaded, prompt, 12)
    assert expected == free[: free.index(turn_end) + 1], "model.generate stops there too"
    assert tokens(deltas) == expected
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == len(expected)


def test_the_cache_budget_holds_prompt_and_max_tokens_not_what_is_generated_twice(
    loaded: LoadedModel,
) -> None:
    """Two requests that fit the cache budget together (prompt + max_tokens each) run together, also
    when the second arrives after the first has generated some of its tokens."""
    prompt = encoded(loaded, PROMPTS[0])
    params = SamplingParams(60, temperature=0, ignore_eos=True)
    budget = 2 * (len(prompt.token_ids) + params.max_tokens)
    engine = BatchingEngine(loaded, "tiny", max_batch_size=4, max_queued=4, max_batch_tokens=budget)

    async def scenario() -> tuple[int, list[Delta]]:
        first = engine.generate(prompt, params)
        produced = 0
        async for delta in first:
            produced = delta.completion_tokens
            if produced >= 10:
                break
        second = engine.generate(prompt, params)
        await anext(second)
        first_had = engine.running
        rest = [delta async for delta in first]
        await second.aclose()
        return first_had, rest

    try:
        running_when_second_started, rest = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert running_when_second_started == 2, "the second waited for the first to finish"
    assert rest[-1].completion_tokens == 60


def test_the_queue_bound_holds_when_the_cache_budget_is_the_limit(loaded: LoadedModel) -> None:
    """Free rows are no queue room when the cache budget keeps requests out of them: beyond
    max_queued waiting, the next request is refused (429) rather than queued without bound."""
    prompt = encoded(loaded, PROMPTS[0])
    params = SamplingParams(60, temperature=0, ignore_eos=True)
    room_for_one = len(prompt.token_ids) + params.max_tokens + 10
    engine = BatchingEngine(loaded, "tiny", max_batch_size=8, max_queued=1, max_batch_tokens=room_for_one)

    async def scenario() -> list[Delta]:
        running = engine.generate(prompt, params)
        await anext(running)
        queued = engine.generate(prompt, params)  # the budget is full: it waits, the queue is full
        with pytest.raises(QueueFull):
            engine.generate(prompt, params)
        assert engine.running == 1 and engine.waiting == 1
        await running.aclose()
        return [delta async for delta in queued]  # it starts once the first one's cache is free

    try:
        served = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert served[-1].completion_tokens == 60
