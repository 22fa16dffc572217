"""Automatic prefix caching (issue 17): a prompt that starts with blocks an earlier prompt computed gets them
copied into its row instead of computing them, and its output stays token for token what `model.generate`
makes alone (greedy, float32), with adapters, chunked prefill, sliding windows and cancellation."""

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from llm_server.engine.batching import BatchingEngine
from llm_server.engine.interface import Delta, Prompt, SamplingParams
from llm_server.engine.loading import LoadedModel, load_model
from tests.inference.causal_models import save_windowed_model
from tests.inference.harness import running_server
from tests.inference.test_batching import PROMPTS, PrefillSpy, collect, reference, tokens

BLOCK = 4


@pytest.fixture(scope="module")
def loaded(demo: tuple[Path, Path]) -> LoadedModel:
    model, adapter = demo
    return load_model(model, {"support": adapter}, "float32", "cpu", None)


def cached_part(prompt_length: int) -> int:
    """What a prompt whose every block is cached takes from the cache: its full blocks, but never its last
    token (its logits give the first output token)."""
    return (prompt_length - 1) // BLOCK * BLOCK


def ids(engine: BatchingEngine, text: str) -> tuple[int, ...]:
    return engine.encode_text("tiny", text).token_ids


@pytest.mark.parametrize("caching", [True, False])
def test_a_prompt_that_starts_like_an_earlier_one_computes_only_the_rest_and_matches_generate(
    loaded: LoadedModel, caching: bool
) -> None:
    engine = BatchingEngine(
        loaded,
        "tiny",
        max_batch_size=8,
        max_queued=16,
        max_batch_tokens=4096,
        enable_prefix_caching=caching,
        block_size=BLOCK,
    )
    spy = PrefillSpy(engine)
    shared = ids(engine, PROMPTS[1])
    longer = shared + ids(engine, PROMPTS[3])
    first = Prompt("tiny", shared)
    # After the first: the same history continued, the same prompt again, and the history under an
    # adapter (a LoRA changes keys and values: nothing to share with the base model's blocks).
    later = [Prompt("tiny", longer), Prompt("tiny", shared), Prompt("support", longer)]
    params = SamplingParams(12, temperature=0)
    try:
        alone = asyncio.run(collect(engine, first, params))

        async def together() -> list[list[Delta]]:
            return await asyncio.gather(*(collect(engine, prompt, params) for prompt in later))

        results = [alone, *asyncio.run(together())]
        for prompt, deltas in zip([first, *later], results, strict=True):
            assert tokens(deltas) == reference(loaded, prompt, 12), prompt.model
        hits = [cached_part(len(shared) + 1), cached_part(len(shared)), 0] if caching else [0, 0, 0]
        computed = sorted(spy.parts[1:])
        expected = sorted((hit, len(prompt.token_ids) - hit) for hit, prompt in zip(hits, later, strict=True))
        assert computed == expected  # the cached blocks were not computed again
        queried = sum(len(prompt.token_ids) for prompt in [first, *later])
        assert engine.prefix_cache_tokens == ((queried, sum(hits)) if caching else (0, 0))
        if caching:
            assert engine._prefix is not None and engine._prefix.blocks.usage == 0  # nothing held after
    finally:
        engine.shutdown()


def test_cached_blocks_past_a_sliding_window_and_prompts_in_chunks_match_generate(
    demo: tuple[Path, Path], tmp_path: Path
) -> None:
    """The cached part of a prompt lies partly outside the window of its first computed token; the prompts
    are prefilled in chunks of 5 while a neighbour decodes."""
    save_windowed_model(demo[0], tmp_path)
    loaded = load_model(tmp_path, {}, "float32", "cpu", None)
    engine = BatchingEngine(
        loaded,
        "windowed",
        max_batch_size=4,
        max_queued=8,
        max_batch_tokens=4096,
        prefill_chunk_tokens=5,
        block_size=BLOCK,
    )
    spy = PrefillSpy(engine)
    shared = engine.encode_text("windowed", PROMPTS[1]).token_ids
    assert len(shared) > 6 + 2 * BLOCK
    prompts = [
        Prompt("windowed", shared),
        Prompt("windowed", shared + engine.encode_text("windowed", PROMPTS[0]).token_ids),
        Prompt("windowed", shared),
    ]
    neighbour = engine.encode_text("windowed", PROMPTS[3])
    params = SamplingParams(16, temperature=0, ignore_eos=True)
    try:

        async def scenario() -> list[list[Delta]]:
            decoding = asyncio.Event()
            params_long = SamplingParams(150, temperature=0, ignore_eos=True)  # decodes past the last prompt
            running = asyncio.create_task(collect(engine, neighbour, params_long, decoding))
            await decoding.wait()
            results = [await collect(engine, prompt, params) for prompt in prompts]
            await running
            return results

        for prompt, deltas in zip(prompts, asyncio.run(scenario()), strict=True):
            assert tokens(deltas) == reference(loaded, prompt, 16, ignore_eos=True)
        hits = engine.prefix_cache_tokens[1]
        assert hits == cached_part(len(shared) + 1) + cached_part(len(shared))
        every_prompt = len(neighbour.token_ids) + sum(len(prompt.token_ids) for prompt in prompts)
        assert sum(length for _, length in spy.parts) == every_prompt - hits  # the hits were not computed
    finally:
        engine.shutdown()


