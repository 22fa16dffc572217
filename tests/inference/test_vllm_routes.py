"""A drop-in for vLLM's OpenAI server: its SSE framing on every stream, /tokenize, /detokenize, /ping,
/version and its /v1/models fields, against a live server over the tiny model (and a tiny classifier)."""

import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from llm_server.api.streaming import event_stream
from llm_server.config import ServerSettings
from llm_server.engine.interface import Engine
from llm_server.main import build_engine
from tests.inference.harness import RunningServer, running_server
from tests.inference.pooling_models import build_classifier

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]
PROMPT = "Once upon a time, said the fox, 42 words: naïve café."
STREAMS = [
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES}),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT}),
    ("/chat", {"messages": MESSAGES}),
    ("/generate", {"prompt": PROMPT}),
]


@pytest.fixture(scope="module")
def tokenizer(demo: tuple[Path, Path]) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(demo[0])


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    ids: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def post(server: RunningServer, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None) -> None:
    """The server's error shape; `param` names the field (a list item's path starts with it)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    named = error["param"] and error["param"].split(".")[0]
    assert error["code"] == status and named == param, error


# -- SSE framing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), STREAMS, ids=[path for path, _ in STREAMS])
def test_every_stream_is_framed_as_vllm_frames_it(server: RunningServer, path: str, body: dict) -> None:
    request = {**body, "stream": True, "max_tokens": 8, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}{path}", json=request, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw())
    assert b"\r" not in raw
    assert not [line for line in raw.split(b"\n") if line.startswith(b":")], raw
    *events, rest = raw.split(b"\n\n")
    assert rest == b"", raw  # the body ends with an event's blank line
    assert all(event.startswith(b"data: ") and b"\n" not in event for event in events), raw
    assert events[-1] == b"data: [DONE]"
    assert len(events) >= 3
    for event in events[:-1]:
        json.loads(event.removeprefix(b"data: "))


def test_no_keep_alive_ping_however_long_the_stream() -> None:
    class Deltas:
        async def aclose(self) -> None:
            pass

    async def events() -> AsyncIterator[dict[str, str]]:  # never iterated
        yield {"data": "[DONE]"}

    response = event_stream(events(), Deltas())  # type: ignore[arg-type]
    # sse-starlette starts no ping task at all for an interval of 0 (it only sends comments from that task).
    assert response.ping_interval == 0
    assert response.sep == "\n"


# -- /tokenize and /detokenize ---------------------------------------------------------------------------


def test_a_prompt_tokenizes_as_the_tokenizer_and_the_completion_see_it(
    server: RunningServer, demo: tuple[Path, Path], tokenizer: PreTrainedTokenizerBase
) -> None:
    max_model_len = AutoConfig.from_pretrained(demo[0]).max_position_embeddings
    expected = tokenizer.encode(PROMPT)
    for model in ("tiny", "support", None):
        body = {"prompt": PROMPT} if model is None else {"model": model, "prompt": PROMPT}
        answer = post(server, "/tokenize", body).json()
        assert answer == {
            "count": len(expected),
            "max_model_len": max_model_len,
            "tokens": expected,
            "token_strs": None,
        }
    explicit = post(server, "/tokenize", {"prompt": PROMPT, "add_special_tokens": True}).json()
    assert explicit["tokens"] == expected
    completion = post(server, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 1})
    assert completion.json()["usage"]["prompt_tokens"] == len(expected)


def test_messages_tokenize_as_the_chat_template_and_the_chat_completion_see_them(
    server: RunningServer, tokenizer: PreTrainedTokenizerBase
) -> None:
    expected = chat_ids(tokenizer, MESSAGES)
    answer = post(server, "/tokenize", {"model": "tiny", "messages": MESSAGES}).json()
    assert answer["tokens"] == expected and answer["count"] == len(expected)
    # vLLM's defaults, said out loud, and content as parts
    explicit = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there!"}]}],
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": False,
        "chat_template_kwargs": {},
    }
    parts = post(server, "/tokenize", explicit).json()
    assert parts["tokens"] == chat_ids(tokenizer, [{"role": "user", "content": "Hello there!"}])
    completion = post(
        server, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 1}
    )
    assert completion.json()["usage"]["prompt_tokens"] == len(expected)


def test_token_strings_when_asked(server: RunningServer, tokenizer: PreTrainedTokenizerBase) -> None:
    for body in ({"prompt": PROMPT}, {"messages": MESSAGES}):
        answer = post(server, "/tokenize", {**body, "return_token_strs": True}).json()
        assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"])
        assert len(answer["token_strs"]) == answer["count"]


def test_detokenize_round_trips(server: RunningServer, tokenizer: PreTrainedTokenizerBase) -> None:
    tokens = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    for model in ("tiny", "support", None):
        body = {"tokens": tokens} if model is None else {"model": model, "tokens": tokens}
        assert post(server, "/detokenize", body).json() == {"prompt": PROMPT}
    chat = post(server, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    text = post(server, "/detokenize", {"tokens": chat}).json()["prompt"]
    assert text == tokenizer.decode(chat) and text.startswith(tokenizer.bos_token)  # special tokens kept
    assert post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


BAD_REQUESTS = [
    ("/tokenize", {"prompt": PROMPT, "messages": MESSAGES}, "messages"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("/tokenize", {"prompt": PROMPT, "add_special_tokens": False}, "add_special_tokens"),
    ("/tokenize", {"messages": MESSAGES, "add_special_tokens": True}, "add_special_tokens"),
    ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}, "add_generation_prompt"),
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, "continue_final_message"),
    ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ messages }}"}, "chat_template"),
    ("/tokenize", {"messages": MESSAGES, "chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),
    ("/tokenize", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
    ("/tokenize", {"prompt": PROMPT, "return_token_strs": "maybe"}, "return_token_strs"),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", {"tokens": [1, 100_000]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": ["7"]}, "tokens"),
    ("/detokenize", {"tokens": [1.5]}, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_bad_input_is_a_400_naming_the_field(
    server: RunningServer, path: str, body: dict, param: str
) -> None:
    assert_error(post(server, path, body), 400, param)


def test_a_token_just_outside_the_vocabulary(
    server: RunningServer, tokenizer: PreTrainedTokenizerBase
) -> None:
    assert post(server, "/detokenize", {"tokens": [len(tokenizer) - 1]}).status_code == 200
    response = post(server, "/detokenize", {"tokens": [len(tokenizer)]})
    assert_error(response, 400, "tokens")
    assert str(len(tokenizer)) in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"model": "nope", "prompt": PROMPT}),
        ("/tokenize", {"model": "nope", "messages": MESSAGES}),
        ("/detokenize", {"model": "nope", "tokens": [1]}),
    ],
)
def test_an_unknown_model_is_a_404(server: RunningServer, path: str, body: dict) -> None:
    response = post(server, path, body)
    assert_error(response, 404, "model")
    assert "nope" in response.json()["error"]["message"]


def test_a_pooling_model_tokenizes_prompts(tmp_path: Path) -> None:
    model_dir = build_classifier(tmp_path / "sentiment", ["negative", "positive"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "the quick brown fox"
    with running_server(model_dir, served_model_name="sentiment") as server:
        max_model_len = httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"]
        answer = post(server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
        assert answer["tokens"] == tokenizer(text)["input_ids"]  # with [CLS] and [SEP]
        assert answer["token_strs"][0] == "[CLS]" and answer["max_model_len"] == max_model_len
        bare = post(server, "/tokenize", {"model": "sentiment", "prompt": text, "add_special_tokens": False})
        assert bare.json()["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert_error(post(server, "/tokenize", {"messages": MESSAGES}), 400, "messages")
        assert_error(post(server, "/tokenize", {"model": "tiny", "prompt": text}), 404, "model")
        assert_error(post(server, "/tokenize", {"prompt": "fox " * (max_model_len + 1)}), 400, "prompt")
        decoded = post(server, "/detokenize", {"tokens": answer["tokens"]}).json()["prompt"]
        assert decoded == tokenizer.decode(answer["tokens"]) == "[CLS] the quick brown fox [SEP]"


# -- /v1/models, /ping, /version and the API key ---------------------------------------------------------


def test_models_entries_carry_max_model_len_root_and_parent(
    server: RunningServer, demo: tuple[Path, Path]
) -> None:
    max_model_len = AutoConfig.from_pretrained(demo[0]).max_position_embeddings
    entries = {entry["id"]: entry for entry in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert set(entries) == {"tiny", "support"}
    for entry in entries.values():
        assert entry["max_model_len"] == max_model_len and isinstance(entry["root"], str)
    assert entries["tiny"]["parent"] is None
    assert entries["support"]["parent"] == "tiny" and entries["support"]["root"] == str(demo[1])


def test_ping_is_readiness_and_version_is_open(demo: tuple[Path, Path]) -> None:
    release = threading.Event()

    def slow_loading(settings: ServerSettings) -> Engine:
        release.wait(30)
        return build_engine(settings)

    key = "s3cret-key"
    with running_server(
        demo[0], served_model_name="tiny", api_key=key, engine_factory=slow_loading, wait_ready=False
    ) as server:
        for method in ("GET", "POST"):
            loading = httpx.request(method, f"{server.url}/ping")
            assert (loading.status_code, loading.json()) == (503, {"status": "loading"})
        version = httpx.get(f"{server.url}/version")
        assert version.status_code == 200 and version.json() == {"version": server.app.version}
        release.set()
        server.wait_ready()
        for method in ("GET", "POST"):
            ready = httpx.request(method, f"{server.url}/ping")
            assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        for path, body in (("/tokenize", {"prompt": PROMPT}), ("/detokenize", {"tokens": [1, 2]})):
            assert_error(post(server, path, body), 401, None)
            assert_error(post(server, path, body, headers={"Authorization": "Bearer wrong"}), 401, None)
            assert post(server, path, body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
