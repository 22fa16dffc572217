"""/classify, the seed's /predict, /score and /rerank on random-weight BertForSequenceClassification models
built on disk: the server's numbers are transformers' own forward (and sentence-transformers' CrossEncoder
for scores), whatever else shares the padded batch."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from sentence_transformers import CrossEncoder
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.inference.harness import RunningServer, running_server
from tests.inference.pooling_models import build_classifier, sentence

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["I love this.", "This is terrible and I want my money back.", "meh", sentence(40), ""]
QUERY = "where do people walk at night"
DOCUMENTS = ["people walk along the river at night", "the stock market fell", sentence(30, start=5), "night"]


@pytest.fixture(scope="module")
def sentiment_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_classifier(tmp_path_factory.mktemp("sentiment"), LABELS)


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_classifier(tmp_path_factory.mktemp("reranker"), ["relevance"], seed=1)


@pytest.fixture(scope="module")
def sentiment(sentiment_dir: Path) -> Iterator[RunningServer]:
    with running_server(sentiment_dir, served_model_name="sentiment") as server:
        yield server


@pytest.fixture(scope="module")
def reranker(reranker_dir: Path) -> Iterator[RunningServer]:
    with running_server(reranker_dir, served_model_name="reranker") as server:
        yield server


def logits(model_dir: Path, *texts: str) -> list[float]:
    """transformers' own forward, one input alone (no padding)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return model(**tokenizer(*texts, return_tensors="pt")).logits[0].tolist()


