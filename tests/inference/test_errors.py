"""Every failure in one shape, with the right status code and nothing half-done."""

import asyncio
import collections
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from llm_server.config import ServerSettings
from llm_server.engine.interface import Delta, Prompt, SamplingParams
from llm_server.main import build_engine
from tests.inference.harness import RunningServer, running_server

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    for fragment in fragments:
        assert fragment in error["message"]
    return error


def test_prompt_longer_than_the_context_names_the_lengths(server: RunningServer) -> None:
    long = {**CHAT, "messages": [{"role": "user", "content": "fox " * 2000}], "max_tokens": 10}
    error = assert_error(
        httpx.post(f"{server.url}/v1/chat/completions", json=long),
        400,
        "maximum context length is 512 tokens",
        "in the messages",
        "10 in the completion",
    )
    assert error["type"] == "BadRequestError"


def test_max_tokens_is_bounded_by_the_context_and_defaults_to_the_rest_of_it(server: RunningServer) -> None:
    for too_many in (600, 100_000):
        assert_error(
            httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": too_many}),
            400,
            "maximum context length is 512 tokens",
        )
    unbounded = {"model": "tiny", "messages": CHAT["messages"], "ignore_eos": True, "temperature": 0}
    usage = httpx.post(f"{server.url}/v1/chat/completions", json=unbounded, timeout=120).json()["usage"]
    assert usage["total_tokens"] == 512, usage  # no max_tokens: the rest of the context, not 256
    room = 512 - usage["prompt_tokens"]
    answer = httpx.post(
        f"{server.url}/v1/chat/completions", json={**unbounded, "max_tokens": room}, timeout=120
    )
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"


def test_unknown_model_or_adapter(server: RunningServer) -> None:
    error = assert_error(
        httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": "gpt-5"}), 404, "gpt-5"
    )
    assert error["param"] == "model"
    assert_error(httpx.post(f"{server.url}/generate", json={"prompt": "x", "model": "nope"}), 404)


def test_a_request_whose_adapter_is_unloaded_while_it_waits_is_404(demo: tuple[Path, Path]) -> None:
    """The race an unload can lose (the request passed the model check, then its adapter went): the
    client gets the unknown-model 404, as if it had come a moment later, not a 500."""
    from llm_server.engine.loading import detach_adapter

    model, adapter = demo
    with running_server(model, adapters={"support": adapter}, served_model_name="tiny") as server:
        engine = server.app.state.server.generation.engine
        body = {**CHAT, "model": "support"}
        with engine._model_lock:  # no step can start: the request waits in the queue
            responses: list[httpx.Response] = []
            sender = threading.Thread(
                target=lambda: responses.append(httpx.post(f"{server.url}/v1/chat/completions", json=body))
            )
            sender.start()
            deadline = time.monotonic() + 10
            while engine.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.waiting == 1
            detach_adapter(engine._loaded, "support")  # what a concurrent unload did first
        sender.join(30)
        error = assert_error(responses[0], 404, "support")
        assert error["param"] == "model"
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({**CHAT, "temperature": -1}, "temperature"),
        ({**CHAT, "top_p": 1.5}, "top_p"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "n": 0}, "n"),
        ({"model": "tiny", "prompt": [1, "x"]}, "prompt"),  # not a pydantic branch name such as prompt.str
        ({"model": "tiny", "prompt": ""}, "prompt"),
    ],
)
def test_malformed_bodies_are_400_naming_the_field(server: RunningServer, body: dict, param: str) -> None:
    route = "completions" if "prompt" in body else "chat/completions"
    error = assert_error(httpx.post(f"{server.url}/v1/{route}", json=body), 400)
    assert error["param"] == param


