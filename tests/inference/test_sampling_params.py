"""vLLM's sampling parameters, each against a reference computed on the same logits by transformers' own
logits processors (presence and frequency penalties against OpenAI's formula, which transformers lacks),
then end to end: mixed parameters in one batch, each request equal to `model.generate` alone with the same
processors (greedy, float32), and top_k=1 equal to greedy at any temperature."""

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llm_server.api.vllm_fields import UNSUPPORTED
from llm_server.engine.batching import BatchingEngine
from llm_server.engine.interface import SamplingParams
from llm_server.engine.loading import LoadedModel, load_model
from llm_server.engine.logits_adjust import LogitsState, adjust_rows
from llm_server.engine.sampling import _filters, filtered_probabilities, sample_rows
from tests.inference.harness import RunningServer
from tests.inference.test_batching import collect, encoded, tokens, transformers_sdpa

VOCAB = 64
PROMPT = [3, 5, 5, 9]
OUTPUT = [9, 11, 11, 11, 2]
END = 2


def logits_row(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=generator) * 3


def adjusted(params: SamplingParams, logits: torch.Tensor, output: list[int] = OUTPUT) -> torch.Tensor:
    state = LogitsState(params, PROMPT, {END}, VOCAB, torch.device("cpu"))
    for token in output:
        state.observe(token)
    return state.apply(logits)


def history(output: list[int] = OUTPUT) -> torch.Tensor:
    return torch.tensor([PROMPT + output])


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_as_transformers(penalty: float) -> None:
    logits = logits_row(0)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history(), logits[None].clone())[0]
    assert torch.allclose(adjusted(SamplingParams(8, repetition_penalty=penalty), logits), expected)


def test_presence_and_frequency_penalties_as_openai_defines_them() -> None:
    logits = logits_row(1)
    counts = torch.bincount(torch.tensor(OUTPUT), minlength=VOCAB).float()  # the output only, not the prompt
    expected = logits - 0.5 * counts - 1.5 * (counts > 0).float()
    got = adjusted(SamplingParams(8, presence_penalty=1.5, frequency_penalty=0.5), logits)
    assert torch.allclose(got, expected)


def test_logit_bias_as_transformers_sequence_bias() -> None:
    logits = logits_row(2)
    bias = ((7, 100.0), (8, -100.0), (3, 0.5))
    expected = SequenceBiasLogitsProcessor({(token,): value for token, value in bias})(
        history(), logits[None]
    )[0]
    assert torch.allclose(adjusted(SamplingParams(8, logit_bias=bias), logits), expected)


def test_min_tokens_masks_the_end_and_stop_tokens_until_reached() -> None:
    logits = logits_row(3)
    params = SamplingParams(8, min_tokens=4, stop_token_ids=(13,))
    processor = MinNewTokensLengthLogitsProcessor(len(PROMPT), 4, [END, 13])
    for produced in (OUTPUT[:2], OUTPUT[:4]):
        expected = processor(history(produced), logits[None].clone())[0]
        assert torch.equal(adjusted(params, logits, produced), expected)
    assert adjusted(params, logits, OUTPUT[:2])[END] == float("-inf")
    assert adjusted(params, logits, OUTPUT[:4])[END] == logits[END]


def warped(logits: torch.Tensor, *warpers) -> torch.Tensor:  # type: ignore[no-untyped-def]
    scores = logits[None].clone()
    for warper in warpers:
        scores = warper(history(), scores)
    return torch.softmax(scores, dim=-1)[0]


def test_each_row_of_one_batch_filters_as_transformers_warpers() -> None:
    rows = [
        (SamplingParams(1, temperature=0.8, top_k=5), [TemperatureLogitsWarper(0.8), TopKLogitsWarper(5)]),
        (
            SamplingParams(1, temperature=1.2, min_p=0.1),
            [TemperatureLogitsWarper(1.2), MinPLogitsWarper(0.1)],
        ),
        (
            SamplingParams(1, temperature=0.6, top_p=0.7),
            [TemperatureLogitsWarper(0.6), TopPLogitsWarper(0.7)],
        ),
        (
            SamplingParams(1, temperature=1.0, top_k=10, top_p=0.8),
            [TemperatureLogitsWarper(1.0), TopKLogitsWarper(10), TopPLogitsWarper(0.8)],
        ),
        (SamplingParams(1, temperature=1.0), [TemperatureLogitsWarper(1.0)]),
    ]
    logits = torch.stack([logits_row(10 + row) for row in range(len(rows))])
    probs = filtered_probabilities(logits, *_filters([params for params, _ in rows], logits.device))
    for row, (params, warpers) in enumerate(rows):
        expected = warped(logits[row], *warpers)
        got = probs[row] / probs[row].sum()
        assert torch.equal(got > 0, expected > 0), params
        assert torch.allclose(got, expected, atol=1e-6), params


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = torch.stack([logits_row(seed) for seed in range(20)])
    params = [SamplingParams(1, temperature=2.0, top_k=1)] * 20
    assert sample_rows(logits, params, [None] * 20) == logits.argmax(dim=-1).tolist()