def test_classify_equals_the_forward_of_each_input_alone(
    sentiment: RunningServer, sentiment_dir: Path
) -> None:
    response = httpx.post(f"{sentiment.url}/classify", json={"model": "sentiment", "input": TEXTS})
    body = response.json()
    assert response.status_code == 200, body
    assert (body["object"], body["model"], body["id"][:9]) == ("list", "sentiment", "classify-")
    for index, (text, item) in enumerate(zip(TEXTS, body["data"], strict=True)):
        expected = torch.tensor(logits(sentiment_dir, text)).softmax(-1).tolist()
        assert item["probs"] == pytest.approx(expected, abs=1e-5)
        assert (item["index"], item["num_classes"]) == (index, 3)
        assert item["label"] == LABELS[max(range(3), key=expected.__getitem__)]
    assert len({item["label"] for item in body["data"]}) > 1, "random weights that tell inputs apart"
    tokens = sum(len(ids) for ids in AutoTokenizer.from_pretrained(sentiment_dir)(TEXTS)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    alone = httpx.post(f"{sentiment.url}/classify", json={"input": TEXTS[1]}).json()  # model defaults
    assert alone["data"][0]["probs"] == pytest.approx(body["data"][1]["probs"], abs=1e-6)


def test_predict_keeps_the_seed_fields(sentiment: RunningServer, sentiment_dir: Path) -> None:
    text = "This is terrible and I want my money back."
    expected = torch.tensor(logits(sentiment_dir, text)).softmax(-1).tolist()
    best = max(range(3), key=expected.__getitem__)
    plain = httpx.post(f"{sentiment.url}/predict", json={"text": text}).json()
    assert plain == {
        "text": text,
        "label": LABELS[best],
        "sentiment": LABELS[best],
        "confidence": pytest.approx(expected[best], abs=1e-5),
        "prediction": best,
        "probabilities": None,
    }
    full = httpx.post(f"{sentiment.url}/predict", json={"text": text, "return_probabilities": True}).json()
    assert full["probabilities"] == pytest.approx(dict(zip(LABELS, expected, strict=True)), abs=1e-5)
    assert httpx.post(f"{sentiment.url}/predict", json={"text": ""}).status_code == 400


def test_a_classifier_with_several_labels_does_not_score(sentiment: RunningServer) -> None:
    for path, body in [
        ("/score", {"text_1": "a", "text_2": "b"}),
        ("/v1/rerank", {"query": "a", "documents": ["b"]}),
        ("/v1/embeddings", {"model": "sentiment", "input": "a"}),
    ]:
        response = httpx.post(f"{sentiment.url}{path}", json=body)
        assert response.status_code == 404
        assert "is served for classify (/classify, /predict)" in response.json()["error"]["message"]
    (card,) = httpx.get(f"{sentiment.url}/v1/models").json()["data"]
    assert (card["task"], card["max_model_len"]) == ("classify", 128)


def test_classify_too_long_and_truncated(sentiment: RunningServer) -> None:
    long = sentence(200)
    refused = httpx.post(f"{sentiment.url}/classify", json={"input": long})
    assert refused.status_code == 400 and "maximum context length is 128 tokens" in refused.text
    truncated = httpx.post(f"{sentiment.url}/classify", json={"input": long, "truncate_prompt_tokens": -1})
    assert truncated.json()["usage"]["prompt_tokens"] == 128


def test_score_equals_sentence_transformers_cross_encoder(
    reranker: RunningServer, reranker_dir: Path
) -> None:
    """A cross-encoder's score is sigmoid(logit), as CrossEncoder.predict and vLLM give it for one label."""
    expected = (
        CrossEncoder(str(reranker_dir), device="cpu").predict([(QUERY, doc) for doc in DOCUMENTS]).tolist()
    )
    assert expected == pytest.approx(
        [torch.tensor(logits(reranker_dir, QUERY, doc)).sigmoid().item() for doc in DOCUMENTS], abs=1e-6
    )
    for path in ("/score", "/v1/score"):
        body = httpx.post(f"{reranker.url}{path}", json={"text_1": QUERY, "text_2": DOCUMENTS}).json()
        assert [item["score"] for item in body["data"]] == pytest.approx(expected, abs=1e-5)
        assert body["data"][0] == {
            "index": 0,
            "object": "score",
            "score": pytest.approx(expected[0], abs=1e-5),
        }
        assert body["model"] == "reranker"
    zipped = httpx.post(
        f"{reranker.url}/score", json={"text_1": [QUERY, DOCUMENTS[0]], "text_2": [DOCUMENTS[0], QUERY]}
    ).json()
    assert zipped["data"][0]["score"] == pytest.approx(expected[0], abs=1e-5)
    mismatched = httpx.post(f"{reranker.url}/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert mismatched.status_code == 400 and "1:1, 1:N or N:N" in mismatched.json()["error"]["message"]


def test_rerank_sorts_by_relevance(reranker: RunningServer, reranker_dir: Path) -> None:
    expected = (
        CrossEncoder(str(reranker_dir), device="cpu").predict([(QUERY, doc) for doc in DOCUMENTS]).tolist()
    )
    order = sorted(range(len(DOCUMENTS)), key=lambda index: -expected[index])
    for path in ("/rerank", "/v1/rerank"):
        body = httpx.post(f"{reranker.url}{path}", json={"query": QUERY, "documents": DOCUMENTS}).json()
        assert [result["index"] for result in body["results"]] == order
        assert [result["relevance_score"] for result in body["results"]] == pytest.approx(
            [expected[index] for index in order], abs=1e-5
        )
        assert body["results"][0]["document"] == {"text": DOCUMENTS[order[0]]}
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    top = httpx.post(
        f"{reranker.url}/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": 2}
    ).json()
    assert [result["index"] for result in top["results"]] == order[:2]


def test_a_cross_encoder_also_classifies(reranker: RunningServer, reranker_dir: Path) -> None:
    (card,) = httpx.get(f"{reranker.url}/v1/models").json()["data"]
    assert card["task"] == "score"  # auto: one label
    (item,) = httpx.post(f"{reranker.url}/classify", json={"input": "hello"}).json()["data"]
    assert item["probs"] == pytest.approx(
        [torch.tensor(logits(reranker_dir, "hello")).sigmoid().item()], abs=1e-5
    )
    assert (item["label"], item["num_classes"]) == ("relevance", 1)
    chat = httpx.post(f"{reranker.url}/v1/chat/completions", json={"model": "reranker", "messages": []})
    assert chat.status_code == 404 and "/rerank" in chat.json()["error"]["message"]


def test_the_activation_the_cross_encoder_config_names(tmp_path: Path) -> None:
    """config.json's sentence_transformers.activation_fn (as CrossEncoder saves it) replaces sigmoid."""
    model_dir = build_classifier(
        tmp_path / "raw", ["score"], seed=2, activation_fn="torch.nn.modules.linear.Identity"
    )
    expected = (
        CrossEncoder(str(model_dir), device="cpu").predict([(QUERY, doc) for doc in DOCUMENTS]).tolist()
    )
    assert expected == pytest.approx([logits(model_dir, QUERY, doc)[0] for doc in DOCUMENTS], abs=1e-5)
    with running_server(model_dir, served_model_name="raw", task="score") as server:
        body = httpx.post(f"{server.url}/score", json={"text_1": QUERY, "text_2": DOCUMENTS}).json()
    assert [item["score"] for item in body["data"]] == pytest.approx(expected, abs=1e-5)
