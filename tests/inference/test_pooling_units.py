"""The pooling engine's pure pieces: batch packing, padding, sentence-transformers' pooling modes (against
its own Pooling module), and what a model directory is served for."""

import json
from pathlib import Path

import pytest
import torch
from sentence_transformers.sentence_transformer.modules import Pooling

from llm_server.api.dependencies import TASK_ROUTES
from llm_server.config import ServerSettings
from llm_server.engine.interface import PoolInput
from llm_server.engine.pooling import batch_rows, finish_embedding, pad_batch, pool_tokens
from llm_server.engine.tasks import POOLING_MODES, TaskError, resolve_task, sentence_pooling
from llm_server.main import create_app
from tests.inference.pooling_models import MINILM


@pytest.mark.parametrize(
    ("lengths", "max_rows", "max_tokens", "rows"),
    [
        ([5, 5, 5], 2, 1000, 2),  # the row limit
        ([10, 10, 10, 10], 32, 30, 3),  # 3 x 10 fits 30, a fourth would pad to 40
        ([4, 20, 4], 32, 40, 2),  # the longest sets the padded size: 2 x 20, then 3 x 20 > 40
        ([500, 1], 32, 64, 1),  # longer than the budget: alone, never stuck
        ([1, 500], 32, 64, 1),  # first come, first served: the long one waits for the next forward
        ([], 32, 64, 0),
    ],
)
def test_batch_rows(lengths: list[int], max_rows: int, max_tokens: int, rows: int) -> None:
    assert batch_rows(lengths, max_rows, max_tokens) == rows