def test_rows_that_ask_nothing_are_left_alone() -> None:
    logits = torch.stack([logits_row(0), logits_row(1)])
    state = LogitsState(SamplingParams(8, repetition_penalty=2.0), PROMPT, {END}, VOCAB, torch.device("cpu"))
    out = adjust_rows(logits, [None, state])
    assert torch.equal(out[0], logits[0]) and not torch.equal(out[1], logits[1])
    assert adjust_rows(logits, [None, None]) is logits


# -- end to end: the engine's batch against model.generate alone ------------------------------------
@pytest.fixture(scope="module")
def loaded(demo: tuple[Path, Path]) -> LoadedModel:
    return load_model(demo[0], {}, "float32", "cpu", None)


def generate_alone(
    loaded: LoadedModel, prompt_ids: tuple[int, ...], max_tokens: int, **processors
) -> list[int]:  # type: ignore[no-untyped-def]
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode(), transformers_sdpa(loaded):
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
            **({"adapter_names": ["__base__"]} if loaded.has_peft else {}),
            **processors,
        )
    return out[0, ids.shape[1] :].tolist()


def test_mixed_parameters_in_one_batch_each_equal_generate_alone(loaded: LoadedModel) -> None:
    engine = BatchingEngine(loaded, "tiny", max_batch_size=8, max_queued=16, max_batch_tokens=4096)
    prompt = encoded(loaded, "Serving language models on Kubernetes")
    greedy = generate_alone(loaded, prompt.token_ids, 24)
    cases = [
        (SamplingParams(24, temperature=0), {}),
        (SamplingParams(24, temperature=0, repetition_penalty=1.8), {"repetition_penalty": 1.8}),
        (SamplingParams(24, temperature=0, min_tokens=24, ignore_eos=False), {"min_new_tokens": 24}),
        (
            SamplingParams(24, temperature=0, logit_bias=((greedy[3], -100.0),)),
            {"sequence_bias": {(greedy[3],): -100.0}},
        ),
        (SamplingParams(24, temperature=1.5, top_k=1), {}),  # greedy
    ]
    try:

        async def scenario() -> list[list[int]]:
            runs = [collect(engine, prompt, params) for params, _ in cases]
            return [tokens(deltas) for deltas in await asyncio.gather(*runs)]

        got = asyncio.run(scenario())
    finally:
        engine.shutdown()
    for (params, processors), served in zip(cases, got, strict=True):
        assert served == generate_alone(loaded, prompt.token_ids, 24, **processors), params
    assert got[1] != got[0] and got[3] != got[0], "the penalties and the bias changed what was generated"


def test_stop_token_ids_end_the_output_without_their_text(loaded: LoadedModel) -> None:
    engine = BatchingEngine(loaded, "tiny", max_batch_size=8, max_queued=16, max_batch_tokens=4096)
    prompt = encoded(loaded, "The quick brown fox")
    try:
        free = tokens(
            asyncio.run(collect(engine, prompt, SamplingParams(16, temperature=0, ignore_eos=True)))
        )
        stop = free[5]
        deltas = asyncio.run(
            collect(engine, prompt, SamplingParams(16, temperature=0, stop_token_ids=(stop,)))
        )
    finally:
        engine.shutdown()
    assert tokens(deltas) == free[: free.index(stop) + 1] and deltas[-1].finish_reason == "stop"
    text = "".join(delta.text for delta in deltas)
    assert text == loaded.tokenizer.decode(free[: free.index(stop)])


