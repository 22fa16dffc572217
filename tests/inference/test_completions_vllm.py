"""/v1/completions and /v1/chat/completions as vLLM answers them: the four prompt forms, n choices indexed as
vLLM indexes them, echo, log probabilities (lm-eval's loglikelihood request: token ids, echo, logprobs,
max_tokens 0 or 1) equal to transformers' own forward, chat logprobs, streamed and not."""

import json
import math

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.inference.harness import RunningServer


@pytest.fixture(scope="module")
def reference(demo):  # type: ignore[no-untyped-def]
    """The demo model and tokenizer as transformers loads them, for reference log probabilities."""
    model = AutoModelForCausalLM.from_pretrained(demo[0], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(demo[0])


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def post(server: RunningServer, route: str, body: dict) -> dict:
    response = httpx.post(f"{server.url}/v1/{route}", json={"model": "tiny", **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def streamed(server: RunningServer, route: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream(
        "POST", f"{server.url}/v1/{route}", json={"model": "tiny", "stream": True, **body}, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: ") :]))
    return events


def test_every_prompt_form_and_n_choices_indexed_as_vllm(server: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = reference
    texts = ["The quick brown fox", "Hello there"]
    ids = [tokenizer.encode(text) for text in texts]
    greedy = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    by_text = [
        post(server, "completions", {"prompt": text, **greedy})["choices"][0]["text"] for text in texts
    ]
    for prompt in (texts, ids, ids[0]):
        answer = post(server, "completions", {"prompt": prompt, "n": 3, **greedy})
        expected = by_text if isinstance(prompt[0], str | list) else by_text[:1]
        assert [choice["index"] for choice in answer["choices"]] == list(range(3 * len(expected)))
        assert [choice["text"] for choice in answer["choices"]] == [
            text for text in expected for _ in range(3)
        ]
        assert answer["usage"]["prompt_tokens"] == sum(
            len(tokenizer.encode(t)) for t in texts[: len(expected)]
        )
        assert answer["usage"]["completion_tokens"] == 15 * len(expected)


def test_n_sampled_choices_differ_and_a_seed_repeats_them(server: RunningServer) -> None:
    body = {"prompt": "Once", "n": 4, "max_tokens": 8, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    first = [choice["text"] for choice in post(server, "completions", body)["choices"]]
    again = [choice["text"] for choice in post(server, "completions", body)["choices"]]
    assert first == again and len(set(first)) > 1
    chat = {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 4, "seed": 5}
    choices = post(server, "chat/completions", chat)["choices"]
    assert [choice["index"] for choice in choices] == [0, 1]
    events = streamed(server, "chat/completions", chat)
    text = {0: "", 1: ""}
    for event in events:
        for choice in event["choices"]:
            text[choice["index"]] += choice["delta"].get("content") or ""
    assert text == {index: choice["message"]["content"] for index, choice in enumerate(choices)}


def test_lm_evals_loglikelihood_request_equals_transformers_forward(server: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = reference
    context, continuation = (
        tokenizer.encode("The capital of France is"),
        tokenizer.encode(" Paris", add_special_tokens=False),
    )
    ids = context + continuation
    expected = forward_logprobs(model, ids)
    for max_tokens in (1, 0):  # lm-eval's local-completions sends 1; OpenAI's legacy scoring sent 0
        body = {"prompt": [ids, ids], "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0}
        answer = post(server, "completions", body)
        assert len(answer["choices"]) == 2
        for choice in answer["choices"]:
            logprobs = choice["logprobs"]
            assert len(logprobs["token_logprobs"]) == len(ids) + max_tokens
            assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
            for index in range(1, len(ids)):
                assert math.isclose(
                    logprobs["token_logprobs"][index], expected[index - 1, ids[index]].item(), abs_tol=1e-4
                )
                assert len(logprobs["top_logprobs"][index]) <= 2  # the token itself and the most likely
            assert "".join(logprobs["tokens"][: len(ids)]) == tokenizer.decode(ids)
            assert choice["text"].startswith(tokenizer.decode(ids))
            offsets = logprobs["text_offset"]
            assert offsets[0] == 0 and all(
                b - a == len(t) for a, b, t in zip(offsets, offsets[1:], logprobs["tokens"], strict=False)
            )
        # what lm-eval sums: the continuation's log probability
        served = sum(answer["choices"][0]["logprobs"]["token_logprobs"][len(context) : len(ids)])
        wanted = sum(expected[index - 1, ids[index]].item() for index in range(len(context), len(ids)))
        assert math.isclose(served, wanted, abs_tol=1e-4)


def test_chat_logprobs_and_top_logprobs_streamed_and_not(server: RunningServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
    }
    body |= {"logprobs": True, "top_logprobs": 3}
    answer = post(server, "chat/completions", body)
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert (
            len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["logprob"] == entry["logprob"]
        )  # greedy
        assert entry["bytes"] == list(entry["token"].encode())
    events = streamed(server, "chat/completions", body)
    streamed_content = [
        item
        for event in events
        for choice in event["choices"]
        for item in (choice["logprobs"] or {}).get("content", [])
    ]
    assert streamed_content == content
    plain = post(server, "chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None


def test_vllm_prompt_logprobs(server: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = reference
    ids = tokenizer.encode("Serving models")
    expected = forward_logprobs(model, ids)
    choice = post(server, "completions", {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2})["choices"][0]
    prompt = choice["prompt_logprobs"]
    assert prompt[0] is None and len(prompt) == len(ids)
    for index, entry in enumerate(prompt[1:], start=1):
        own = entry[str(ids[index])]
        assert math.isclose(own["logprob"], expected[index - 1, ids[index]].item(), abs_tol=1e-4)
        assert own["rank"] == int((expected[index - 1] > expected[index - 1, ids[index]]).sum()) + 1
        assert {int(token) for token in entry} >= set(expected[index - 1].topk(2).indices.tolist())


def test_streamed_completions_with_echo_and_several_prompts(server: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    body = {
        "prompt": ["One", "Two"],
        "n": 2,
        "echo": True,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
    }
    whole = post(server, "completions", body)["choices"]
    texts: dict[int, str] = {}
    for event in streamed(server, "completions", body):
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {choice["index"]: choice["text"] for choice in whole}
    assert whole[0]["text"].startswith("One") and whole[2]["text"].startswith("Two")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": [[1, 2], [99999999]]}, "prompt"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "n": 0}, "n"),
    ],
)
def test_completions_refusals_name_the_field(server: RunningServer, body: dict, param: str) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_chat_top_logprobs_without_logprobs_is_a_400(server: RunningServer) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400 and "top_logprobs" in response.json()["error"]["message"]


def test_return_token_ids_gives_the_prompt_and_output_ids_as_vllm(server: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    """vLLM's `return_token_ids`: what RL and agent clients read instead of re-tokenizing the text."""
    _, tokenizer = reference
    body = {"prompt": "Serving models", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    whole = post(server, "completions", {**body, "return_token_ids": True})["choices"][0]
    assert whole["prompt_token_ids"] == tokenizer.encode("Serving models")
    assert len(whole["token_ids"]) == 6
    assert whole["text"] == tokenizer.decode(whole["token_ids"], skip_special_tokens=True)
    chunks = [
        event["choices"][0] for event in streamed(server, "completions", {**body, "return_token_ids": True})
    ]
    assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all("prompt_token_ids" not in chunk for chunk in chunks[1:])
    assert [token for chunk in chunks for token in chunk["token_ids"]] == whole["token_ids"]
    assert "token_ids" not in post(server, "completions", body)["choices"][0]  # only when asked
