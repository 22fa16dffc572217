"""Packing a forward's inputs side by side into one row of an embedding model (attention per input): how
many inputs a forward takes, and that a packed forward embeds each input as a forward of it alone does, on
the real all-MiniLM-L6-v2 and on a decoder (causal within each input); models whose positions packing would
change are padded instead; forwards on several workers at once."""

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaModel,
    MistralConfig,
    MistralModel,
    RobertaConfig,
    RobertaModel,
)

from llm_server.engine.interface import PoolInput
from llm_server.engine.loading import LoadedPoolingModel, load_pooling_model
from llm_server.engine.pooling import batch_rows, ragged_batch, unragged
from llm_server.engine.pooling_engine import BatchPoolingEngine, RecentPeak, _forward, _packing_agrees
from llm_server.engine.ragged_attention import RAGGED_ATTENTION
from llm_server.engine.tasks import resolve_task
from tests.inference.pooling_models import MINILM, sentence


@pytest.mark.parametrize(
    ("lengths", "max_rows", "max_tokens", "rows"),
    [
        ([4, 20, 4, 4], 32, 40, 4),  # their own 32 tokens, where padding would cost 4 x 20
        ([10, 10, 10, 10], 32, 30, 3),
        ([500, 1], 32, 64, 1),  # longer than the budget: alone
        ([5, 5, 5], 2, 1000, 2),  # the row limit counts inputs
    ],
)
def test_packed_forwards_count_real_tokens(
    lengths: list[int], max_rows: int, max_tokens: int, rows: int
) -> None:
    assert batch_rows(lengths, max_rows, max_tokens, packed=True) == rows


