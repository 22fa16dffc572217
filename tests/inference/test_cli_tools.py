"""`llm-server download` and `llm-server demo-model` as the init container and `make demo` run them."""

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_server.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, **env},
    )


def test_demo_model_writes_a_loadable_model_and_adapter(tmp_path: Path) -> None:
    result = cli("demo-model", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)
    assert (Path(paths["model"]) / "config.json").exists()
    assert (Path(paths["model"]) / "tokenizer.json").exists()
    assert (Path(paths["adapter"]) / "adapter_config.json").exists()


def test_download_copies_a_file_source(demo: tuple[Path, Path], tmp_path: Path) -> None:
    dest = tmp_path / "model"
    result = cli("download", "--source", f"file://{demo[0]}", "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in dest.iterdir()) == sorted(path.name for path in demo[0].iterdir())
    assert "download complete" in result.stderr


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("s3://bucket/model", "unsupported scheme 's3'"),
        ("hf://", "expected hf://org/repo"),
        ("hf://a/b/c", "expected hf://org/repo"),
        ("file://relative/path", "absolute path"),
        ("models/llama", "not a URI"),
        ("file:///does/not/exist", "/does/not/exist does not exist"),
    ],
)
def test_download_rejects_bad_sources_clearly(source: str, message: str, tmp_path: Path) -> None:
    result = cli("download", "--source", source, "--dest", str(tmp_path / "x"))
    assert result.returncode == 1
    assert message in result.stderr


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers as the Hugging Face Hub does for a missing repo, a gated repo and a missing revision."""

    def do_GET(self) -> None:
        if "/private-" in self.path:
            self._error(401, "RepoNotFound")
        elif "/gated-" in self.path:
            self._error(403, "GatedRepo")
        elif "/revision/" in self.path and "nonexistent" in self.path:
            self._error(404, "RevisionNotFound")
        else:
            self._error(404, "RepoNotFound")

    do_HEAD = do_GET

    def _error(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(json.dumps({"error": code}).encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fake_hub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    ("repo", "message"),
    [
        ("acme/private-model", "was not found or is not accessible (no token was given"),
        ("acme/gated-model", "is gated: accept its terms"),
    ],
)
def test_download_explains_hub_errors(fake_hub: str, tmp_path: Path, repo: str, message: str) -> None:
    result = cli(
        "download",
        "--source",
        f"hf://{repo}",
        "--dest",
        str(tmp_path / "m"),
        HF_ENDPOINT=fake_hub,
        HF_HUB_OFFLINE="0",
        HF_HUB_ETAG_TIMEOUT="2",
    )
    assert result.returncode == 1, result.stderr
    assert message in result.stderr


def test_download_offline_says_the_hub_is_unreachable(tmp_path: Path) -> None:
    result = cli("download", "--source", "hf://acme/model", "--dest", str(tmp_path / "m"), HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert "could not be reached" in result.stderr


def test_serve_rejects_bad_settings() -> None:
    result = cli("serve", "--model", "/m", "--adapter", "no-equals-sign")
    assert result.returncode == 2
    assert "expected NAME=DIR" in result.stderr
    result = cli("serve", "--model", "/m", "--port", "8000", LLM_MAX_BATCH_SIZE="0")
    assert result.returncode == 1
    assert "max_batch_size" in result.stderr