def test_without_model_the_served_model_answers_as_in_vllm(server: RunningServer) -> None:
    for route, body in (
        ("chat/completions", {"messages": CHAT["messages"]}),
        ("completions", {"prompt": "Hi"}),
    ):
        answer = httpx.post(f"{server.url}/v1/{route}", json={**body, "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["model"] == "tiny", answer.text


def test_not_json_and_not_a_number(server: RunningServer) -> None:
    assert_error(
        httpx.post(
            f"{server.url}/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        ),
        400,
    )
    raw = json.dumps(CHAT).replace('"max_tokens": 4', '"max_tokens": 4, "temperature": NaN')
    assert_error(
        httpx.post(
            f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        ),
        400,
    )


def test_unknown_route_and_method(server: RunningServer) -> None:
    assert_error(httpx.get(f"{server.url}/v2/nothing"), 404)
    assert_error(httpx.get(f"{server.url}/v1/chat/completions"), 405)


def test_oversized_body_is_413(demo: tuple[Path, Path]) -> None:
    with running_server(demo[0], served_model_name="tiny", max_body_bytes=4096) as server:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
        assert_error(httpx.post(f"{server.url}/v1/chat/completions", json=big), 413, "exceeds 4096")
        chunked = (part for part in [json.dumps(big).encode()])  # no Content-Length: chunked encoding
        response = httpx.post(
            f"{server.url}/v1/chat/completions", content=chunked, headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "exceeds 4096")


def test_queue_full_is_429_with_retry_after_and_the_server_recovers(demo: tuple[Path, Path], figure) -> None:  # type: ignore[no-untyped-def]
    long = {**CHAT, "max_tokens": 300, "ignore_eos": True}
    burst = 16
    with running_server(demo[0], served_model_name="tiny", max_batch_size=2, max_queued_requests=2) as server:

        async def overflow() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(
                    *(client.post("/v1/chat/completions", json=long) for _ in range(burst))
                )

        responses = asyncio.run(overflow())
        statuses = collections.Counter(response.status_code for response in responses)
        assert set(statuses) == {200, 429} and statuses[200] >= 4, statuses
        for response in responses:
            if response.status_code == 429:
                assert_error(response, 429, "capacity")
                assert response.headers["retry-after"] == "1"
            else:
                assert response.json()["usage"]["completion_tokens"] == 300  # admitted ones are served whole
        deadline = time.monotonic() + 10
        while server.metric("vllm:num_requests_running", {"model_name": "tiny"}):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        after = [httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code for _ in range(burst)]
        assert after == [200] * burst
    figure(
        f"{burst} at once against room for 4 (batch 2 + queue 2): {statuses[200]} served whole, "
        f"{statuses[429]} got 429 + Retry-After; then {burst}/{burst} served"
    )


def test_timeout_mid_stream_sends_an_error_event_then_done(demo: tuple[Path, Path], figure) -> None:  # type: ignore[no-untyped-def]
    with running_server(demo[0], served_model_name="tiny", request_timeout=0.3) as server:
        slow = {**CHAT, "max_tokens": 500, "ignore_eos": True}
        plain = httpx.post(f"{server.url}/v1/chat/completions", json=slow, timeout=30)
        started = time.monotonic()
        assert_error(plain, 504, "request timeout of 0.3 s")
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json={**slow, "stream": True}
        ) as response:
            events = [
                line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")
            ]
        assert time.monotonic() - started < 10
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == 504
        deadline = time.monotonic() + 5  # the stopped generation gives its batch row back
        while server.metric("vllm:num_requests_running", {"model_name": "tiny"}):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    figure("500-token generations, 0.3 s timeout: 504, or an error event + [DONE] when streamed; row freed")


class ExplodingEngine:
    """A real engine whose generation fails mid-way: the HTTP layer must answer 500 without a traceback."""

    def __init__(self, settings: ServerSettings) -> None:
        self._engine = build_engine(settings)

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        async def failing() -> AsyncIterator[Delta]:
            yield Delta("partial", 1)
            raise RuntimeError("CUDA error: an illegal memory access was encountered at /secret/path.py:42")

        return failing()


def test_internal_failure_is_500_without_details(demo: tuple[Path, Path]) -> None:
    with running_server(demo[0], served_model_name="tiny", engine_factory=ExplodingEngine) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
        error = assert_error(response, 500, "internal server error", response.headers["x-request-id"])
        assert "secret" not in response.text and "Traceback" not in response.text
        assert error["type"] == "InternalServerError"
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}
        ) as streamed:
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == 500
        assert "secret" not in "".join(events)


OPEN_PATHS = {
    "/health",
    "/health/live",
    "/health/ready",
    "/metrics",
    "/docs",
    "/openapi.json",
    "/ping",
    "/version",
}


def test_api_key(demo: tuple[Path, Path], figure) -> None:  # type: ignore[no-untyped-def]
    key = "s3cret-key"
    with running_server(demo[0], served_model_name="tiny", api_key=key, enable_runtime_lora=True) as server:
        # Every operation the server documents, so a new endpoint is covered the day it is added.
        document = httpx.get(f"{server.url}/openapi.json").json()
        operations = [
            (method.upper(), path)
            for path, methods in document["paths"].items()
            if path not in OPEN_PATHS
            for method in methods
        ]
        assert len(operations) >= 10
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}, {"X-Api-Key": key}):
            for method, path in operations:
                response = httpx.request(method, f"{server.url}{path}", json={}, headers=headers)
                assert_error(response, 401, "API key")
                assert response.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=good).status_code == 200
        for open_path in OPEN_PATHS:
            assert httpx.get(f"{server.url}{open_path}").status_code == 200
    figure(f"{len(operations)} operations x 4 wrong credentials: all 401; health, metrics and docs open")


