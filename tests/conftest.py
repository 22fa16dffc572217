"""Shared fixtures: the repository root and the example manifests."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def crd() -> dict:
    return yaml.safe_load((ROOT / "crds" / "serving.llmservice.io_llmservices.yaml").read_text())


@pytest.fixture()
def example() -> dict:
    return yaml.safe_load((ROOT / "examples" / "support-bot.yaml").read_text())
