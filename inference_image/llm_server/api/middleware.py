"""Pure ASGI middleware (it never buffers a stream): request ids, access logs, HTTP metrics, body limit."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_server.api.errors import BodyTooLarge, error_body
from llm_server.api.metrics import ServerMetrics
from llm_server.logs import request_id

logger = logging.getLogger("llm_server.access")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
QUIET_PATHS = {"/health/live", "/health/ready", "/ping", "/metrics"}


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode().lower(): value.decode() for key, value in scope.get("headers", [])}
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        token = request_id.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            length = int(headers.get("content-length") or 0)
            if length > self.max_body_bytes:
                await _reject(
                    send_with_id, 413, f"request body of {length} bytes exceeds {self.max_body_bytes}"
                )
            else:
                await self.app(scope, _limited(receive, self.max_body_bytes), send_with_id)
        except Exception:
            # The one place unexpected errors end: logged with their traceback, answered without it.
            logger.exception("unhandled error")
            if "started" not in status:
                await _reject(send_with_id, 500, f"internal server error (request id {rid})")
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"  # bounded label values
            self.metrics.http_requests.labels(method, path, str(status["code"])).inc()
            if scope["path"] not in QUIET_PATHS:
                logger.info(
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    status["code"],
                    extra={
                        "status": status["code"],
                        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    },
                )
            request_id.reset(token)


def _limited(receive: Receive, limit: int) -> Receive:
    """Also bound bodies sent without a Content-Length (chunked)."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped


async def _reject(send: Any, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
