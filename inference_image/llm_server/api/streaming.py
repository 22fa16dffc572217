"""Server-sent events for a generation, closed on every path out (end, error, client gone)."""

from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from llm_server.api.generation import ObservedStream

PING_SECONDS = 15


def event_stream(events: AsyncIterator[dict[str, str]], deltas: ObservedStream) -> EventSourceResponse:
    """`events` are built from `deltas`; whatever ends the response also cancels the generation, even a
    client that leaves before the first event (then `events` never ran and only the background task does)."""

    async def guarded() -> AsyncIterator[dict[str, str]]:
        try:
            async for event in events:
                yield event
        finally:
            await deltas.aclose()

    return EventSourceResponse(guarded(), ping=PING_SECONDS, background=BackgroundTask(deltas.aclose))
