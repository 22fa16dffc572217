"""Probes, metrics and the version: open without an API key (vLLM's /ping and /version are open too)."""

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])
NOT_READY = {503: {"description": "loading or draining"}}


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


# /ping is vLLM's (and SageMaker's) probe, GET or POST. vLLM answers it only once the model is loaded, so
# it is readiness here: 503 while loading or draining.
@router.get("/health/ready", responses=NOT_READY)
@router.get("/ping", responses=NOT_READY)
@router.post("/ping", responses=NOT_READY)
async def ready(request: Request) -> JSONResponse:
    phase = request.app.state.server.phase
    return JSONResponse({"status": phase}, status_code=200 if phase == "ready" else 503)


@router.get("/version")
async def version(request: Request) -> dict[str, str]:
    return {"version": request.app.version}


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
