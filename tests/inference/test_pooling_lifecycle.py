"""A pooling model under the generation engine's rules: the queue bound (429), the request timeout (504), a
client that leaves, startup failures with a reason, and SIGTERM's drain."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.inference.harness import RunningServer, free_port, running_server
from tests.inference.pooling_models import MINILM, build_classifier, sentence
from tests.inference.test_lifecycle import wait_for

MODEL = "minilm"
LABELS = {"model_name": MODEL}
BIG = [sentence(60, start=index) for index in range(2000)]  # 2000 inputs of 62 tokens: many forwards


def forwards(server: RunningServer) -> float:
    return server.metric("llm_engine_step_duration_seconds_count", LABELS) or 0


def idle(server: RunningServer) -> bool:
    running = server.metric("vllm:num_requests_running", LABELS)
    return running == 0 and server.metric("vllm:num_requests_waiting", LABELS) == 0


def settled_forwards(server: RunningServer) -> float:
    """Forwards once none is asked for any more: the one running when the request was given up may end a
    moment later, and then no other may start."""
    wait_for(lambda: idle(server), timeout=5)
    time.sleep(0.5)
    stopped = forwards(server)
    time.sleep(0.5)
    assert forwards(server) == stopped, "forwards went on for a request nobody waits for"
    return stopped


def test_the_queue_bound_is_429_with_retry_after() -> None:
    """Two requests fit the next forward (2 rows), two more may wait: the fifth and later are 429."""
    with running_server(MINILM, served_model_name=MODEL, max_batch_size=2, max_queued_requests=2) as server:
        engine = server.app.state.server.engine
        responses: list[httpx.Response] = []

        def send(index: int) -> None:
            responses.append(
                httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": f"text {index}"})
            )

        with engine._intake:  # no forward starts: every request stays queued
            senders = [threading.Thread(target=send, args=(index,)) for index in range(8)]
            for sender in senders:
                sender.start()
                time.sleep(0.05)  # in order, so that which ones get in is certain
            wait_for(lambda: len(responses) == 4 and engine.waiting == 4)
            assert {response.status_code for response in responses} == {429}
            assert responses[0].headers["retry-after"] == "1"
            assert "at capacity" in responses[0].json()["error"]["message"]
            assert server.metric("vllm:num_requests_waiting", LABELS) == 4
        for sender in senders:
            sender.join(30)
        assert sorted(response.status_code for response in responses) == [200] * 4 + [429] * 4


def test_a_client_that_leaves_stops_its_forwards(figure) -> None:  # type: ignore[no-untyped-def]
    with running_server(MINILM, served_model_name=MODEL, max_batch_size=8) as server:
        before = forwards(server)
        with pytest.raises(httpx.ReadTimeout):  # 250 forwards of 8 rows: seconds on a CPU
            httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": BIG}, timeout=0.5)
        stopped = settled_forwards(server)
        assert stopped - before < 250 / 2, stopped - before
        figure(
            f"a client that left after 0.5 s of a 250-forward request: {stopped - before:.0f} forwards ran"
        )
        assert (
            httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "again"}).status_code
            == 200
        )


def test_a_client_that_leaves_while_queued_costs_no_forward() -> None:
    with running_server(MINILM, served_model_name=MODEL) as server:
        engine, before = server.app.state.server.engine, forwards(server)
        with engine._intake:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    f"{server.url}/v1/embeddings", json={"model": MODEL, "input": BIG[:10]}, timeout=0.3
                )
            wait_for(lambda: engine.waiting == 0)
        time.sleep(0.3)
        assert forwards(server) == before


def test_the_request_timeout_is_504_and_frees_the_queue() -> None:
    with running_server(MINILM, served_model_name=MODEL, max_batch_size=8, request_timeout=0.3) as server:
        before = forwards(server)
        response = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": BIG}, timeout=30)
        assert (
            response.status_code == 504 and "request timeout of 0.3 s" in response.json()["error"]["message"]
        )
        assert settled_forwards(server) - before < 250 / 2


@pytest.mark.parametrize(
    ("task", "overrides", "reason"),
    [
        ("classify", {}, "task classify needs a sequence-classification model"),
        ("generate", {}, "task generate needs a causal language model"),
        ("embed", {"adapters": {"support": "/adapters/support"}}, "LoRA adapters serve generation only"),
    ],
)
def test_a_task_the_model_cannot_do_fails_startup_with_the_reason(
    tmp_path: Path, task: str, overrides: dict, reason: str
) -> None:
    termination_log = tmp_path / "termination-log"
    with running_server(
        MINILM,
        served_model_name=MODEL,
        task=task,
        termination_log=termination_log,
        wait_ready=False,
        **overrides,
    ) as server:
        wait_for(lambda: server.app.state.server.phase == "failed")
        ready = httpx.get(f"{server.url}/health/ready")
        embeddings = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert termination_log.read_text().startswith(f"startup failed: {reason}")
    assert (ready.status_code, embeddings.status_code) == (503, 503)


def test_score_on_a_classifier_with_three_labels_fails_startup(tmp_path: Path) -> None:
    model_dir = build_classifier(tmp_path / "three", ["a", "b", "c"])
    termination_log = tmp_path / "termination-log"
    with running_server(model_dir, task="score", termination_log=termination_log, wait_ready=False) as server:
        wait_for(lambda: server.app.state.server.phase == "failed")
    assert "task score needs a cross-encoder" in termination_log.read_text()
    assert "3 labels: use task classify" in termination_log.read_text()


def test_sigterm_drains_then_finishes_the_embeddings_in_flight(figure) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    drain = 0.3
    command = [sys.executable, "-m", "llm_server.cli", "serve", "--model", str(MINILM), "--port", str(port)]
    environment = {
        **os.environ,
        "LLM_SERVED_MODEL_NAME": MODEL,
        "LLM_TASK": "embed",
        "LLM_DRAIN_SECONDS": str(drain),
        "LLM_SHUTDOWN_TIMEOUT": "30",
        "LLM_MAX_BATCH_SIZE": "8",
    }
    process = subprocess.Popen(
        command, env=environment, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    in_flight, results, finished = 4, [], []
    try:
        wait_for(lambda: _status(f"{url}/health/ready") == 200, timeout=90)

        def call() -> None:
            try:
                response = httpx.post(
                    f"{url}/v1/embeddings", json={"model": MODEL, "input": BIG[:48]}, timeout=90
                )
            except httpx.HTTPError as error:  # the assertion below shows it
                results.append((repr(error), 0))
                return
            results.append((response.status_code, len(response.json()["data"])))
            finished.append(time.monotonic())

        callers = [threading.Thread(target=call) for _ in range(in_flight)]
        for caller in callers:
            caller.start()
        wait_for(lambda: _running(url) > 0, timeout=10)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: _status(f"{url}/health/ready") == 503, timeout=2)
        for caller in callers:
            caller.join(60)
        assert results == [(200, 48)] * in_flight, "every request in flight finished"
        assert max(finished) - sent > drain, "the requests were meant to run past the drain"
        assert process.wait(30) in (0, -signal.SIGTERM)
        exited = time.monotonic() - sent
    finally:
        process.kill()
    output = process.stdout.read() if process.stdout else ""
    assert "draining" in output
    figure(
        f"SIGTERM with {in_flight} embedding requests of 48 inputs in flight: all 200, "
        f"exit after {exited:.1f} s"
    )


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return None


def _running(url: str) -> float:
    try:
        text = httpx.get(f"{url}/metrics", timeout=1).text
    except httpx.HTTPError:
        return 0
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    return 0


def test_logs_say_what_ran(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"), running_server(MINILM, served_model_name=MODEL) as server:
        httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": ["a", "b"]})
    (finished,) = [record for record in caplog.records if record.getMessage() == "pooling finished"]
    assert (finished.task, finished.inputs, finished.prompt_tokens) == ("embed", 2, 6)
    loaded = [record for record in caplog.records if record.getMessage() == "model loaded"]
    assert (loaded[-1].task, loaded[-1].max_model_len) == ("embed", 256)
