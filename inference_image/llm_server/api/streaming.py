"""Server-sent events for a generation, closed on every path out (end, error, client gone)."""

import json
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from llm_server.api.generation import ObservedStream, StreamGroup

# vLLM's framing: `data: <json>\n\n` per event, nothing else. sse-starlette's defaults (\r\n line ends, a
# `: ping` comment every 15 s) trip clients that split events on "\n\n" or take every line for data;
# ping=0 starts no ping task, however long the stream.
SEPARATOR, NO_PING = "\n", 0
# Valid inside JSON strings and not SSE line ends, but line ends to str.splitlines and so to clients
# that split lines that way (httpx's aiter_lines does): a generated NEL or U+2028 would cut the event.
_LINE_ENDS_TO_SOME = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def event_json(payload: Any) -> str:
    """An event's data: JSON with text kept as UTF-8, minus the characters some clients split lines on."""
    text = json.dumps(payload, ensure_ascii=False)
    for raw, escaped in _LINE_ENDS_TO_SOME.items():
        text = text.replace(raw, escaped)
    return text


class GenerationEvents(EventSourceResponse):
    """Whatever ends the response also cancels the generation: the stream's end, an error, or a client
    that leaves at any point (sse-starlette may then leave the event generator suspended or raise, so
    the release happens around the whole response, not inside the generator)."""

    def __init__(self, events: AsyncIterator[dict[str, str]], deltas: ObservedStream | StreamGroup) -> None:
        super().__init__(events, ping=NO_PING, sep=SEPARATOR)
        self._deltas = deltas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._deltas.aclose()


def event_stream(
    events: AsyncIterator[dict[str, str]], deltas: ObservedStream | StreamGroup
) -> EventSourceResponse:
    return GenerationEvents(events, deltas)
