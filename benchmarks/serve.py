"""Runs the server for the benchmark with either engine: `python -m benchmarks.serve batching|seed`.

Settings come from LLM_* variables as for `llm-server serve`."""

import sys

import uvicorn

from benchmarks.seed_engine import build_seed_engine
from llm_server.config import ServerSettings
from llm_server.logs import configure_logging
from llm_server.main import build_engine, create_app


def main() -> None:
    settings = ServerSettings()
    configure_logging("plain", "warning")
    factory = build_seed_engine if sys.argv[1] == "seed" else build_engine
    app = create_app(settings, engine_factory=factory)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
