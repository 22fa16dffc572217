"""What routes get injected: the generation service once the model is ready, and the settings."""

from typing import Annotated

from fastapi import Depends, Request

from llm_server.api.errors import APIError
from llm_server.api.generation import Generation


def get_generation(request: Request) -> Generation:
    state = request.app.state.server
    if state.phase == "loading":
        raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})
    if state.phase != "ready" and state.generation is None:
        raise APIError(503, f"the server is {state.phase}")
    return state.generation


GenerationDep = Annotated[Generation, Depends(get_generation)]
