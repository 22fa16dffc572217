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


# Reliability figures: tests record what they tried and measured; the run prints them at the end, so
# docs/reliability.md can be checked against any `make test` output.
_FIGURES: list[tuple[str, str]] = []


@pytest.fixture()
def figure(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    def record(text: str) -> None:
        _FIGURES.append((request.node.nodeid.split("::")[-1], text))

    return record


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if _FIGURES:
        terminalreporter.section("reliability figures")
        for test, text in _FIGURES:
            terminalreporter.write_line(f"{test}: {text}")
