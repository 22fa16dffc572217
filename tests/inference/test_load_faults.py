"""Under load and faults: clients that vanish mid-stream leave nothing running and memory flat; a secret
API key never reaches logs or responses."""

import asyncio
import logging
import resource
from pathlib import Path

import httpx
import pytest

from tests.inference.harness import RunningServer, running_server

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}


async def abandon_streams(url: str, clients: int, chunks: int) -> None:
    """Each client reads the first `chunks` chunks of a long stream (1: the role chunk, before any token;
    more: it was decoding), then drops the connection."""
    body = {**CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def one() -> None:
        seen = 0
        async with (
            httpx.AsyncClient(timeout=60) as client,
            client.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
        ):
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen == chunks:
                    return  # leaving the block closes the connection mid-stream

    await asyncio.gather(*(one() for _ in range(clients)))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_100_clients_that_disconnect_leave_nothing_running(server: RunningServer, figure) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(abandon_streams(server.url, 20, 4))  # warm-up: allocator pools reach their working size
    before = rss_mb()
    tokens_before = server.metric("vllm:generation_tokens_total", {"model_name": "tiny"}) or 0
    for round_ in range(5):  # some leave before their first token, most while decoding
        asyncio.run(abandon_streams(server.url, 20, 1 if round_ == 0 else 4))

    def idle() -> bool:
        # The server learns of each disconnect a moment after the client leaves: wait for it.
        running = server.metric("vllm:num_requests_running", {"model_name": "tiny"})
        waiting = server.metric("vllm:num_requests_waiting", {"model_name": "tiny"})
        return running == 0 and waiting == 0

    for _ in range(300):
        if idle():
            break
        asyncio.run(asyncio.sleep(0.05))
    assert idle()
    # Cancelled, not run to the end for nobody: the engine decoded far fewer than 100 x 400 tokens (its
    # counter includes tokens nobody read).
    generated = (server.metric("vllm:generation_tokens_total", {"model_name": "tiny"}) or 0) - tokens_before
    assert generated < 100 * 400 / 10, generated
    # Peak RSS of the whole test process (server included) after 100 more abandoned streams.
    assert rss_mb() - before < 100, f"peak RSS grew from {before:.0f} MB to {rss_mb():.0f} MB"
    assert httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 4}).status_code == 200
    figure(
        "100 abandoned 400-token streams (20 before the first token, 80 after 3): running 0, waiting 0, "
        f"{generated:.0f} tokens generated "
        f"(of 40000 asked), peak RSS +{rss_mb() - before:.0f} MB"
    )


def test_the_api_key_never_reaches_logs_or_responses(
    demo: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    canary = "sk-canary-3f9d2c71e0"
    with (
        caplog.at_level(logging.DEBUG),
        running_server(demo[0], served_model_name="tiny", api_key=canary) as server,
    ):
        wrong = httpx.post(
            f"{server.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}
        )
        right = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={**CHAT, "max_tokens": 4},
            headers={"Authorization": f"Bearer {canary}"},
        )
        info = httpx.get(f"{server.url}/model/info", headers={"Authorization": f"Bearer {canary}"})
        metrics = httpx.get(f"{server.url}/metrics")
    assert (wrong.status_code, right.status_code, info.status_code) == (401, 200, 200)
    for text in (wrong.text, right.text, info.text, metrics.text, caplog.text):
        assert canary not in text