def test_a_prompt_cancelled_part_way_through_its_chunks_stores_nothing_and_holds_no_block(
    loaded: LoadedModel,
) -> None:
    engine = BatchingEngine(
        loaded,
        "tiny",
        max_batch_size=4,
        max_queued=8,
        max_batch_tokens=4096,
        prefill_chunk_tokens=4,
        block_size=BLOCK,
    )
    prompt = Prompt("tiny", ids(engine, PROMPTS[1]))
    assert len(prompt.token_ids) > 4 * BLOCK
    neighbour = Prompt("tiny", ids(engine, PROMPTS[0]))
    chunks_done = asyncio.Event()
    loops: list[asyncio.AbstractEventLoop] = []
    plan = engine._batch.cache.plan

    def spy(parts, continuing=False):  # type: ignore[no-untyped-def]
        step = plan(parts, continuing)
        if not chunks_done.is_set() and any(prefill.past >= 2 * BLOCK for prefill in step.prefills):
            # Its client leaves now: the engine drops it at the next step, before its next chunk.
            engine._batch.sequences[-1].job.cancelled.set()
            loops[0].call_soon_threadsafe(chunks_done.set)
        return step

    engine._batch.cache.plan = spy  # type: ignore[method-assign]

    async def scenario() -> list[Delta]:
        loops.append(asyncio.get_running_loop())
        decoding = asyncio.Event()
        params = SamplingParams(200, temperature=0, ignore_eos=True)
        running = asyncio.create_task(collect(engine, neighbour, params, decoding))
        await decoding.wait()  # a decoding neighbour: the long prompt goes in chunks of 4
        cancelled = asyncio.create_task(collect(engine, prompt, SamplingParams(5, temperature=0)))
        await chunks_done.wait()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        for _ in range(500):
            if engine.running == 1 and engine._prefix is not None and engine._prefix.blocks.usage == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.running == 1
        assert engine._prefix is not None and engine._prefix.blocks.usage == 0  # its blocks went back
        again = await collect(engine, prompt, SamplingParams(8, temperature=0, ignore_eos=True))
        running.cancel()
        return again

    try:
        again = asyncio.run(scenario())
        assert engine.prefix_cache_tokens[1] == 0  # the cancelled prompt left nothing to hit
        assert tokens(again) == reference(loaded, prompt, 8, ignore_eos=True)
    finally:
        engine.shutdown()


def test_a_request_for_prompt_logprobs_computes_its_whole_prompt_even_when_cached(
    loaded: LoadedModel,
) -> None:
    engine = BatchingEngine(
        loaded, "tiny", max_batch_size=4, max_queued=8, max_batch_tokens=4096, block_size=BLOCK
    )
    prompt = Prompt("tiny", ids(engine, PROMPTS[1]))
    try:
        asyncio.run(collect(engine, prompt, SamplingParams(2, temperature=0)))
        queried = engine.prefix_cache_tokens
        deltas = asyncio.run(collect(engine, prompt, SamplingParams(2, temperature=0, prompt_logprobs=1)))
        assert engine.prefix_cache_tokens == queried  # not looked up: every position's logprobs are needed
        first = deltas[0].prompt_logprobs
        assert first is not None and len(first) == len(prompt.token_ids)
        assert first[0] is None and all(entry is not None for entry in first[1:])
    finally:
        engine.shutdown()


def test_metrics_count_prefix_cache_queries_and_hits_under_vllm_names(demo: tuple[Path, Path]) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 3}
    with running_server(demo[0], served_model_name="tiny", block_size=BLOCK) as server:
        for _ in range(2):
            response = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
            assert response.status_code == 200
        prompt_tokens = response.json()["usage"]["prompt_tokens"]
        text = httpx.get(f"{server.url}/metrics").text
        assert "vllm:prefix_cache_queries_total" in text and "vllm:prefix_cache_hits_total" in text
        labels = {"model_name": "tiny"}
        assert server.metric("vllm:prefix_cache_queries_total", labels) == 2 * prompt_tokens
        assert server.metric("vllm:prefix_cache_hits_total", labels) == cached_part(prompt_tokens)
    with running_server(
        demo[0], served_model_name="tiny", block_size=BLOCK, enable_prefix_caching=False
    ) as server:
        for _ in range(2):
            assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        assert server.metric("vllm:prefix_cache_hits_total", {"model_name": "tiny"}) == 0


