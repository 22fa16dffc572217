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


COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the Hugging Face Hub on loopback: serves one public repo (acme/tiny, the demo
    model's files) and answers as the hub does for a private repo and a gated one."""

    files: Path  # set by the fixture

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if "/private-" in path:
            self._error(401, "RepoNotFound")
        elif "/gated-" in path:
            self._error(403, "GatedRepo")
        elif path.startswith("/api/models/acme/tiny/revision/"):
            siblings = [{"rfilename": file.name} for file in sorted(self.files.iterdir())]
            self._send(
                200,
                json.dumps({"id": "acme/tiny", "sha": COMMIT, "siblings": siblings}).encode(),
                "application/json",
            )
        elif path.startswith("/api/models/acme/tiny/tree/"):
            entries = [
                {
                    "type": "file",
                    "path": file.name,
                    "size": file.stat().st_size,
                    "oid": str(abs(hash(file.name))),
                }
                for file in sorted(self.files.iterdir())
            ]
            self._send(200, json.dumps(entries).encode(), "application/json")
        elif path.startswith("/acme/tiny/resolve/"):
            file = self.files / path.rsplit("/", 1)[1]
            if not file.is_file():
                self._error(404, "EntryNotFound")
            else:
                self._send(
                    200,
                    file.read_bytes(),
                    "application/octet-stream",
                    {"X-Repo-Commit": COMMIT, "ETag": f'"{abs(hash(file.name))}"'},
                )
        else:
            self._error(404, "RepoNotFound")

    do_HEAD = do_GET

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        self._send(
            status,
            json.dumps({"error": code}).encode(),
            "application/json",
            {"X-Error-Code": code, "X-Error-Message": code},
        )

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fake_hub(demo: tuple[Path, Path]) -> Iterator[str]:
    handler = type("DemoHub", (FakeHub,), {"files": demo[0]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
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


def test_download_from_the_hub_and_again(fake_hub: str, demo: tuple[Path, Path], tmp_path: Path) -> None:
    dest = tmp_path / "m"
    for _ in range(2):  # the second run finds the files in place (a restarted init container)
        result = cli(
            "download",
            "--source",
            "hf://acme/tiny",
            "--revision",
            "main",
            "--dest",
            str(dest),
            HF_ENDPOINT=fake_hub,
            HF_HUB_OFFLINE="0",
            HF_TOKEN="hf_canary_token",
        )
        assert result.returncode == 0, result.stderr
    for file in demo[0].iterdir():
        assert (dest / file.name).read_bytes() == file.read_bytes()
    assert "download complete" in result.stderr
    assert "hf_canary_token" not in result.stderr


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
