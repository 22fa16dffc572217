"""Readiness while loading and draining, metrics, disconnects, adapter failures and runtime adapters."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from llm_server.config import ServerSettings
from llm_server.engine.interface import Engine
from llm_server.main import build_engine
from tests.conftest import ROOT
from tests.inference.harness import RunningServer, free_port, running_server

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def wait_for(check, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


def test_not_ready_while_the_model_loads(demo: tuple[Path, Path]) -> None:
    release = threading.Event()

    def slow_loading(settings: ServerSettings) -> Engine:
        release.wait(30)  # a big model still reading its weights
        return build_engine(settings)

    with running_server(
        demo[0], served_model_name="tiny", engine_factory=slow_loading, wait_ready=False
    ) as server:
        assert httpx.get(f"{server.url}/health/live").status_code == 200
        ready = httpx.get(f"{server.url}/health/ready")
        assert (ready.status_code, ready.json()) == (503, {"status": "loading"})
        assert httpx.get(f"{server.url}/health").json()["status"] == "loading"
        busy = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
        assert busy.status_code == 503 and busy.json()["error"]["message"] == "the model is still loading"
        release.set()
        server.wait_ready()
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_metrics_after_traffic(server: RunningServer) -> None:
    for _ in range(3):
        httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 6, "ignore_eos": True})
    httpx.post(
        f"{server.url}/v1/chat/completions",
        json={**CHAT, "model": "support", "max_tokens": 6, "ignore_eos": True},
    )
    httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": "nope"})
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:lora_requests_info",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ):
        assert f"{name}" in text and 'model_name="tiny"' in text, name
    assert (
        server.metric("vllm:request_success_total", {"model_name": "tiny", "finished_reason": "length"}) >= 4
    )
    assert server.metric("vllm:generation_tokens_total", {"model_name": "tiny"}) >= 24
    assert server.metric("vllm:e2e_request_latency_seconds_count", {"model_name": "tiny"}) >= 4
    assert server.metric("vllm:num_requests_running", {"model_name": "tiny"}) == 0
    assert server.metric("vllm:kv_cache_usage_perc", {"model_name": "tiny"}) == 0
    # At least one step per generated token after the first (each request's first comes with its prompt).
    assert server.metric("llm_engine_step_duration_seconds_count", {"model_name": "tiny"}) >= 5
    assert server.metric("llm_engine_step_duration_seconds_sum", {"model_name": "tiny"}) > 0
    assert (
        server.metric(
            "llm_server_http_requests_total",
            {"method": "POST", "route": "/v1/chat/completions", "status": "404"},
        )
        >= 1
    )
    assert (
        server.metric(
            "llm_server_http_requests_total",
            {"method": "POST", "route": "/v1/chat/completions", "status": "200"},
        )
        >= 4
    )


def test_a_client_that_disconnects_cancels_its_generation(server: RunningServer) -> None:
    before = server.metric("vllm:generation_tokens_total", {"model_name": "tiny"}) or 0
    long = {**CHAT, "max_tokens": 480, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**long, "stream": True}) as response:
        lines = response.iter_lines()
        next(lines)
        wait_for(lambda: server.metric("vllm:num_requests_running", {"model_name": "tiny"}) == 1)
    # The stream is closed: the engine stops at its next step and the slot is free.
    wait_for(lambda: server.metric("vllm:num_requests_running", {"model_name": "tiny"}) == 0, timeout=5)
    generated = (server.metric("vllm:generation_tokens_total", {"model_name": "tiny"}) or 0) - before
    assert generated < 480

    # The same for a plain (non-streamed) request whose client gives up.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=long, timeout=0.2)
    wait_for(lambda: server.metric("vllm:num_requests_running", {"model_name": "tiny"}) == 0, timeout=5)
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200


def start_process(demo: tuple[Path, Path], port: int, *args: str, **env: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "LLM_LOG_FORMAT": "json", **env}
    command = [
        sys.executable,
        "-m",
        "llm_server.cli",
        "serve",
        "--model",
        str(demo[0]),
        "--port",
        str(port),
        "--served-model-name",
        "tiny",
        *args,
    ]
    return subprocess.Popen(
        command, env=environment, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_sigterm_drains_then_finishes_in_flight_requests(demo: tuple[Path, Path], figure) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    drain = 0.3  # shorter than the requests: they must also outlive the start of uvicorn's shutdown
    process = start_process(demo, port, LLM_DRAIN_SECONDS=str(drain), LLM_SHUTDOWN_TIMEOUT="20")
    in_flight = 6
    try:
        wait_for(lambda: _status(f"{url}/health/ready") == 200, timeout=60)
        results: list[tuple[int, int]] = []
        finished: list[float] = []

        def call(stream: bool) -> None:
            body = {**CHAT, "max_tokens": 400, "ignore_eos": True}
            if not stream:
                response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
                results.append((response.status_code, response.json()["usage"]["completion_tokens"]))
                finished.append(time.monotonic())
                return
            streamed = {
                "model": "tiny",
                "prompt": "Hi",
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, **streamed}) as response:
                chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
            results.append((response.status_code, json.loads(chunks[-1][6:])["usage"]["completion_tokens"]))
            finished.append(time.monotonic())

        callers = [threading.Thread(target=call, args=(index % 2 == 0,)) for index in range(in_flight)]
        for caller in callers:
            caller.start()
        wait_for(lambda: _metric(url, "vllm:num_requests_running") == in_flight, timeout=10)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: _status(f"{url}/health/ready") == 503, timeout=2)
        for caller in callers:
            caller.join(30)
        assert results == [(200, 400)] * in_flight, "every in-flight request finished, streamed or not"
        assert max(finished) - sent > drain, "the requests were meant to run past the drain"
        # uvicorn re-raises the signal once shut down: the status a SIGTERM'd process reports.
        assert process.wait(30) in (0, -signal.SIGTERM)
        exited = time.monotonic() - sent
        assert exited < 25
    finally:
        process.kill()
    output = process.stdout.read() if process.stdout else ""
    assert "draining" in output
    figure(
        f"SIGTERM with {in_flight} requests in flight (half streamed): all finished (200, 400 tokens), "
        f"exit after {exited:.1f} s"
    )


def _metric(url: str, name: str) -> float | None:
    try:
        text = httpx.get(f"{url}/metrics", timeout=1).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return None


def test_an_adapter_that_fails_to_load_is_logged_and_the_rest_serve(
    demo: tuple[Path, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process(demo, port, "--adapter", f"support={demo[1]}", "--adapter", f"broken={broken}")
    try:
        wait_for(lambda: _status(f"{url}/health/ready") == 200, timeout=60)
        for model, status in (("tiny", 200), ("support", 200), ("broken", 404)):
            response = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": model})
            assert response.status_code == status, model
    finally:
        process.terminate()
        process.wait(30)
    output = process.stdout.read() if process.stdout else ""
    failures = [
        record
        for record in (json.loads(line) for line in output.splitlines() if line.startswith("{"))
        if record.get("message") == "adapter failed"
    ]
    assert len(failures) == 1 and failures[0]["adapter"] == "broken"
    assert failures[0]["reason"] == f"not a LoRA adapter: no adapter_config.json in {broken}"


def test_runtime_adapters_when_enabled(demo: tuple[Path, Path]) -> None:
    with running_server(demo[0], served_model_name="tiny", enable_runtime_lora=True) as server:
        load = {"lora_name": "late", "lora_path": str(demo[1])}
        response = httpx.post(f"{server.url}/v1/load_lora_adapter", json=load)
        assert response.status_code == 200 and "late" in response.text
        ids = [model["id"] for model in httpx.get(f"{server.url}/v1/models").json()["data"]]
        assert ids == ["tiny", "late"]
        chat = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": "late"})
        assert chat.status_code == 200
        again = httpx.post(f"{server.url}/v1/load_lora_adapter", json=load)
        assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
        missing = httpx.post(
            f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nope"}
        )
        assert missing.status_code == 400
        assert (
            httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
        )
        assert (
            httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": "late"}).status_code == 404
        )
        gone = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "late"})
        assert gone.status_code == 404
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_runtime_adapters_are_off_by_default(server: RunningServer) -> None:
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
    assert response.status_code == 404


def test_prompts_are_logged_only_when_asked(
    demo: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "my card number is 4111 1111 1111 1111"
    body = {**CHAT, "messages": [{"role": "user", "content": secret}]}
    with caplog.at_level("INFO"), running_server(demo[0], served_model_name="tiny") as server:
        response = httpx.post(
            f"{server.url}/v1/chat/completions", json=body, headers={"X-Request-Id": "req-42"}
        )
        assert response.headers["x-request-id"] == "req-42"
    finished = [record for record in caplog.records if record.getMessage() == "generation finished"]
    assert finished and finished[0].completion_tokens == 4
    assert secret not in caplog.text
    caplog.clear()
    with (
        caplog.at_level("INFO"),
        running_server(demo[0], served_model_name="tiny", log_prompts=True) as server,
    ):
        httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert any(secret in str(getattr(record, "prompt", "")) for record in caplog.records)


def test_json_log_lines_carry_the_request_id() -> None:
    import logging

    from llm_server.logs import JsonFormatter, request_id

    token = request_id.set("abc123")
    try:
        record = logging.LogRecord("llm_server", logging.INFO, __file__, 1, "hello %s", ("world",), None)
        record.status = 200
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert line["message"] == "hello world" and line["request_id"] == "abc123" and line["status"] == 200


def test_kv_cache_usage_is_what_the_running_requests_hold(server: RunningServer) -> None:
    """vllm:kv_cache_usage_perc (and its old name, which the Gateway API inference extension reads): a
    running request holds its prompt + max_tokens of the cache budget; none running, none held."""
    body = {**CHAT, "max_tokens": 300, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    budget = server.settings.max_batch_tokens
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as stream:
        data = (line for line in stream.iter_lines() if line.startswith("data: "))
        next(data), next(data)  # the role chunk, then the first token's: the request is in the batch
        held = server.metric("vllm:kv_cache_usage_perc", {"model_name": "tiny"})
        old_name = server.metric("vllm:gpu_cache_usage_perc", {"model_name": "tiny"})
        events = [line.removeprefix("data: ") for line in data]
    usage = json.loads(events[-2])["usage"]
    assert held == old_name == (usage["prompt_tokens"] + 300) / budget
    assert server.metric("vllm:kv_cache_usage_perc", {"model_name": "tiny"}) == 0
