"""What routes get injected: the engine once the model is ready, and the generation or pooling service
when the model serves the route's task (404 naming what it serves otherwise, as vLLM registers only the
routes of the model's tasks)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, get_args

from fastapi import Depends, Request

from llm_server.api.errors import APIError
from llm_server.api.generation import Generation
from llm_server.api.pooling import Pooling
from llm_server.engine.interface import ServingEngine, Task

if TYPE_CHECKING:
    from llm_server.main import ServerState

TASK_ROUTES: dict[Task, tuple[str, ...]] = {
    "generate": ("/v1/chat/completions", "/v1/completions", "/chat", "/generate", "/batch"),
    "embed": ("/v1/embeddings", "/embeddings"),
    "classify": ("/classify", "/predict"),
    "score": ("/score", "/v1/score", "/rerank", "/v1/rerank"),
}


def _serving(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    if state.phase == "loading":
        raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})
    if state.engine is None:
        raise APIError(503, f"the server is {state.phase}")
    return state


# The dependencies are coroutines: FastAPI runs a plain function's in its thread pool, a hop per request.
async def get_engine(request: Request) -> ServingEngine:
    return _serving(request).engine


def _not_served(request: Request, engine: ServingEngine, task: Task) -> APIError:
    routes = [route for served in get_args(Task) if served in engine.tasks for route in TASK_ROUTES[served]]
    return APIError(
        404,
        f"The model `{engine.base_model}` is served for {engine.task} ({', '.join(routes)}): "
        f"{request.url.path} needs a model served for {task}.",
    )


async def get_generation(request: Request) -> Generation:
    state = _serving(request)
    if state.generation is None:
        raise _not_served(request, state.engine, "generate")
    return state.generation


def pooling_for(task: Task) -> Callable[[Request], Awaitable[Pooling]]:
    async def get_pooling(request: Request) -> Pooling:
        state = _serving(request)
        if state.pooling is None or task not in state.engine.tasks:
            raise _not_served(request, state.engine, task)
        return state.pooling

    return get_pooling


EngineDep = Annotated[ServingEngine, Depends(get_engine)]
GenerationDep = Annotated[Generation, Depends(get_generation)]
EmbedDep = Annotated[Pooling, Depends(pooling_for("embed"))]
ClassifyDep = Annotated[Pooling, Depends(pooling_for("classify"))]
ScoreDep = Annotated[Pooling, Depends(pooling_for("score"))]
