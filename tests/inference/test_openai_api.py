"""The official openai client against a live server over the tiny model and its adapter."""

import httpx
import openai
import pytest

from tests.inference.harness import RunningServer

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]


@pytest.fixture()
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_base_model_and_its_adapters(client: openai.OpenAI) -> None:
    models = {model.id: model for model in client.models.list().data}
    assert set(models) == {"tiny", "support"}
    assert models["support"].model_extra["parent"] == "tiny"
    assert models["tiny"].model_extra["parent"] is None


def test_chat_completion(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in {"stop", "length"}
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.usage.completion_tokens <= 12
    assert response.id.startswith("chatcmpl-") and response.model == "tiny"


def test_max_tokens_cuts_with_finish_reason_length(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_completion_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5


def test_greedy_is_deterministic_and_the_adapter_changes_the_output(client: openai.OpenAI) -> None:
    def text(model: str) -> str:
        response = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        return response.choices[0].message.content

    base = text("tiny")
    assert base == text("tiny")
    assert text("support") != base


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sampled(seed: int) -> str:
        response = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=16,
            temperature=1.0,
            top_p=0.9,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return response.choices[0].message.content

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)}) > 1


def test_streamed_chat_matches_the_plain_one(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model="support", messages=MESSAGES, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    stream = client.chat.completions.create(
        model="support",
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert [chunk.choices[0].finish_reason for chunk in finishing] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_stream_ends_with_done(server: RunningServer) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"


def test_stop_strings_end_the_text(client: openai.OpenAI) -> None:
    full = (
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .message.content
    )
    stop = full[6:9]
    assert stop and stop.strip(), f"pick a stop string from {full!r}"
    cut = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]


def test_completions_plain_and_streamed(client: openai.OpenAI) -> None:
    plain = client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 8
    streamed = client.completions.create(
        model="tiny",
        prompt="The quick brown",
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == plain.choices[0].text


# 40 sampled tokens over CJK and emoji: with this seed some tokens complete no character.
SPLIT_PROMPT = "你好，世界。こんにちは。🙂"  # noqa: RUF001
SPLITS_CHARACTERS = {
    "max_tokens": 40,
    "temperature": 1.0,
    "seed": 3,
    "stream": True,
    "stream_options": {"include_usage": True},
    "extra_body": {"ignore_eos": True},
}


def test_a_completion_stream_has_a_chunk_per_token(client: openai.OpenAI) -> None:
    """As vLLM's: a token that completes no character yet (half of a multi-byte one) still sends its
    chunk, with empty text, so a client's time to first token is the first token's."""
    stream = client.completions.create(
        model="tiny",
        prompt=SPLIT_PROMPT,
        **SPLITS_CHARACTERS,
    )
    chunks = list(stream)
    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40
    assert len(texts) == 40
    assert "" in texts, "every token completed a character: pick a prompt or seed that splits one"


def test_a_chat_stream_has_a_chunk_per_token_and_no_half_characters(client: openai.OpenAI) -> None:
    """The chat stream too: after the role chunk, one chunk per generated token, as vLLM's. Byte-level BPE
    splits characters across tokens: a chunk is empty until one completes, never half of one."""
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": SPLIT_PROMPT}],
        **SPLITS_CHARACTERS,
    )
    chunks = list(stream)
    contents = [chunk.choices[0].delta.content for chunk in chunks[1:] if chunk.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40
    assert len(contents) == 40
    assert "" in contents, "every token completed a character: pick a prompt or seed that splits one"
    for content in contents:
        content.encode("utf-8")  # a lone surrogate would raise here
