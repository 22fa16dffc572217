"""GET/PUT /v1/adapters: the set of adapters changes at run time, in-flight requests are never cut, and a
failing adapter is reported with its reason while the base model and the other adapters serve."""

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.inference.harness import RunningServer, running_server

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def adapters(demo: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo adapter under several paths, and broken ones: rank 8 above a limit, targets the model
    lacks, no adapter at all."""
    root = tmp_path_factory.mktemp("adapters")
    made = {}
    for name in ("first", "second", "third"):
        made[name] = Path(shutil.copytree(demo[1], root / name))
    wrong_targets = Path(shutil.copytree(demo[1], root / "wrong-targets"))
    config = json.loads((wrong_targets / "adapter_config.json").read_text())
    config["target_modules"] = ["w_fancy_proj"]
    (wrong_targets / "adapter_config.json").write_text(json.dumps(config))
    made["wrong-targets"] = wrong_targets
    # Weights of rank 8 under a config of rank 4: peft adds the layers, then the weights do not fit.
    wrong_shapes = Path(shutil.copytree(demo[1], root / "wrong-shapes"))
    config = json.loads((wrong_shapes / "adapter_config.json").read_text())
    (wrong_shapes / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    made["wrong-shapes"] = wrong_shapes
    bad_rank = Path(shutil.copytree(demo[1], root / "bad-rank"))
    (bad_rank / "adapter_config.json").write_text(json.dumps({**config, "r": "eight"}))
    made["bad-rank"] = bad_rank
    made["empty"] = root / "empty"
    made["empty"].mkdir()
    return made


@pytest.fixture
def server(demo: tuple[Path, Path], adapters: dict[str, Path]) -> Iterator[RunningServer]:
    with running_server(
        demo[0],
        served_model_name="tiny",
        enable_runtime_lora=True,
        adapters={"kept": adapters["first"]},
        max_lora_rank=16,
        api_key="s3cret",
    ) as running:
        yield running


AUTH = {"Authorization": "Bearer s3cret"}


def put(server: RunningServer, entries: list[dict[str, Any]]) -> httpx.Response:
    return httpx.put(f"{server.url}/v1/adapters", json={"adapters": entries}, headers=AUTH)


def settle(server: RunningServer, timeout: float = 30) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        report = httpx.get(f"{server.url}/v1/adapters", headers=AUTH).json()["adapters"]
        if all(item["state"] in ("Ready", "Failed") for item in report) or time.monotonic() > deadline:
            return {item["name"]: item for item in report}
        time.sleep(0.05)


def served(server: RunningServer) -> dict[str, str]:
    data = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]
    return {model["id"]: model["root"] for model in data}


def chat(server: RunningServer, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": model}, headers=AUTH)


class LongStream:
    """A streamed completion of 150 tokens, started and read to its first chunk before the test goes on."""

    def __init__(self, server: RunningServer, model: str) -> None:
        self.chunks: list[dict[str, Any]] = []
        self._started = threading.Event()
        body = {
            **CHAT,
            "model": model,
            "max_tokens": 150,
            "min_tokens": 150,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self._thread = threading.Thread(target=self._read, args=(server, body))
        self._thread.start()
        assert self._started.wait(30)

    def _read(self, server: RunningServer, body: dict[str, Any]) -> None:
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    self.chunks.append(json.loads(line.removeprefix("data: ")))
                    self._started.set()

    def result(self) -> tuple[int, str | None]:
        """(tokens generated, the finish reason)."""
        self._thread.join(60)
        finish = [c["choices"][0]["finish_reason"] for c in self.chunks if c["choices"]]
        usage = [c["usage"]["completion_tokens"] for c in self.chunks if c.get("usage")]
        return usage[-1], next((reason for reason in finish if reason), None)


def test_the_start_up_set_is_served_and_reported(server: RunningServer, adapters: dict[str, Path]) -> None:
    report = settle(server)
    assert report == {
        "kept": {
            "name": "kept",
            "source": str(adapters["first"]),
            "revision": None,
            "state": "Ready",
            "reason": None,
        }
    }
    assert chat(server, "kept").status_code == 200


def test_adapters_added_changed_and_removed_without_cutting_requests(
    server: RunningServer, adapters: dict[str, Path]
) -> None:
    settle(server)
    kept = {"name": "kept", "source": str(adapters["first"])}
    added = put(server, [kept, {"name": "extra", "source": f"file://{adapters['second']}"}])
    assert added.status_code == 200
    assert {item["name"]: item["state"] for item in added.json()["adapters"]}["extra"] in (
        "Pending",
        "Loading",
    )
    assert settle(server)["extra"]["state"] == "Ready"
    assert served(server)["extra"] == str(adapters["second"])
    assert chat(server, "extra").status_code == 200

    # Changed while a request streams from it: the stream ends on the old version, new requests get the new.
    stream = LongStream(server, "extra")
    changed = put(server, [kept, {"name": "extra", "source": str(adapters["third"])}])
    assert changed.status_code == 200
    assert settle(server)["extra"]["state"] == "Ready"
    assert served(server)["extra"] == str(adapters["third"])
    assert stream.result() == (150, "length")

    # Removed while a request streams from it: 404 for new requests at once, the stream runs to its end.
    stream = LongStream(server, "extra")
    assert put(server, [kept]).status_code == 200
    assert chat(server, "extra").status_code == 404
    assert "extra" not in served(server)
    assert stream.result() == (150, "length")
    assert set(settle(server)) == {"kept"}
    # Every retired version was unloaded once its last request finished.
    engine = server.app.state.server.generation.engine
    deadline = time.monotonic() + 10
    while set(engine._loaded.adapters) != {"kept"} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(engine._loaded.adapters) == {"kept"}
    assert chat(server, "kept").status_code == 200


def test_the_same_set_again_changes_nothing(server: RunningServer, adapters: dict[str, Path]) -> None:
    settle(server)
    engine = server.app.state.server.generation.engine
    before = dict(engine._loaded.adapters)
    for _ in range(3):
        response = put(server, [{"name": "kept", "source": str(adapters["first"])}])
        assert [item["state"] for item in response.json()["adapters"]] == ["Ready"]
    assert engine._loaded.adapters == before


def test_failing_adapters_say_why_and_the_rest_serve(
    server: RunningServer, adapters: dict[str, Path]
) -> None:
    settle(server)
    entries = [
        {"name": "kept", "source": str(adapters["first"])},
        {"name": "wrong-targets", "source": str(adapters["wrong-targets"])},
        {"name": "empty", "source": str(adapters["empty"])},
        {"name": "missing", "source": "/no/such/adapter"},
    ]
    assert put(server, entries).status_code == 200
    report = settle(server)
    assert report["kept"]["state"] == "Ready"
    assert report["wrong-targets"]["state"] == "Failed"
    assert report["wrong-targets"]["reason"].startswith("incompatible with the base model")
    assert "w_fancy_proj" in report["wrong-targets"]["reason"]
    assert report["empty"]["reason"] == f"not a LoRA adapter: no adapter_config.json in {adapters['empty']}"
    assert report["missing"]["state"] == "Failed"
    assert "/no/such/adapter" in report["missing"]["reason"]
    for name in ("wrong-targets", "empty", "missing"):
        assert chat(server, name).status_code == 404
    assert chat(server, "kept").status_code == 200
    assert chat(server, "tiny").status_code == 200


def test_rank_above_the_limit(demo: tuple[Path, Path], adapters: dict[str, Path]) -> None:
    with running_server(
        demo[0],
        served_model_name="tiny",
        enable_runtime_lora=True,
        adapters={"big": adapters["first"]},
        max_lora_rank=4,
    ) as server:
        report = httpx.get(f"{server.url}/v1/adapters").json()["adapters"]
        assert report[0]["state"] == "Failed"
        assert report[0]["reason"] == "rank 8 is above this server's limit of 4 (LLM_MAX_LORA_RANK)"
        assert (
            httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": "tiny"}).status_code == 200
        )


def test_a_hub_download_that_fails_says_so_without_the_token(
    demo: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens there: the download fails as on a node without a route to the hub.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with running_server(
        demo[0], served_model_name="tiny", enable_runtime_lora=True, download_dir=tmp_path
    ) as server:
        entry = {"name": "remote", "source": "hf://acme/remote-lora", "revision": "v1"}
        assert httpx.put(f"{server.url}/v1/adapters", json={"adapters": [entry]}).status_code == 200
        report = settle(server, timeout=60)["remote"]
        assert report["state"] == "Failed"
        assert report["reason"].startswith("download failed: hf://acme/remote-lora")
        assert "hf_secret_token_value" not in report["reason"]


def test_the_set_needs_the_api_key_and_a_valid_body(server: RunningServer, adapters: dict[str, Path]) -> None:
    url = f"{server.url}/v1/adapters"
    assert httpx.get(url).status_code == 401
    assert httpx.put(url, json={"adapters": []}).status_code == 401
    twice = [{"name": "a", "source": str(adapters["first"])}] * 2
    response = httpx.put(url, json={"adapters": twice}, headers=AUTH)
    assert response.status_code == 400 and "repeated: a" in response.json()["error"]["message"]
    relative = httpx.put(url, json={"adapters": [{"name": "a", "source": "adapters/a"}]}, headers=AUTH)
    assert relative.status_code == 400 and relative.json()["error"]["param"] == "adapters.0.source"
    base = httpx.put(url, json={"adapters": [{"name": "tiny", "source": "/x"}]}, headers=AUTH)
    assert base.status_code == 400 and base.json()["error"]["param"] == "adapters.0.name"
    revision = [{"name": "a", "source": str(adapters["first"]), "revision": "v1"}]
    assert httpx.put(url, json={"adapters": revision}, headers=AUTH).status_code == 400
    assert set(settle(server)) == {"kept"}  # nothing applied from a refused body


def _greedy_logprobs(server: RunningServer, model: str) -> list[float]:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["token_logprobs"]


@pytest.mark.parametrize("loaded_before", [False, True], ids=["first-adapter", "beside-others"])
def test_a_load_that_fails_halfway_leaves_the_model_as_it_was(
    demo: tuple[Path, Path], adapters: dict[str, Path], loaded_before: bool
) -> None:
    """peft adds an adapter's layers before its weights: when they do not fit, the layers must go again, or
    the base model (and the other adapters) would run a half-loaded adapter, and the name stay poisoned."""
    start = {"kept": adapters["first"]} if loaded_before else {}
    with running_server(
        demo[0], served_model_name="tiny", enable_runtime_lora=True, adapters=start, api_key="s3cret"
    ) as server:
        settle(server)
        models = ["tiny", *start]
        before = {model: _greedy_logprobs(server, model) for model in models}
        entries = [{"name": name, "source": str(path)} for name, path in start.items()]
        broken = [*entries, {"name": "shapes", "source": str(adapters["wrong-shapes"])}]
        broken.append({"name": "bad-rank", "source": str(adapters["bad-rank"])})
        assert put(server, broken).status_code == 200
        report = settle(server)
        assert report["shapes"]["state"] == "Failed"
        assert report["shapes"]["reason"].startswith("incompatible with the base model")
        assert report["bad-rank"]["reason"] == (
            f"adapter_config.json in {adapters['bad-rank']} has no valid rank (r, rank_pattern)"
        )
        assert {model: _greedy_logprobs(server, model) for model in models} == before
        # The name is not poisoned: the same name from a good adapter loads.
        fixed = [*entries, {"name": "shapes", "source": str(adapters["second"])}]
        assert put(server, fixed).status_code == 200
        assert settle(server)["shapes"]["state"] == "Ready"
        assert chat(server, "shapes").status_code == 200
