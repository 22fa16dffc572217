"""The set of adapters to serve, declared whole (PUT) and reported with each one's state (GET).

The operator PUTs an LLMService's spec.adapters to every ready pod and reads the states back for the
LLMService's status; the same set again is a no-op, so it can repeat it as often as it likes.
Registered with vLLM's load/unload endpoints, when LLM_ENABLE_RUNTIME_LORA is true.
"""

from fastapi import APIRouter, Depends, Request

from llm_server.adapters import AdapterManager
from llm_server.api.auth import require_api_key
from llm_server.api.dependencies import GenerationDep
from llm_server.api.errors import APIError
from llm_server.api.schemas import AdapterSetRequest, AdapterSetResponse, error_responses
from llm_server.config import AdapterSource

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key)],
    tags=["lora"],
    responses=error_responses(400, 401, 404, 503),
)


def _manager(request: Request) -> AdapterManager:
    manager: AdapterManager | None = request.app.state.server.adapters
    if manager is None:
        raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})
    return manager


@router.get("/adapters", response_model=AdapterSetResponse)
async def list_adapters(request: Request, generation: GenerationDep) -> AdapterSetResponse:
    return AdapterSetResponse.model_validate({"adapters": _manager(request).report()})


@router.put("/adapters", response_model=AdapterSetResponse)
async def set_adapters(
    body: AdapterSetRequest, request: Request, generation: GenerationDep
) -> AdapterSetResponse:
    for index, adapter in enumerate(body.adapters):
        if adapter.name == generation.engine.base_model:
            raise APIError(400, f"{adapter.name!r} is the base model's name", param=f"adapters.{index}.name")
    manager = _manager(request)
    await manager.apply(
        {
            adapter.name: AdapterSource(source=adapter.source, revision=adapter.revision)
            for adapter in body.adapters
        }
    )
    return AdapterSetResponse.model_validate({"adapters": manager.report()})
