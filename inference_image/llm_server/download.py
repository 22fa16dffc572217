"""`llm-server download`: put a model or adapter into a local directory for the server (init containers)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)


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
            f"hf://{repo}: the hub could not be reached and nothing is cached in {dest}"
        ) from None
    except HfHubHTTPError as error:
        raise DownloadError(f"hf://{repo}: the hub answered {error}") from None
    return Path(path)


class _LoggingProgress:
    """A tqdm stand-in that logs each file's progress every 10% instead of drawing bars."""

    def __init__(
        self, *args: object, total: float | None = None, desc: str | None = None, **kwargs: object
    ) -> None:
        self.total, self.desc, self.n, self._logged = total, desc or "download", 0.0, -10

    def update(self, amount: float = 1) -> None:
        self.n += amount
        if self.total:
            percent = int(self.n * 100 / self.total)
            if percent >= self._logged + 10:
                self._logged = percent - percent % 10
                logger.info("progress", extra={"what": self.desc, "percent": self._logged})

    def __enter__(self) -> _LoggingProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(())
