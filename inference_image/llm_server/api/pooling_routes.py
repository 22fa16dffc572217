"""Embeddings, classification and scoring: OpenAI's /v1/embeddings; vLLM's /classify, /score and /rerank
(Jina's shape; each also under /v1); the seed services' /predict and /embeddings. A route of a task the
model does not serve answers 404 naming what it serves (dependencies.py)."""

from __future__ import annotations

import base64
import sys
import time
import uuid
from array import array
from collections.abc import Sequence
from typing import Annotated, Any

import pydantic_core
from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse

from llm_server.api.auth import require_api_key
from llm_server.api.dependencies import ClassifyDep, EmbedDep, ScoreDep
from llm_server.api.errors import APIError
from llm_server.api.pooling import Pooling, prompt_tokens
from llm_server.api.schemas import (
    MAX_INPUTS,
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingUsage,
    PredictRequest,
    PredictResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    SeedEmbeddingsResponse,
    Text,
    error_responses,
)

router = APIRouter(
    dependencies=[Depends(require_api_key)], responses=error_responses(400, 401, 404, 413, 429, 500, 503, 504)
)


class VectorsResponse(JSONResponse):
    """JSON rendered by pydantic-core (Rust). The standard library's encoder spent ~0.2 ms per 384 floats
    holding the GIL that the forwards' threads wait for: 32 clients got 143 embeddings/s with it, 163
    without."""

    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content)


def _model(pooling: Pooling, requested: str | None) -> str:
    return requested or pooling.engine.base_model


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding_format: the float32 values, little-endian."""
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _best(probabilities: Sequence[float]) -> int:
    return max(range(len(probabilities)), key=probabilities.__getitem__)


@router.post(
    "/v1/embeddings", tags=["openai"], response_model=None, responses={200: {"model": EmbeddingResponse}}
)
async def create_embeddings(body: EmbeddingRequest, request: Request, pooling: EmbedDep) -> VectorsResponse:
    inputs = await pooling.encode(
        body.model, body.input, body.truncate_prompt_tokens, body.add_special_tokens
    )
    pooling.check_dimensions(body.dimensions)
    vectors = await pooling.run("embed", inputs, request, body.dimensions)
    as_base64 = body.encoding_format == "base64"
    # Straight to JSON: FastAPI's encoder would visit each of the floats in Python.
    return VectorsResponse(
        {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": body.model,
            "data": [
                {"index": index, "object": "embedding", "embedding": _base64(vector) if as_base64 else vector}
                for index, vector in enumerate(vectors)
            ],
            "usage": PoolingUsage.of(prompt_tokens(inputs)).model_dump(),
        }
    )


@router.post(
    "/embeddings", tags=["simple"], response_model=None, responses={200: {"model": SeedEmbeddingsResponse}}
)
async def seed_embeddings(
    texts: Annotated[list[Text], Body(min_length=1, max_length=MAX_INPUTS)],
    request: Request,
    pooling: EmbedDep,
) -> VectorsResponse:
    """The seed services' embeddings route: a list of texts in, {"embeddings": [...]} out."""
    inputs = await pooling.encode(pooling.engine.base_model, texts, None)
    return VectorsResponse({"embeddings": await pooling.run("embed", inputs, request)})


@router.post("/classify", tags=["pooling"], response_model=ClassificationResponse)
async def classify(
    body: ClassificationRequest, request: Request, pooling: ClassifyDep
) -> ClassificationResponse:
    model = _model(pooling, body.model)
    inputs = await pooling.encode(model, body.input, body.truncate_prompt_tokens, body.add_special_tokens)
    results = await pooling.run("classify", inputs, request)
    labels = pooling.engine.info.labels
    return ClassificationResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        data=[
            ClassificationData(index=index, label=labels[_best(probs)], probs=probs, num_classes=len(probs))
            for index, probs in enumerate(results)
        ],
        usage=PoolingUsage.of(prompt_tokens(inputs)),
    )


@router.post("/predict", tags=["simple"], response_model=PredictResponse)
async def predict(body: PredictRequest, request: Request, pooling: ClassifyDep) -> PredictResponse:
    """The seed services' classifier: the most likely label and its probability."""
    inputs = await pooling.encode(pooling.engine.base_model, body.text, None)
    (probs,) = await pooling.run("classify", inputs, request)
    labels = pooling.engine.info.labels
    best = _best(probs)
    return PredictResponse(
        text=body.text,
        label=labels[best],
        sentiment=labels[best],
        confidence=probs[best],
        prediction=best,
        probabilities=dict(zip(labels, probs, strict=True)) if body.return_probabilities else None,
    )


def _pairs(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[str, str]]:
    firsts = [text_1] if isinstance(text_1, str) else text_1
    seconds = [text_2] if isinstance(text_2, str) else text_2
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    elif len(firsts) != len(seconds):
        raise APIError(400, "Input lengths must be either 1:1, 1:N or N:N", param="text_2")
    return list(zip(firsts, seconds, strict=True))


@router.post("/score", tags=["pooling"], response_model=ScoreResponse)
@router.post("/v1/score", tags=["pooling"], response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request, pooling: ScoreDep) -> ScoreResponse:
    model = _model(pooling, body.model)
    scores, tokens = await pooling.score_pairs(
        model, _pairs(body.text_1, body.text_2), body.truncate_prompt_tokens, request
    )
    return ScoreResponse(
        id=f"score-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        data=[ScoreData(index=index, score=value) for index, value in enumerate(scores)],
        usage=PoolingUsage.of(tokens),
    )


@router.post("/rerank", tags=["pooling"], response_model=RerankResponse)
@router.post("/v1/rerank", tags=["pooling"], response_model=RerankResponse)
async def rerank(body: RerankRequest, request: Request, pooling: ScoreDep) -> RerankResponse:
    """The documents by relevance to the query, most relevant first (top_n of them when set)."""
    model = _model(pooling, body.model)
    pairs = [(body.query, document) for document in body.documents]
    scores, tokens = await pooling.score_pairs(model, pairs, body.truncate_prompt_tokens, request)
    ranked = sorted(range(len(scores)), key=lambda index: -scores[index])[: body.top_n or None]
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}",
        model=model,
        usage=PoolingUsage.of(tokens),
        results=[
            RerankResult(
                index=index,
                document=RerankDocument(text=body.documents[index]),
                relevance_score=scores[index],
            )
            for index in ranked
        ],
    )