def test_pad_batch_pads_right_and_keeps_the_segments() -> None:
    inputs = [PoolInput((1, 2, 3), (0, 0, 1)), PoolInput((4,), None)]
    batch = pad_batch(inputs, pad_id=9, token_types=True, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert "token_type_ids" not in pad_batch(inputs, 0, False, torch.device("cpu"))


@pytest.mark.parametrize("modes", [(mode,) for mode in POOLING_MODES] + [("cls", "mean", "max")])
def test_pooling_modes_match_sentence_transformers(modes: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(4, 7, 16)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1] * length + [0] * (7 - length) for length in lengths])
    reference = Pooling(16, pooling_mode=modes if len(modes) > 1 else modes[0])
    expected = reference({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    assert torch.allclose(pool_tokens(hidden, mask, modes), expected, atol=1e-6)


def test_a_shortened_embedding_is_normalized_again() -> None:
    vector = torch.tensor([3.0, 4.0, 12.0])
    assert finish_embedding(vector, 2, normalize=True).tolist() == pytest.approx([0.6, 0.8])
    assert finish_embedding(vector, None, normalize=False).tolist() == [3.0, 4.0, 12.0]


def write_model(path: Path, config: dict, modules: list[dict] | None = None, **files: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if modules is not None:
        (path / "modules.json").write_text(json.dumps(modules))
    for name, content in files.items():
        target = path / name.replace("__", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(content))
    return path


ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]
BERT = {"architectures": ["BertModel"], "hidden_size": 8}


def classifier(labels: int, **extra: object) -> dict:
    return {
        "architectures": ["BertForSequenceClassification"],
        "id2label": {str(index): f"L{index}" for index in range(labels)},
        **extra,
    }


def test_auto_detects_the_real_sentence_transformers_model() -> None:
    task = resolve_task(MINILM, "auto")
    assert (task.task, task.serves) == ("embed", frozenset({"embed", "score"}))
    assert task.pooling is not None
    assert (task.pooling.modes, task.pooling.normalize, task.pooling.max_seq_length) == (("mean",), True, 256)
    assert not task.is_matryoshka


def test_both_pooling_config_formats(tmp_path: Path) -> None:
    legacy = {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}
    old = write_model(tmp_path / "old", BERT, ST_MODULES, **{"1_Pooling__config.json": legacy})
    new = write_model(
        tmp_path / "new", BERT, ST_MODULES, **{"1_Pooling__config.json": {"pooling_mode": "lasttoken"}}
    )
    assert sentence_pooling(old).modes == ("cls", "max")  # type: ignore[union-attr]
    assert sentence_pooling(new).modes == ("lasttoken",)  # type: ignore[union-attr]
    assert sentence_pooling(new).normalize is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("config", "task", "serves"),
    [
        (classifier(3), "classify", {"classify"}),
        (classifier(1), "score", {"classify", "score"}),  # a cross-encoder classifies too, as in vLLM
        ({"architectures": ["LlamaForCausalLM"]}, "generate", {"generate"}),
        ({}, "generate", {"generate"}),  # no architectures named: served as before
    ],
)
def test_auto(tmp_path: Path, config: dict, task: str, serves: set[str]) -> None:
    resolved = resolve_task(write_model(tmp_path / "m", config), "auto")
    assert (resolved.task, resolved.serves) == (task, frozenset(serves))


def test_activations(tmp_path: Path) -> None:
    three = resolve_task(write_model(tmp_path / "a", classifier(3)), "classify")
    regression = resolve_task(write_model(tmp_path / "b", classifier(1, problem_type="regression")), "auto")
    multi = resolve_task(
        write_model(tmp_path / "c", classifier(3, problem_type="multi_label_classification")), "auto"
    )
    named = resolve_task(
        write_model(
            tmp_path / "d",
            classifier(1, sentence_transformers={"activation_fn": "torch.nn.modules.linear.Identity"}),
        ),
        "score",
    )
    assert (three.classify_activation, three.labels) == ("softmax", ("L0", "L1", "L2"))
    assert (regression.classify_activation, regression.score_activation) == ("identity", "sigmoid")
    assert multi.classify_activation == "sigmoid"
    assert named.score_activation == "identity"


def test_embed_without_sentence_transformers_files_pools_as_vllm(tmp_path: Path) -> None:
    decoder = resolve_task(write_model(tmp_path / "d", {"architectures": ["Qwen3ForCausalLM"]}), "embed")
    encoder = resolve_task(write_model(tmp_path / "e", {**BERT, "matryoshka_dimensions": [4, 8]}), "embed")
    assert decoder.pooling.modes == ("lasttoken",) and decoder.pooling.normalize  # type: ignore[union-attr]
    assert encoder.pooling.modes == ("cls",)  # type: ignore[union-attr]
    assert (encoder.is_matryoshka, encoder.matryoshka_dimensions) == (True, (4, 8))


@pytest.mark.parametrize(
    ("config", "modules", "task", "message"),
    [
        (BERT, ST_MODULES, "classify", "task classify needs a sequence-classification model"),
        (
            BERT,
            ST_MODULES,
            "generate",
            "is a sentence-transformers embedding model: serve it with task embed",
        ),
        (BERT, None, "auto", "task generate needs a causal language model"),
        (classifier(3), None, "score", "task score needs a cross-encoder"),
        (classifier(3), None, "generate", "serve it with task classify or score"),
        (
            classifier(1, sentence_transformers={"activation_fn": "my.module.Evil"}),
            None,
            "score",
            "activation_fn 'my.module.Evil' is not supported",
        ),
        (
            BERT,
            [
                *ST_MODULES,
                {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
            ],
            "embed",
            "sentence-transformers module 'sentence_transformers.models.Dense' (2_Dense) is not supported",
        ),
    ],
)
def test_a_task_the_model_cannot_do_says_why(
    tmp_path: Path, config: dict, modules: list[dict] | None, task: str, message: str
) -> None:
    with pytest.raises(TaskError) as raised:
        resolve_task(write_model(tmp_path / "m", config, modules), task)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_no_model_directory(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"config\.json is missing"):
        resolve_task(tmp_path, "auto")


def test_every_task_route_is_listed_for_the_wrong_task_404() -> None:
    """The 404 of a route the model does not serve names the routes it does: that list is every POST
    route of the app except those of every task: tokenizing and the readiness ping (the runtime-LoRA ones
    are not in this app's document without LLM_ENABLE_RUNTIME_LORA)."""
    document = create_app(ServerSettings(model=Path("/nowhere"))).openapi()
    every_task = {"/tokenize", "/detokenize", "/ping"}
    posts = {path for path, methods in document["paths"].items() if "post" in methods} - every_task
    assert posts == {route for routes in TASK_ROUTES.values() for route in routes}
