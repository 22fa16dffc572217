"""Server-sent events for a generation, closed on every path out (end, error, client gone)."""

from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from llm_server.api.generation import ObservedStream

PING_SECONDS = 15


class GenerationEvents(EventSourceResponse):
    """Whatever ends the response also cancels the generation: the stream's end, an error, or a client
    that leaves at any point (sse-starlette may then leave the event generator suspended or raise, so
    the release happens around the whole response, not inside the generator)."""

    def __init__(self, events: AsyncIterator[dict[str, str]], deltas: ObservedStream) -> None:
        super().__init__(events, ping=PING_SECONDS)
        self._deltas = deltas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._deltas.aclose()


def event_stream(events: AsyncIterator[dict[str, str]], deltas: ObservedStream) -> EventSourceResponse:
    return GenerationEvents(events, deltas)
