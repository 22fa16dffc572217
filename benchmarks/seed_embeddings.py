"""The seed documents' approach to embeddings, as a server for the benchmark's comparison: a FastAPI handler
around sentence-transformers' `encode`, one request at a time behind one model object (seed 003's
`/embeddings`), answering OpenAI's `/v1/embeddings` shape so that the same client drives it and
`llm-server`. It is a baseline to measure against, not part of the product.

`python -m benchmarks.seed_embeddings MODEL_DIR PORT`; loopback only.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer

from llm_server.engine.loading import pick_device, pick_dtype


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str = ""


def load_sentence_transformer(model_dir: Path) -> SentenceTransformer:
    """The model as the offline bound and this server load it: the device and dtype llm-server picks by
    default (auto), so that the three compare the same arithmetic."""
    device = pick_device("auto")
    return SentenceTransformer(
        str(model_dir), device=str(device), model_kwargs={"dtype": pick_dtype("auto", device)}
    )


def create_seed_app(model_dir: Path) -> FastAPI:
    model = load_sentence_transformer(model_dir)
    lock = threading.Lock()  # one model object: requests take turns, as the seed's handlers do
    app = FastAPI()

    @app.get("/health/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/embeddings")
    def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        with lock, torch.inference_mode():
            vectors = model.encode(texts, convert_to_numpy=True).tolist()
        return {
            "object": "list",
            "model": body.model,
            "data": [
                {"index": index, "object": "embedding", "embedding": vector}
                for index, vector in enumerate(vectors)
            ],
        }

    return app


def main() -> None:
    model_dir, port = Path(sys.argv[1]), int(sys.argv[2])
    app = create_seed_app(model_dir)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
