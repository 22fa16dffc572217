"""One error shape for every failure (vLLM's): {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_server.engine.interface import (
    AdapterError,
    ContextTooLong,
    InvalidInput,
    MessagesRejected,
    QueueFull,
    UnknownModel,
)

RETRY_AFTER_SECONDS = 1
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


class BodyTooLarge(StarletteHTTPException):
    """An HTTP exception, so that FastAPI's body reading passes it on (any other error there becomes its
    400 "error parsing the body"): a chunked body over the limit is a 413 like a declared one."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def from_engine_error(error: Exception) -> APIError:
    if isinstance(error, QueueFull):
        return APIError(429, str(error), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(error, ContextTooLong | MessagesRejected):
        return APIError(400, str(error), param="messages")
    if isinstance(error, InvalidInput):
        return APIError(400, str(error), param="input")
    if isinstance(error, UnknownModel):
        return APIError(404, str(error), param="model")
    if isinstance(error, AdapterError):
        return APIError(400, str(error), param="lora_name")
    raise error


def _is_field(part: object) -> bool:
    """A location part that names a field or an index, not one of pydantic's union branches (`str`,
    `list[int]`, `function-after[...]`), which no client would recognize."""
    return isinstance(part, int) or (str(part).isidentifier() and str(part) not in _BRANCHES)


_BRANCHES = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """Every problem with its field path (pydantic's union branches left out); `param` is the first's."""
    problems = []
    first_param = None
    for item in error.errors():
        location = [str(part) for part in item.get("loc", ()) if part != "body" and _is_field(part)]
        path = ".".join(location) or None
        first_param = first_param or path
        problems.append(f"{path}: {item.get('msg')}" if path else str(item.get("msg")))
    return "; ".join(dict.fromkeys(problems)) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))
