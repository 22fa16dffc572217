"""vLLM's runtime adapter endpoints; registered only when LLM_ENABLE_RUNTIME_LORA is true."""

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from llm_server.api.auth import require_api_key
from llm_server.api.dependencies import GenerationDep
from llm_server.api.errors import APIError, from_engine_error
from llm_server.api.schemas import LoadLoraRequest, UnloadLoraRequest, error_responses
from llm_server.engine.interface import EngineError

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key)],
    tags=["lora"],
    responses=error_responses(400, 401, 404, 503),
)


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraRequest, generation: GenerationDep) -> str:
    if body.lora_name == generation.engine.base_model:
        raise APIError(400, f"{body.lora_name!r} is the base model's name", param="lora_name")
    try:
        await generation.engine.load_adapter(body.lora_name, body.lora_path)
    except EngineError as error:
        raise from_engine_error(error) from None
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraRequest, generation: GenerationDep) -> str:
    names = {card.name for card in generation.engine.models() if card.parent}
    if body.lora_name not in names:
        raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name")
    try:
        await generation.engine.unload_adapter(body.lora_name)
    except EngineError as error:
        raise from_engine_error(error) from None
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
