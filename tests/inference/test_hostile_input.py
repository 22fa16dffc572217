"""Hostile and malformed input: a 4xx in the one error shape, never a 5xx, and the server keeps serving."""

import asyncio
import json
import time

import httpx
import pytest

from tests.inference.harness import RunningServer

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
JSON = {"content-type": "application/json"}


def body(**changes: object) -> bytes:
    return json.dumps({**CHAT, **changes}).encode()


HOSTILE = {
    "invalid-utf8": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}',
    "not-json": b"\x00\x01\x02",
    "truncated": body()[:-5],
    "nan-temperature": body().replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": NaN'),
    "infinite-top-p": body().replace(b'"max_tokens": 4', b'"max_tokens": 4, "top_p": Infinity'),
    "negative-temperature": body(temperature=-0.5),
    "huge-temperature": body(temperature=1e308),
    "negative-max-tokens": body(max_tokens=-1),
    "huge-max-tokens": body(max_tokens=2**63),
    "float-max-tokens": body(max_tokens=3.7),
    "string-seed": body(seed="seven"),
    "seed-beyond-64-bits": body(seed=2**64),
    "thousands-of-messages": body(messages=[{"role": "user", "content": "hi"}] * 5000),
    "huge-prompt": body(messages=[{"role": "user", "content": "fox " * 200_000}]),
    "unknown-role": body(messages=[{"role": "root", "content": "hi"}]),
    "content-not-text": body(messages=[{"role": "user", "content": {"evil": True}}]),
    "image-part": body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
    "messages-not-a-list": body(messages="hello"),
    "model-not-a-string": body(model=["tiny"]),
    "nested-stop": body(stop=[["x"]]),
    "array-body": b"[1, 2, 3]",
    "deeply-nested": b'{"model": "tiny", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
}


@pytest.mark.parametrize("payload", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_bodies_get_a_4xx_in_the_error_shape(server: RunningServer, payload: bytes) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", content=payload, headers=JSON, timeout=30)
    assert 400 <= response.status_code < 500, response.text[:300]
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_empty_content_is_served(server: RunningServer) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body(messages=[{"role": "user", "content": ""}]),
        headers=JSON,
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_wrong_content_types_are_rejected(server: RunningServer, content_type: str) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=body(), headers={"content-type": content_type}
    )
    assert 400 <= response.status_code < 500


def test_the_server_still_serves_afterwards(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/health/ready").status_code == 200
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert server.metric("vllm:num_requests_running", {"model_name": "tiny"}) == 0


def test_a_huge_prompt_does_not_stall_the_other_clients(server: RunningServer, figure) -> None:  # type: ignore[no-untyped-def]
    """Tokenizing millions of characters takes seconds; meanwhile probes and other clients are answered
    (the kubelet restarts a pod whose liveness probe times out)."""
    message = {"role": "user", "content": "Serving language models on Kubernetes " * 25_000}  # 950k chars
    huge = body(messages=[message] * 4)

    async def scenario() -> tuple[float, float, int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            started = time.perf_counter()
            big = asyncio.create_task(client.post("/v1/chat/completions", content=huge, headers=JSON))
            slowest = 0.0
            while not big.done():
                before = time.perf_counter()
                assert (await client.get("/health/live")).status_code == 200
                slowest = max(slowest, time.perf_counter() - before)
            return time.perf_counter() - started, slowest, (await big).status_code

    took, slowest_probe, status = asyncio.run(scenario())
    assert status == 400  # longer than the context
    assert took > 1.0, "the prompt was meant to take a while to tokenize"
    assert slowest_probe < took / 3, (slowest_probe, took)
    figure(
        f"3.8M-character chat tokenized in {took:.1f} s (then 400); "
        f"slowest liveness probe meanwhile {slowest_probe * 1000:.0f} ms"
    )