def test_concurrent_requests_all_complete(server: RunningServer) -> None:
    results: list[int] = []

    def call() -> None:
        results.append(httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30).status_code)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 8


def test_a_chat_template_that_refuses_the_messages_is_400(demo: tuple[Path, Path], tmp_path: Path) -> None:
    """Templates that check the conversation (Mistral's, Gemma's roles in order) raise: the client gets
    their message as a 400; a model without a template says it cannot chat, and still completes text."""
    strict, plain = tmp_path / "strict", tmp_path / "plain"
    shutil.copytree(demo[0], strict)
    shutil.copytree(demo[0], plain)
    (strict / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user "
        "message') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (plain / "chat_template.jinja").unlink()
    system_first = {**CHAT, "messages": [{"role": "system", "content": "Be terse."}, *CHAT["messages"]]}
    with running_server(strict, served_model_name="tiny") as server:
        error = assert_error(
            httpx.post(f"{server.url}/v1/chat/completions", json=system_first),
            400,
            "Conversations must start with a user message",
        )
        assert error["param"] == "messages"
        assert_error(httpx.post(f"{server.url}/chat", json={"messages": system_first["messages"]}), 400)
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    with running_server(plain, served_model_name="tiny") as server:
        assert_error(httpx.post(f"{server.url}/v1/chat/completions", json=CHAT), 400, "cannot chat")
        completion = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
        assert httpx.post(f"{server.url}/v1/completions", json=completion).status_code == 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "structural_tag"}}, "response_format"),
        ({"functions": [{"name": "f"}], "function_call": "auto"}, "functions"),
    ],
)
def test_openai_features_this_server_lacks_are_400_naming_them(
    server: RunningServer, fields: dict, param: str
) -> None:
    """A 200 without them would look like success: tools never called, a structural tag ignored."""
    error = assert_error(
        httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, **fields}), 400, "not supported"
    )
    assert error["param"] == param


def test_unset_fields_sent_as_null_take_their_defaults(server: RunningServer) -> None:
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "seed": None, "stop": None}
    history = [
        {"role": "user", "content": "Call a tool"},
        {"role": "assistant", "content": None},  # a tool-calling turn, as OpenAI's history has it
        {"role": "user", "content": "Hello"},
    ]
    response = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, **nulls, "messages": history})
    assert response.status_code == 200, response.text
    usage_without_stream = {**CHAT, "stream_options": {"include_usage": True}}
    assert_error(
        httpx.post(f"{server.url}/v1/chat/completions", json=usage_without_stream),
        400,
        "only allowed when stream is true",
    )


def test_unlisted_http_methods_share_one_metric_label(server: RunningServer) -> None:
    """Methods the HTTP parser knows but the API does not (WebDAV's) reach the app: each would otherwise be a
    new time series. A made-up one is refused by the parser (httptools) before it gets that far."""
    for method in ("PROPFIND", "MKCOL", "REPORT"):
        assert httpx.request(method, f"{server.url}/v1/models").status_code == 405
    assert httpx.request("ZZ0", f"{server.url}/v1/models").status_code == 400
    labels = {"method": "other", "route": "/v1/models", "status": "405"}
    # The middleware counts a request once its response is sent, so the last count can trail the client.
    deadline = time.monotonic() + 5
    while server.metric("llm_server_http_requests_total", labels) != 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("llm_server_http_requests_total", labels) == 3
    for method in ("PROPFIND", "ZZ0"):
        assert server.metric("llm_server_http_requests_total", {**labels, "method": method}) is None


def test_a_batch_larger_than_the_server_can_hold_is_400_not_a_429_forever(demo: tuple[Path, Path]) -> None:
    with running_server(demo[0], served_model_name="tiny", max_batch_size=2, max_queued_requests=2) as server:
        error = assert_error(
            httpx.post(f"{server.url}/batch", json={"prompts": ["hi"] * 5, "max_tokens": 2}), 400, "(4)"
        )
        assert error["param"] == "prompts"
        fits = {"prompts": ["hi"] * 4, "max_tokens": 2}
        assert httpx.post(f"{server.url}/batch", json=fits).status_code == 200