def test_a_ragged_batch_puts_the_inputs_side_by_side_with_positions_restarting() -> None:
    inputs = [PoolInput((1, 2, 3), (0, 0, 1)), PoolInput((4, 5), None), PoolInput((6, 7, 8, 9), None)]
    batch, spans = ragged_batch(inputs, True, torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]  # no padding
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 0, 0, 0, 0, 0, 0]]
    assert "attention_mask" not in batch
    assert spans.slices == [slice(0, 3), slice(3, 5), slice(5, 9)]
    hidden = torch.arange(9.0).view(1, 9, 1)
    rows, mask = unragged(hidden, spans)
    assert rows[:, :, 0].tolist() == [[0, 1, 2, 0], [3, 4, 0, 0], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def loaded_embedder(model_dir: Path) -> LoadedPoolingModel:
    return load_pooling_model(model_dir, resolve_task(model_dir, "embed"), "float32", "cpu", None)


def inputs_for(loaded: LoadedPoolingModel, texts: list[str]) -> list[PoolInput]:
    encoded = [loaded.tokenizer(text) for text in texts]
    return [
        PoolInput(tuple(e["input_ids"]), tuple(e["token_type_ids"]) if loaded.token_types else None)
        for e in encoded
    ]


def test_a_packed_forward_of_the_real_model_embeds_each_input_as_alone() -> None:
    loaded = loaded_embedder(MINILM)
    assert _packing_agrees(loaded)
    # 8 to 200 tokens in one row: an input's attention reaching its neighbours would move its embedding.
    inputs = inputs_for(
        loaded, [sentence(words, start=words) for words in (6, 60, 198, 20, 33, 6, 90, 12, 150)]
    )
    assert_packed_embeds_as_alone(loaded, inputs)


def assert_packed_embeds_as_alone(loaded: LoadedPoolingModel, inputs: list[PoolInput]) -> None:
    with torch.inference_mode():
        packed = _forward(loaded, inputs, packed=True)
        alone = torch.cat([_forward(loaded, [item], packed=False) for item in inputs])
    assert torch.nn.functional.cosine_similarity(packed, alone).min() >= 0.99999


def small_tokenizer_model(out: Path, model: torch.nn.Module) -> Path:
    model.eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(out)
    return out


def mean_pooled(model_dir: Path) -> Path:
    """`model_dir` as a sentence-transformers model with mean pooling (without one it is CLS)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (model_dir / "modules.json").write_text(json.dumps(modules))
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    return model_dir


def test_roberta_whose_positions_packing_would_change_is_padded_and_a_decoder_is_packed_causally(
    tmp_path: Path,
) -> None:
    vocab = AutoTokenizer.from_pretrained(MINILM).vocab_size
    shape = {"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    torch.manual_seed(0)
    # RoBERTa numbers positions from pad id + 1: restarting them at 0 changes its embeddings.
    roberta = RobertaModel(
        RobertaConfig(**shape, intermediate_size=64, pad_token_id=0, max_position_embeddings=130)
    )
    loaded = loaded_embedder(small_tokenizer_model(tmp_path / "roberta", roberta))
    assert not _packing_agrees(loaded)
    assert loaded.model.config._attn_implementation != RAGGED_ATTENTION  # its own attention is back
    # A decoder's tokens see only earlier ones of their own input (grouped key heads, as Llama's); mean
    # pooling reads every token's state, so every token's attention counts.
    llama = LlamaModel(LlamaConfig(**shape, intermediate_size=64, num_key_value_heads=2, pad_token_id=0))
    loaded = loaded_embedder(mean_pooled(small_tokenizer_model(tmp_path / "llama", llama)))
    assert _packing_agrees(loaded)
    assert_packed_embeds_as_alone(loaded, inputs_for(loaded, [sentence(n, start=n) for n in (5, 40, 12)]))
    # A sliding-window decoder: inputs longer than the window see only its last tokens, each its own.
    mistral = MistralModel(
        MistralConfig(**shape, intermediate_size=64, num_key_value_heads=2, pad_token_id=0, sliding_window=8)
    )
    loaded = loaded_embedder(mean_pooled(small_tokenizer_model(tmp_path / "mistral", mistral)))
    assert _packing_agrees(loaded)
    assert_packed_embeds_as_alone(loaded, inputs_for(loaded, [sentence(n, start=n) for n in (5, 40, 12)]))


def test_two_workers_each_on_one_thread_answer_every_request_and_give_the_threads_back() -> None:
    loaded = loaded_embedder(MINILM)
    inputs = inputs_for(loaded, [sentence(words, start=words) for words in range(6, 40, 2)])
    with torch.inference_mode():
        alone = torch.cat([_forward(loaded, [item], packed=False) for item in inputs])
    threads = torch.get_num_threads()

    async def embed_all() -> list[list[float]]:
        engine = BatchPoolingEngine(
            loaded, "m", max_batch_size=4, max_queued=100, max_batch_tokens=65536, workers=2
        )
        try:
            assert torch.get_num_threads() == 1
            workers = [thread for thread in threading.enumerate() if thread.name.startswith("pooling-engine")]
            assert len(workers) == 2
            with engine._intake:  # all queued before a worker takes any: forwards of 4, two at a time
                requests = [engine.pool("embed", [item]) for item in inputs]
            answers = await asyncio.gather(*(request.result() for request in requests))
            assert sum(engine.step_times.counts) == 5  # 17 inputs, 4 a forward
            return [answer[0] for answer in answers]
        finally:
            engine.shutdown()

    served = torch.tensor(asyncio.run(embed_all()))
    assert torch.get_num_threads() == threads
    normalized = torch.nn.functional.normalize(alone, dim=-1)
    assert torch.nn.functional.cosine_similarity(served, normalized).min() >= 0.99999


def forwards_for_four_arrivals_beside_a_long_forward(batch_wait_s: float) -> int:
    """Four long inputs go into one forward; four short requests then arrive 5 ms apart while it runs. How
    many forwards the short ones took."""
    loaded = loaded_embedder(MINILM)
    long_inputs = inputs_for(loaded, [sentence(250, start=index) for index in range(4)])
    short_inputs = inputs_for(loaded, [sentence(8, start=index) for index in range(4)])

    async def run() -> int:
        engine = BatchPoolingEngine(
            loaded, "m", max_batch_size=32, max_queued=100, max_batch_tokens=65536, workers=2,
            batch_wait_s=batch_wait_s,
        )  # fmt: skip
        try:
            long_request = engine.pool("embed", long_inputs)
            while engine.running == 0:  # a worker took the four
                await asyncio.sleep(0.001)
            short_requests = []
            for item in short_inputs:
                short_requests.append(engine.pool("embed", [item]))
                await asyncio.sleep(0.005)
            await asyncio.gather(long_request.result(), *(request.result() for request in short_requests))
            return sum(engine.step_times.counts) - 1
        finally:
            engine.shutdown()

    return asyncio.run(run())


def test_a_free_worker_beside_a_running_forward_waits_for_as_many_inputs_as_it_has() -> None:
    # About 50 ms of a core per 250-token input: the four short ones all arrive while the long forward runs.
    assert forwards_for_four_arrivals_beside_a_long_forward(batch_wait_s=0.2) == 1
    # Without the wait the free worker takes each arrival as it comes.
    assert forwards_for_four_arrivals_beside_a_long_forward(batch_wait_s=0.0) >= 2


def forwards_for_four_arrivals_after_a_busy_moment(busy_requests: int) -> int:
    """`busy_requests` short requests are queued at once and answered; a request of two long inputs then
    runs, and four short requests arrive 5 ms apart beside it. How many forwards the four took."""
    loaded = loaded_embedder(MINILM)
    busy_inputs = inputs_for(loaded, [sentence(8, start=index) for index in range(busy_requests)])
    long_inputs = inputs_for(loaded, [sentence(250, start=index) for index in range(2)])
    short_inputs = inputs_for(loaded, [sentence(8, start=index) for index in range(4)])

    async def run() -> int:
        engine = BatchPoolingEngine(
            loaded, "m", max_batch_size=32, max_queued=100, max_batch_tokens=65536, workers=2,
            batch_wait_s=0.2,
        )  # fmt: skip
        try:
            with engine._intake:
                busy = [engine.pool("embed", [item]) for item in busy_inputs]
            await asyncio.gather(*(request.result() for request in busy))
            before = sum(engine.step_times.counts)
            long_request = engine.pool("embed", long_inputs)
            while engine.running == 0:
                await asyncio.sleep(0.001)
            short_requests = []
            for item in short_inputs:
                short_requests.append(engine.pool("embed", [item]))
                await asyncio.sleep(0.005)
            await asyncio.gather(long_request.result(), *(request.result() for request in short_requests))
            return sum(engine.step_times.counts) - before - 1
        finally:
            engine.shutdown()

    return asyncio.run(run())


def test_a_free_worker_waits_for_its_share_of_the_recent_load_beside_a_smaller_forward() -> None:
    # Eight inputs held at once a moment ago: each of two workers waits for four, although the forward
    # running beside it has two (else 32 clients settle into three small groups, not two large ones).
    assert forwards_for_four_arrivals_after_a_busy_moment(busy_requests=8) == 1
    # No recent load beyond the long forward: the free worker waits for as many as it has, two, twice.
    assert forwards_for_four_arrivals_after_a_busy_moment(busy_requests=0) >= 2


def test_recent_peak_is_the_largest_value_within_the_window() -> None:
    peak = RecentPeak(window=1.0)
    assert peak.peak(now=0.0) == 0
    for now, value in ((0.0, 3), (0.2, 8), (0.4, 5), (0.9, 2)):
        peak.record(now, value)
    assert peak.peak(now=1.0) == 8
    assert peak.peak(now=1.3) == 5  # the 8 of t=0.2 has left the window
    assert peak.peak(now=1.5) == 2
    assert peak.peak(now=2.0) == 0


def test_a_request_with_no_forward_running_starts_at_once_whatever_the_batch_wait() -> None:
    loaded = loaded_embedder(MINILM)

    async def run() -> float:
        engine = BatchPoolingEngine(
            loaded, "m", max_batch_size=32, max_queued=100, max_batch_tokens=65536, workers=2,
            batch_wait_s=60.0,
        )  # fmt: skip
        try:
            started = time.perf_counter()
            await asyncio.wait_for(engine.pool("embed", inputs_for(loaded, [sentence(8)])).result(), 30)
            return time.perf_counter() - started
        finally:
            engine.shutdown()

    assert asyncio.run(run()) < 5.0
