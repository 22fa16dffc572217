"""A tiny model and adapter built on disk once per session, and a server over them per module."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_server.demo_model import build_demo_model
from tests.inference.harness import RunningServer, running_server


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def server(demo: tuple[Path, Path]) -> Iterator[RunningServer]:
    model, adapter = demo
    with running_server(
        model, adapters={"support": adapter}, served_model_name="tiny", max_queued_requests=64
    ) as running:
        yield running
