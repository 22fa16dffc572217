"""The simple API of the seed services, with the shapes their clients expect (seed 004)."""

import json

import httpx

from tests.inference.harness import RunningServer

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}


def test_root_health_and_model_info(server: RunningServer) -> None:
    root = httpx.get(f"{server.url}/").json()
    assert root["docs"] == "/docs" and root["health"] == "/health" and root["version"]
    assert httpx.get(f"{server.url}/health").json() == {
        "status": "healthy",
        "model_loaded": True,
        "model_name": "tiny",
    }
    info = httpx.get(f"{server.url}/model/info").json()
    assert info["model_name"] == "tiny" and info["status"] == "loaded"
    assert set(info["adapters"]) == {"support"}
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_chat(server: RunningServer) -> None:
    body = httpx.post(f"{server.url}/chat", json=CHAT).json()
    assert set(body) == {"response", "usage", "model"}
    assert body["model"] == "tiny"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_with_an_adapter_matches_the_openai_route(server: RunningServer) -> None:
    simple = httpx.post(f"{server.url}/chat", json={**CHAT, "model": "support", "ignore_eos": True}).json()
    openai_style = httpx.post(
        f"{server.url}/v1/chat/completions", json={**CHAT, "model": "support", "ignore_eos": True}
    ).json()
    assert simple["response"] == openai_style["choices"][0]["message"]["content"]


def test_chat_stream(server: RunningServer) -> None:
    with httpx.stream(
        "POST", f"{server.url}/chat", json={**CHAT, "stream": True, "ignore_eos": True}
    ) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    pieces = [json.loads(event) for event in events[:-1]]
    assert len({piece["message_id"] for piece in pieces}) == 1
    plain = httpx.post(f"{server.url}/chat", json={**CHAT, "ignore_eos": True}).json()
    assert "".join(piece["text"] for piece in pieces) == plain["response"]


def test_generate_and_batch(server: RunningServer) -> None:
    generated = httpx.post(
        f"{server.url}/generate",
        json={"prompt": "Once upon", "max_tokens": 6, "temperature": 0, "ignore_eos": True},
    ).json()
    assert generated["usage"]["completion_tokens"] == 6
    assert set(generated) == {"generated_text", "usage", "model"}
    batch = httpx.post(
        f"{server.url}/batch",
        json={"prompts": ["Once upon", "def f(x):"], "max_tokens": 6, "temperature": 0, "ignore_eos": True},
    ).json()
    assert len(batch["results"]) == 2
    assert batch["results"][0] == generated["generated_text"]
    assert batch["usage"]["completion_tokens"] == 12
