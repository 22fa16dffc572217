"""`llm-server download`: put a model or adapter into a local directory for the server (init containers)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from huggingface_hub.utils import tqdm as hf_tqdm

logger = logging.getLogger(__name__)
PROGRESS_INTERVAL_SECONDS = 10.0


_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def hub_dir(root: Path, repo: str, revision: str | None) -> Path:
    """Where hf://repo at `revision` goes under `root`, one directory per repo and revision (the operator
    names the model's the same way, so a cache claim shared by several services stays coherent)."""
    safe_repo = _UNSAFE_PATH_CHARS.sub("-", repo.replace("/", "--"))
    return root / safe_repo / _UNSAFE_PATH_CHARS.sub("-", revision or "main")


class DownloadError(Exception):
    """A failure a person can act on; the message says what and how."""


def parse_source(source: str) -> tuple[str, str]:
    """(scheme, location) for hf://org/repo, file:///path or an absolute path already mounted."""
    if source.startswith("hf://"):
        repo = source.removeprefix("hf://").strip("/")
        if not repo or repo.count("/") > 1 or any(not part for part in repo.split("/")):
            raise DownloadError(f"{source!r}: expected hf://org/repo or hf://repo")
        return "hf", repo
    if source.startswith("file://"):
        path = source.removeprefix("file://")
        if not path.startswith("/"):
            raise DownloadError(f"{source!r}: file:// takes an absolute path, e.g. file:///models/llama")
        return "file", path
    if source.startswith("/"):
        return "file", source
    scheme = source.split("://", 1)[0] if "://" in source else None
    hint = f"unsupported scheme {scheme!r}" if scheme else "not a URI"
    raise DownloadError(f"{source!r}: {hint}; use hf://org/repo, file:///path or an absolute path")


def download(source: str, dest: Path, revision: str | None = None) -> Path:
    scheme, location = parse_source(source)
    started = time.monotonic()
    result = _copy_local(Path(location), dest) if scheme == "file" else _from_hub(location, dest, revision)
    size = sum(path.stat().st_size for path in result.rglob("*") if path.is_file())
    logger.info(
        "download complete",
        extra={
            "source": source,
            "dest": str(result),
            "bytes": size,
            "seconds": round(time.monotonic() - started, 1),
        },
    )
    return result


def _copy_local(source: Path, dest: Path) -> Path:
    if not source.is_dir():
        raise DownloadError(f"{source} does not exist or is not a directory")
    if source.resolve() == dest.resolve():
        return dest
    logger.info("copying", extra={"source": str(source), "dest": str(dest)})
    shutil.copytree(source, dest, dirs_exist_ok=True)
    return dest


def _from_hub(repo: str, dest: Path, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = os.environ.get("HF_TOKEN") or None
    logger.info(
        "downloading from the hub",
        extra={
            "repo": repo,
            "revision": revision or "main",
            "dest": str(dest),
            "authenticated": token is not None,
        },
    )
    try:
        # Files already in dest are kept and checked, so a restarted init container resumes.
        path = snapshot_download(
            repo_id=repo, revision=revision, local_dir=dest, token=token, tqdm_class=_LoggingProgress
        )
    except GatedRepoError:
        raise DownloadError(
            f"hf://{repo} is gated: accept its terms on the hub and set a token with access "
            "(spec.hfTokenSecretRef)"
        ) from None
    except RepositoryNotFoundError:
        auth = "" if token else " (no token was given: private repos need spec.hfTokenSecretRef)"
        raise DownloadError(f"hf://{repo} was not found or is not accessible{auth}") from None
    except RevisionNotFoundError:
        raise DownloadError(f"hf://{repo} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise DownloadError(
            f"hf://{repo}: the hub could not be reached and {dest} holds no complete copy"
        ) from None
    except HfHubHTTPError as error:
        raise DownloadError(f"hf://{repo}: the hub answered {error}") from None
    return Path(path)


class _LoggingProgress(hf_tqdm):
    """huggingface_hub's own progress bar, reporting to the log every few seconds instead of drawing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["mininterval"] = PROGRESS_INTERVAL_SECONDS
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        logger.info("progress", extra={"what": self.desc, "done": self.n, "total": self.total})
        return True