def test_the_api_takes_vllms_fields_and_refuses_bad_values_naming_them(server: RunningServer) -> None:
    base = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    greedy = httpx.post(f"{server.url}/v1/chat/completions", json=base).json()["choices"][0]["message"]
    top_one = {**base, "temperature": 1.3, "top_k": 1, "seed": None}
    assert (
        httpx.post(f"{server.url}/v1/chat/completions", json=top_one).json()["choices"][0]["message"]
        == greedy
    )
    fields = {"top_k": -1, "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 0.5}
    fields |= {"frequency_penalty": 0.5, "min_tokens": 2, "stop_token_ids": [5], "logit_bias": {"7": -5}}
    assert (
        httpx.post(
            f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", **fields}
        ).status_code
        == 200
    )
    every_token = {**base, "temperature": 1.0, "top_k": 2**70}  # above the vocabulary: no cut, not a 500
    assert httpx.post(f"{server.url}/v1/chat/completions", json=every_token).status_code == 200
    for bad, param in [
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"stop_token_ids": [99999999]}, "stop_token_ids"),
        ({"min_tokens": 10}, "min_tokens"),  # above max_tokens 6
    ]:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={**base, **bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["param"] == param, (bad, response.text)


def _asking(default: object) -> object:
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return default + 2
    return {"type": "object"}


@pytest.mark.parametrize(
    ("endpoint", "name"), [(endpoint, name) for endpoint, fields in UNSUPPORTED.items() for name in fields]
)
def test_every_vllm_field_this_server_lacks_is_a_400_naming_it_unless_it_asks_nothing(
    server: RunningServer, endpoint: str, name: str
) -> None:
    body = {"model": "tiny", "max_tokens": 2}
    body |= {"messages": [{"role": "user", "content": "Hi"}]} if endpoint == "chat" else {"prompt": "Hi"}
    path = f"{server.url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
    default = UNSUPPORTED[endpoint][name]  # type: ignore[index]
    response = httpx.post(path, json={**body, name: _asking(default)})
    assert response.status_code == 400 and response.json()["error"]["param"] == name, response.text
    assert httpx.post(path, json={**body, name: default}).status_code == 200


def test_fields_neither_server_knows_are_ignored_and_logged(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "my_own_field": "secret value", "user": "u1"}
    with caplog.at_level("WARNING", logger="llm_server.api.vllm_fields"):
        assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200
    logged = [record.getMessage() for record in caplog.records if record.name == "llm_server.api.vllm_fields"]
    assert logged == ["the request's fields ['my_own_field'] are unknown and were ignored"]
    assert "secret value" not in caplog.text


def reference_logprobs(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """transformers' own forward over the whole sequence: row i is the distribution of token i + 1."""
    with torch.inference_mode(), transformers_sdpa(loaded):
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_logprobs_and_prompt_logprobs_in_the_batch_equal_a_forward_alone(loaded: LoadedModel) -> None:
    # Chunks of 7 prompt tokens: the prompt's log probabilities span several steps of the batch.
    engine = BatchingEngine(
        loaded, "tiny", max_batch_size=8, max_queued=16, max_batch_tokens=4096, prefill_chunk_tokens=7
    )
    long = encoded(loaded, "Serving language models on Kubernetes: replicas, GPUs, adapters and autoscaling")
    short = encoded(loaded, "Hi there")
    asking = SamplingParams(6, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    try:

        async def scenario() -> list[list]:  # type: ignore[type-arg]
            runs = [
                collect(engine, long, asking),
                collect(engine, short, SamplingParams(6, temperature=0, ignore_eos=True)),
                collect(engine, short, SamplingParams(0, prompt_logprobs=0)),  # lm-eval's scoring request
            ]
            return list(await asyncio.gather(*runs))

        scored, plain, prompt_only = asyncio.run(scenario())
    finally:
        engine.shutdown()
    generated = tokens(scored)
    expected = reference_logprobs(loaded, [*long.token_ids, *generated])
    prompt = scored[0].prompt_logprobs
    assert prompt is not None and prompt[0] is None and len(prompt) == len(long.token_ids)
    for index, item in enumerate(prompt[1:], start=1):
        assert item is not None and item.token_id == long.token_ids[index]
        row = expected[index - 1]
        assert abs(item.logprob - row[item.token_id].item()) < 1e-4
        assert item.rank == int((row > row[item.token_id]).sum()) + 1
        assert [token for token, _ in item.top] == row.topk(2).indices.tolist()
    offset = len(long.token_ids) - 1
    for step, delta in enumerate(scored):
        (item,) = delta.logprobs
        row = expected[offset + step]
        assert item.token_id == generated[step] == int(row.argmax())  # greedy: the most likely, rank 1
        assert abs(item.logprob - row.max().item()) < 1e-4 and item.rank == 1
        assert [token for token, _ in item.top] == row.topk(3).indices.tolist()
    assert all(not delta.logprobs and delta.prompt_logprobs is None for delta in plain)
    (only,) = prompt_only
    assert (only.completion_tokens, only.finish_reason, only.token_ids) == (0, "length", ())
    short_expected = reference_logprobs(loaded, list(short.token_ids))
    assert only.prompt_logprobs is not None and len(only.prompt_logprobs) == len(short.token_ids)
    for index, item in enumerate(only.prompt_logprobs[1:], start=1):
        assert item is not None and not item.top
        assert abs(item.logprob - short_expected[index - 1][short.token_ids[index]].item()) < 1e-4
