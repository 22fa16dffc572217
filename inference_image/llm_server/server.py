"""Run the app under uvicorn with a Kubernetes-friendly shutdown.

SIGTERM: readiness turns 503 at once (so endpoints stop sending traffic), the listener stays open for
LLM_DRAIN_SECONDS, then uvicorn stops accepting and gives in-flight requests LLM_SHUTDOWN_TIMEOUT to finish.
A second signal exits at once.
"""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn
from sse_starlette.sse import AppStatus

from llm_server.config import ServerSettings
from llm_server.logs import configure_logging
from llm_server.main import ServerState, create_app

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, settings: ServerSettings, state: ServerState) -> None:
        super().__init__(config)
        self._settings, self._state = settings, state
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._state
        if self._draining or state.phase != "ready" or self._settings.drain_seconds == 0:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        state.phase = "draining"
        logger.info("draining: readiness is 503", extra={"drain_seconds": self._settings.drain_seconds})
        timer = threading.Timer(self._settings.drain_seconds, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()


def serve(settings: ServerSettings) -> int:
    """Blocks until the server stops; the exit status (1 when the model or an adapter failed to load)."""
    configure_logging(settings.log_format, settings.log_level)
    failures: list[str] = []
    server: DrainingServer | None = None

    def on_fatal(message: str) -> None:
        failures.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
        access_log=False,
    )
    server = DrainingServer(config, settings, app.state.server)
    # sse-starlette ends every open stream the moment uvicorn starts shutting down; in-flight streams are
    # to finish like any other request, within timeout_graceful_shutdown (uvicorn cancels what is left).
    AppStatus.disable_automatic_graceful_drain()
    server.run()
    return 1 if failures else 0
