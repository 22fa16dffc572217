"""The set of LoRA adapters a server should serve, reconciled in the background.

Whoever owns the set (the settings at start-up, then the operator through PUT /v1/adapters) says which
adapters, from where; this module downloads, loads, replaces and removes them one at a time and reports
each one's state. A changed adapter keeps serving its old version until the new one is loaded; a removed
one answers 404 at once while the requests admitted before finish (the engine keeps the version they
use). One adapter that fails is reported with its reason and never affects the base model or the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from llm_server.config import AdapterSource
from llm_server.download import hub_dir
from llm_server.engine.interface import AdapterError, Engine

logger = logging.getLogger(__name__)
State = Literal["Pending", "Loading", "Ready", "Failed"]
RETRY_SECONDS = 30.0  # after a failure, doubling up to MAX_RETRY_SECONDS: a download may come right
MAX_RETRY_SECONDS = 300.0
DOWNLOAD_TIMEOUT_SECONDS = 3600.0
# peft's own words for an adapter trained on another architecture, turned into what to check.
INCOMPATIBLE_HINTS = ("not found in the base model", "size mismatch", "Error(s) in loading state_dict")

Fetch = Callable[[AdapterSource, Path], Awaitable[Path]]


class AdapterFailed(Exception):
    """Why an adapter cannot be served, in words a person can act on."""


@dataclasses.dataclass
class _Record:
    wanted: AdapterSource
    state: State = "Pending"
    reason: str | None = None
    loaded: AdapterSource | None = None  # the version the engine serves under this name, if any
    failures: int = 0
    retry_at: float = 0.0
    retrying: bool = False  # a failed one tried again: it stays Failed, with its reason, until it loads


async def fetch_adapter(source: AdapterSource, download_dir: Path) -> Path:
    """The local directory of `source`; hf:// repos are downloaded by `llm-server download` in a child
    process (the server itself runs with HF_HUB_OFFLINE, and a download must not hold the event loop)."""
    if not source.source.startswith("hf://"):
        return Path(source.source.removeprefix("file://"))
    repo = source.source.removeprefix("hf://")
    dest = hub_dir(download_dir, repo, source.revision)
    args = [
        sys.executable,
        "-m",
        "llm_server.cli",
        "download",
        "--source",
        source.source,
        "--dest",
        str(dest),
    ]
    if source.revision:
        args += ["--revision", source.revision]
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    process = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), DOWNLOAD_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        raise AdapterFailed(f"download failed: not done after {DOWNLOAD_TIMEOUT_SECONDS:.0f} s") from None
    except asyncio.CancelledError:
        process.kill()
        raise
    if process.returncode != 0:
        # click prints "Error: <the DownloadError's message>" as the last line; the rest is the JSON log.
        lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        last = lines[-1].removeprefix("Error: ") if lines else f"exit status {process.returncode}"
        raise AdapterFailed(f"download failed: {last}")
    return dest


def check_rank(path: Path, max_rank: int) -> None:
    config_file = path / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise AdapterFailed(f"not a LoRA adapter: no adapter_config.json in {path}") from None
    except (OSError, ValueError) as error:
        raise AdapterFailed(f"unreadable adapter_config.json in {path}: {error}") from None
    try:
        ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
        rank = max(int(value) for value in ranks)
    except (AttributeError, TypeError, ValueError):
        raise AdapterFailed(f"adapter_config.json in {path} has no valid rank (r, rank_pattern)") from None
    if rank > max_rank:
        raise AdapterFailed(f"rank {rank} is above this server's limit of {max_rank} (LLM_MAX_LORA_RANK)")


def describe_load_error(error: AdapterError) -> str:
    message = str(error)
    if any(hint in message for hint in INCOMPATIBLE_HINTS):
        return f"incompatible with the base model: {message}"
    return message


class AdapterManager:
    def __init__(
        self, engine: Engine, download_dir: Path, max_rank: int, fetch: Fetch = fetch_adapter
    ) -> None:
        self._engine = engine
        self._download_dir = download_dir
        self._max_rank = max_rank
        self._fetch = fetch
        self._records: dict[str, _Record] = {}
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="adapters")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def apply(self, desired: dict[str, AdapterSource]) -> None:
        """Makes `desired` the set to serve (idempotent: the same set again changes nothing, except that
        a failed adapter is tried again once its back-off has passed)."""
        for name in [name for name in self._records if name not in desired]:
            record = self._records.pop(name)
            if record.loaded is not None:
                await self._unload(name)
        now = time.monotonic()
        for name, source in desired.items():
            record = self._records.get(name)
            if record is None:
                self._records[name] = _Record(source)
            elif record.wanted != source:
                record.wanted, record.state, record.reason, record.failures = source, "Pending", None, 0
                record.retrying = False
            elif record.state == "Failed" and now >= record.retry_at:
                record.state, record.retrying = "Pending", True
        if any(record.state == "Pending" for record in self._records.values()):
            self._idle.clear()
            self._work.set()

    def report(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "source": record.wanted.source,
                "revision": record.wanted.revision,
                "state": "Failed" if record.retrying else record.state,
                "reason": record.reason,
            }
            for name, record in sorted(self._records.items())
        ]

    async def settled(self) -> None:
        """Returns once every adapter is Ready or Failed."""
        await self._idle.wait()

    async def _unload(self, name: str) -> None:
        with contextlib.suppress(AdapterError):  # already gone (e.g. through vLLM's unload endpoint)
            await self._engine.unload_adapter(name)

    async def _run(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while (name := self._next_pending()) is not None:
                await self._load(name, self._records[name])
            self._idle.set()

    def _next_pending(self) -> str | None:
        return next((name for name, record in self._records.items() if record.state == "Pending"), None)

    async def _load(self, name: str, record: _Record) -> None:
        source = record.wanted
        record.state = "Loading"
        if not record.retrying:
            record.reason = None
        logger.info("loading adapter", extra={"adapter": name, "source": source.source})
        try:
            path = await self._fetch(source, self._download_dir)
            check_rank(path, self._max_rank)
            await self._engine.replace_adapter(name, str(path))
        except AdapterFailed as error:
            reason = str(error)
        except AdapterError as error:
            reason = describe_load_error(error)
        except Exception as error:  # whatever it is, this adapter failed and the next ones still load
            logger.exception("loading an adapter failed", extra={"adapter": name})
            reason = f"failed to load: {type(error).__name__}: {error}"
        else:
            reason = None
        if self._records.get(name) is not record:  # removed while it loaded
            if reason is None:
                await self._unload(name)
            return
        record.retrying = False
        if reason is None:
            record.loaded = source
            if record.wanted == source:
                record.state, record.failures, record.reason = "Ready", 0, None
                logger.info("adapter ready", extra={"adapter": name, "source": source.source})
            else:
                record.state = "Pending"  # changed again while it loaded
            return
        if record.wanted != source:
            record.state = "Pending"
            return
        record.failures += 1
        record.state, record.reason = "Failed", reason
        record.retry_at = time.monotonic() + min(
            MAX_RETRY_SECONDS, RETRY_SECONDS * 2 ** (record.failures - 1)
        )
        logger.error("adapter failed", extra={"adapter": name, "source": source.source, "reason": reason})
