"""Bearer API key on every non-health endpoint, compared in constant time."""

import hmac

from fastapi import Request

from llm_server.api.errors import APIError


async def require_api_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, supplied = header.partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(
        supplied.strip().encode(), expected.get_secret_value().encode()
    )
    if not valid:
        raise APIError(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
