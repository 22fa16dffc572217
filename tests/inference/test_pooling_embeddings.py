"""/v1/embeddings (and the seed's /embeddings, /score and /rerank) on the real all-MiniLM-L6-v2: the
server's vectors are sentence-transformers' own, also for 32 clients at once with mixed lengths in one
padded batch; the openai SDK and LangChain's OpenAIEmbeddings work against it."""

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from tests.inference.harness import RunningServer, running_server
from tests.inference.pooling_models import MINILM, sentence, variant

MODEL = "minilm"
PARAPHRASES = [
    (
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar.",
        "The stock market fell sharply today.",
    ),
    (
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "Cats sleep most of the day.",
    ),
    ("The weather is lovely today.", "It is a beautiful sunny day.", "He parked the truck in the garage."),
    ("Kubernetes schedules pods onto nodes.", "Pods are placed on nodes by Kubernetes.", "I like pancakes."),
]


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(MINILM), device="cpu")


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def minilm() -> Iterator[RunningServer]:
    with running_server(MINILM, served_model_name=MODEL) as server:
        yield server


def embed(server: RunningServer, inputs: object, **extra: object) -> np.ndarray:
    response = httpx.post(
        f"{server.url}/v1/embeddings", json={"model": MODEL, "input": inputs, **extra}, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    return np.array([item["embedding"] for item in body["data"]], dtype=np.float32)


def cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    return (first * second).sum(axis=1) / np.linalg.norm(first, axis=1) / np.linalg.norm(second, axis=1)


def test_embeddings_equal_sentence_transformers(minilm: RunningServer, reference, figure) -> None:  # type: ignore[no-untyped-def]
    texts = [triple[0] for triple in PARAPHRASES] + ["", "Grüße aus München!", sentence(60)]
    response = httpx.post(f"{minilm.url}/v1/embeddings", json={"model": MODEL, "input": texts})
    body = response.json()
    assert (body["object"], body["model"], body["id"][:5]) == ("list", MODEL, "embd-")
    assert body["data"][0]["object"] == "embedding" and len(body["data"][0]["embedding"]) == 384
    got = np.array([item["embedding"] for item in body["data"]], dtype=np.float32)
    similarity = cosines(got, reference.encode(texts))
    assert similarity.min() >= 0.9999, similarity
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the model's Normalize module
    tokens = sum(len(ids) for ids in reference.tokenizer(texts)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    figure(f"{len(texts)} texts: cosine to SentenceTransformer.encode >= 1 - {1 - similarity.min():.1e}")


def mixed_lengths(tokenizer) -> list[str]:  # type: ignore[no-untyped-def]
    texts = [sentence(6 + (index * 54) // 31, start=index) for index in range(32)]  # 8 to 62 tokens
    lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
    assert (min(lengths), max(lengths), len(set(lengths))) == (8, 62, 32)
    return texts


def concurrently(server: RunningServer, texts: list[str]) -> list[np.ndarray]:
    results: dict[int, np.ndarray] = {}

    def one(index: int) -> None:
        results[index] = embed(server, texts[index])[0]

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return [results[index] for index in range(len(texts))]


def test_32_clients_at_once_are_one_forward_with_sentence_transformers_results(
    minilm: RunningServer,
    reference,
    tokenizer,
    figure,  # type: ignore[no-untyped-def]
) -> None:
    texts = mixed_lengths(tokenizer)
    engine = minilm.app.state.server.engine
    forwards = minilm.metric("llm_engine_step_duration_seconds_count", {"model_name": MODEL}) or 0
    results: list[np.ndarray] = []
    with engine._intake:  # no worker takes inputs: all 32 requests are queued when one does
        sender = threading.Thread(target=lambda: results.extend(concurrently(minilm, texts)))
        sender.start()
        deadline = time.monotonic() + 30
        while engine.waiting < 32:
            assert time.monotonic() < deadline, engine.waiting
            time.sleep(0.01)
    sender.join(60)
    similarity = cosines(np.array(results), reference.encode(texts))
    assert similarity.min() >= 0.9999, similarity
    batched = (minilm.metric("llm_engine_step_duration_seconds_count", {"model_name": MODEL}) or 0) - forwards
    assert batched == 1, "32 requests of 8 to 62 tokens, one packed forward"
    figure(
        "32 clients, 8-62 tokens, one packed forward: cosine to sentence-transformers "
        f">= 1 - {1 - similarity.min():.1e}"
    )


def test_32_clients_as_they_come(minilm: RunningServer, reference, tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = mixed_lengths(tokenizer)
    assert cosines(np.array(concurrently(minilm, texts)), reference.encode(texts)).min() >= 0.9999


def test_paraphrases_rank_above_unrelated_sentences(minilm: RunningServer) -> None:
    for anchor, paraphrase, unrelated in PARAPHRASES:
        vectors = embed(minilm, [anchor, paraphrase, unrelated])
        assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2, (anchor, vectors @ vectors.T)


def test_base64_decodes_to_the_same_float32_vector(minilm: RunningServer) -> None:
    texts = ["hello world", "base64 please"]
    floats = embed(minilm, texts)
    response = httpx.post(
        f"{minilm.url}/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "base64"}
    )
    decoded = [
        np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in response.json()["data"]
    ]
    assert np.array_equal(np.array(decoded), floats)


def test_token_ids_equal_text(minilm: RunningServer, tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = ["the quick brown fox", "a lazy dog near the old bridge"]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    from_text = embed(minilm, texts)
    assert np.allclose(embed(minilm, ids), from_text, atol=1e-6)  # a list of token lists
    assert np.allclose(embed(minilm, ids[0]), from_text[:1], atol=1e-6)  # one token list
    body = httpx.post(f"{minilm.url}/v1/embeddings", json={"model": MODEL, "input": ids[0]}).json()
    assert body["usage"]["prompt_tokens"] == len(ids[0])


def test_too_long_is_400_unless_truncated(minilm: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    long = sentence(300)  # 302 tokens; the model's max_seq_length is 256
    response = httpx.post(f"{minilm.url}/v1/embeddings", json={"model": MODEL, "input": ["short", long]})
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (400, "input")
    assert "input 1: " in error["message"] and "maximum context length is 256 tokens" in error["message"]
    assert "302 tokens" in error["message"]
    # sentence-transformers truncates to its max_seq_length by itself: the reference for a truncated input.
    for truncate in (256, -1):
        body = httpx.post(
            f"{minilm.url}/v1/embeddings",
            json={"model": MODEL, "input": long, "truncate_prompt_tokens": truncate},
        ).json()
        assert body["usage"]["prompt_tokens"] == 256
        got = np.array([body["data"][0]["embedding"]], dtype=np.float32)
        assert cosines(got, reference.encode([long]))[0] >= 0.9999
    short = embed(minilm, long, truncate_prompt_tokens=10)
    assert cosines(short, embed(minilm, sentence(8)))[0] >= 0.9999  # [CLS], 8 words, [SEP]
    for bad in (257, 0, -2):
        response = httpx.post(
            f"{minilm.url}/v1/embeddings", json={"model": MODEL, "input": long, "truncate_prompt_tokens": bad}
        )
        assert (response.status_code, response.json()["error"]["param"]) == (400, "truncate_prompt_tokens")


@pytest.mark.parametrize(
    ("changes", "status", "param", "fragment"),
    [
        ({"model": "nope"}, 404, "model", "`nope` does not exist"),
        ({"dimensions": 128}, 400, "dimensions", "does not support matryoshka representation"),
        ({"encoding_format": "binary"}, 400, "encoding_format", ""),
        ({"input": []}, 400, "input", ""),
        ({"input": [[]]}, 400, "input", ""),
        ({"input": [1, "two"]}, 400, "input", ""),
        ({"input": [30522]}, 400, "input", "token id 30522 is outside the model's vocabulary (0 to 30521)"),
        ({"input": [-1]}, 400, "input", ""),
        ({"input": ["x"] * 2049}, 400, "input", ""),
    ],
)
def test_bad_requests_name_the_field(
    minilm: RunningServer, changes: dict, status: int, param: str, fragment: str
) -> None:
    response = httpx.post(f"{minilm.url}/v1/embeddings", json={"model": MODEL, "input": "x", **changes})
    error = response.json()["error"]
    assert response.status_code == status, response.text
    assert error["param"].startswith(param) and fragment in error["message"]


def test_dimensions_on_a_matryoshka_model(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    model = variant(tmp_path / "matryoshka", MINILM, matryoshka_dimensions=[128, 256])
    texts = ["hello world", "the quick brown fox"]
    with running_server(model, served_model_name=MODEL) as server:
        shortened = embed(server, texts, dimensions=128)
        refused = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "x", "dimensions": 100}
        )
    truncated = SentenceTransformer(str(MINILM), device="cpu", truncate_dim=128)
    assert shortened.shape == (2, 128)
    assert cosines(shortened, truncated.encode(texts)).min() >= 0.9999
    assert np.allclose(np.linalg.norm(shortened, axis=1), 1.0, atol=1e-5)  # normalized after shortening
    assert refused.status_code == 400 and "only supports [128, 256]" in refused.json()["error"]["message"]


def test_the_seed_embeddings_route(minilm: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    texts = ["hello", "world"]
    response = httpx.post(f"{minilm.url}/embeddings", json=texts)
    got = np.array(response.json()["embeddings"], dtype=np.float32)
    assert cosines(got, reference.encode(texts)).min() >= 0.9999


def test_score_and_rerank_are_cosine_similarity(minilm: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    query, documents = PARAPHRASES[1][0], [PARAPHRASES[1][2], PARAPHRASES[1][1], PARAPHRASES[0][0]]
    expected = reference.similarity(reference.encode([query]), reference.encode(documents))[0].tolist()
    scored = httpx.post(
        f"{minilm.url}/score", json={"model": MODEL, "text_1": query, "text_2": documents}
    ).json()
    assert [item["score"] for item in scored["data"]] == pytest.approx(expected, abs=1e-4)
    assert scored["data"][0]["object"] == "score" and scored["object"] == "list"
    ranked = httpx.post(
        f"{minilm.url}/v1/rerank", json={"query": query, "documents": documents, "top_n": 2}
    ).json()
    assert [result["index"] for result in ranked["results"]] == [1, 0]
    assert ranked["results"][0]["document"] == {"text": documents[1]}
    assert ranked["results"][0]["relevance_score"] == pytest.approx(expected[1], abs=1e-4)


def test_routes_of_other_tasks_are_404_naming_what_the_model_serves(minilm: RunningServer) -> None:
    for path, body in [
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": MODEL, "prompt": "hi"}),
        ("/generate", {"prompt": "hi"}),
        ("/classify", {"input": "hi"}),
        ("/predict", {"text": "hi"}),
    ]:
        response = httpx.post(f"{minilm.url}{path}", json=body)
        assert response.status_code == 404, path
        message = response.json()["error"]["message"]
        assert f"`{MODEL}` is served for embed (/v1/embeddings" in message and path in message


def test_models_and_info_say_what_the_model_is_for(minilm: RunningServer) -> None:
    (card,) = httpx.get(f"{minilm.url}/v1/models").json()["data"]
    assert (card["id"], card["task"], card["max_model_len"], card["parent"]) == (MODEL, "embed", 256, None)
    info = httpx.get(f"{minilm.url}/model/info").json()
    assert (info["task"], info["max_model_len"]) == ("embed", 256)
    assert httpx.get(f"{minilm.url}/health").json()["model_loaded"] is True


def test_metrics(minilm: RunningServer) -> None:
    labels = {"model_name": MODEL}
    before = minilm.metric("vllm:prompt_tokens_total", labels) or 0
    embed(minilm, ["hello world", "again"])  # 4 + 3 tokens
    assert minilm.metric("vllm:prompt_tokens_total", labels) == before + 7
    assert minilm.metric("vllm:request_success_total", {**labels, "finished_reason": "stop"}) >= 1
    assert minilm.metric("vllm:e2e_request_latency_seconds_count", labels) >= 1
    assert minilm.metric("vllm:num_requests_running", labels) == 0
    assert minilm.metric("vllm:num_requests_waiting", labels) == 0
    assert minilm.metric("vllm:kv_cache_usage_perc", labels) == 0


def test_the_openai_sdk(minilm: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    client = openai.OpenAI(base_url=f"{minilm.url}/v1", api_key="unused", max_retries=0)
    texts = ["hello world", "the quick brown fox"]
    by_default = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64 and decodes it
    as_floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert by_default.model == MODEL and by_default.usage.prompt_tokens == by_default.usage.total_tokens == 10
    for response in (by_default, as_floats):
        got = np.array([item.embedding for item in response.data], dtype=np.float32)
        assert cosines(got, reference.encode(texts)).min() >= 0.9999
    with pytest.raises(openai.BadRequestError, match="matryoshka"):
        client.embeddings.create(model=MODEL, input=texts, dimensions=64)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input=texts)


def test_langchain_openai_embeddings(minilm: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    """OpenAIEmbeddings by default counts tokens with tiktoken, which downloads its encoding (impossible
    offline) and sends tiktoken's token ids, which are not MiniLM's: a non-OpenAI model needs
    check_embedding_ctx_length=False (texts as they are), or tiktoken_enabled=False with the model's own
    tokenizer (LangChain splits by it and sends the decoded text)."""
    documents = ["A man is playing a guitar.", "Pods are placed on nodes by Kubernetes."]
    expected = reference.encode(documents)
    common = {"model": MODEL, "base_url": f"{minilm.url}/v1", "api_key": "unused", "max_retries": 0}
    plain = OpenAIEmbeddings(check_embedding_ctx_length=False, **common)
    own_tokenizer = OpenAIEmbeddings(tiktoken_enabled=False, tiktoken_model_name=str(MINILM), **common)
    for embeddings in (plain, own_tokenizer):
        assert cosines(np.array(embeddings.embed_documents(documents)), expected).min() >= 0.9999
        assert cosines(np.array([embeddings.embed_query(documents[0])]), expected[:1])[0] >= 0.9999