def other_weights(adapter: Path, path: Path) -> Path:
    """The adapter's shape with other weights: its LoRA B matrices negated."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, path)
    weights = load_file(path / "adapter_model.safetensors")
    save_file(
        {name: -tensor if "lora_B" in name else tensor for name, tensor in weights.items()},
        path / "adapter_model.safetensors",
    )
    return path


def test_an_adapter_loaded_again_under_a_freed_name_does_not_get_the_old_weights_blocks(
    demo: tuple[Path, Path], tmp_path: Path
) -> None:
    """Replacing `support` twice gives its third weights the version name the first had (the first is
    unloaded by then): the first weights' cached blocks must not be found for them."""
    model, adapter = demo
    loaded = load_model(model, {"support": adapter}, "float32", "cpu", None)
    engine = BatchingEngine(
        loaded, "tiny", max_batch_size=4, max_queued=8, max_batch_tokens=4096, block_size=BLOCK
    )
    prompt = Prompt("support", ids(engine, PROMPTS[1]))
    params = SamplingParams(10, temperature=0)
    try:
        asyncio.run(collect(engine, prompt, params))
        base = Prompt("tiny", prompt.token_ids)  # the same tokens without the adapter: other keys and values
        assert tokens(asyncio.run(collect(engine, base, params))) == reference(loaded, base, 10)
        assert engine.prefix_cache_tokens[1] == 0
        asyncio.run(engine.replace_adapter("support", str(adapter)))
        for _ in range(500):  # the first version is unloaded once no request uses it
            if "support" not in loaded.adapters:
                break
            asyncio.run(asyncio.sleep(0.01))
        asyncio.run(engine.replace_adapter("support", str(other_weights(adapter, tmp_path / "negated"))))
        assert engine._routes["support"] == "support"  # the first version's name, other weights
        deltas = asyncio.run(collect(engine, prompt, params))
        assert engine.prefix_cache_tokens[1] == 0
        assert tokens(deltas) == reference(loaded, prompt, 10)
    finally:
        engine.shutdown()


class NoMemoryForEmpty:
    """torch, except that `empty` fails as a full GPU does."""

    def __getattr__(self, name: str) -> object:
        if name == "empty":

            def empty(*args: object, **kwargs: object) -> None:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

            return empty
        return getattr(torch, name)


def test_a_store_that_cannot_be_allocated_turns_caching_off_and_fails_no_request(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm_server.engine import prefix_cache

    monkeypatch.setattr(prefix_cache, "torch", NoMemoryForEmpty())
    engine = BatchingEngine(
        loaded, "tiny", max_batch_size=4, max_queued=8, max_batch_tokens=4096, block_size=BLOCK
    )
    prompt = Prompt("tiny", ids(engine, PROMPTS[1]))
    try:
        for _ in range(2):
            deltas = asyncio.run(collect(engine, prompt, SamplingParams(10, temperature=0)))
            assert tokens(deltas) == reference(loaded, prompt, 10)
        assert engine._prefix is not None and engine._prefix.disabled
        assert engine.prefix_cache_tokens == (len(prompt.token_ids), 0)  # the second was not looked up
    finally:
        engine.shutdown()


def test_the_next_turn_of_a_conversation_finds_the_previous_answer_in_the_cache(loaded: LoadedModel) -> None:
    """A finished request's prompt and answer are stored: the client resends both with its next message."""
    engine = BatchingEngine(
        loaded, "tiny", max_batch_size=4, max_queued=8, max_batch_tokens=4096, block_size=BLOCK
    )
    spy = PrefillSpy(engine)
    first = Prompt("tiny", ids(engine, PROMPTS[1]))
    params = SamplingParams(12, temperature=0)
    try:
        answer = tokens(asyncio.run(collect(engine, first, params)))
        assert len(answer) >= 2
        second = Prompt("tiny", first.token_ids + tuple(answer) + ids(engine, PROMPTS[3]))
        assert tokens(asyncio.run(collect(engine, second, params))) == reference(loaded, second, 12)
        # In the cache: the prompt and the answer but its last token, which was never fed to the model.
        history = len(first.token_ids) + len(answer) - 1
        assert spy.parts[-1] == (history // BLOCK * BLOCK, len(second.token_ids) - history // BLOCK * BLOCK)
        assert history // BLOCK > len(first.token_ids) // BLOCK  # more than the first prompt's blocks
        queried = len(first.token_ids) + len(second.token_ids)  # storing the answer was no query
        assert engine.prefix_cache_tokens == (queried, history // BLOCK * BLOCK)
    finally:
        engine.shutdown()


def test_only_requests_with_the_same_cache_salt_share_blocks(loaded: LoadedModel) -> None:
    engine = BatchingEngine(
        loaded, "tiny", max_batch_size=4, max_queued=8, max_batch_tokens=4096, block_size=BLOCK
    )
    prompt = Prompt("tiny", ids(engine, PROMPTS[1]))
    try:
        hits = []
        for salt in ["tenant-a", "tenant-b", None, "tenant-a"]:
            params = SamplingParams(3, temperature=0, cache_salt=salt)
            assert tokens(asyncio.run(collect(engine, prompt, params))) == reference(loaded, prompt, 3)
            hits.append(engine.prefix_cache_tokens[1])
        assert hits == [0, 0, 0, cached_part(len(prompt.token_ids))]  # only tenant-a's second finds blocks
    finally:
        engine.shutdown()
