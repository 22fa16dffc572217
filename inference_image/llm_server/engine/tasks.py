"""What a model directory can serve, read from its files alone (no weights, no torch): the task asked for
(LLM_TASK) or detected (`auto`), and for a pooling task everything the engine applies after the forward.

`auto`, as vLLM decides: a sentence-transformers model (modules.json with a Pooling module) embeds; a
`*ForSequenceClassification` scores text pairs when it has one label (a cross-encoder) and classifies
otherwise; anything else generates. As vLLM's supported tasks, a task brings its companions: an embedding
model also scores (cosine similarity of the two embeddings), and a sequence classifier with one label both
classifies and scores.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from llm_server.engine.interface import Task

Activation = Literal["softmax", "sigmoid", "identity", "tanh"]
# sentence-transformers' pooling modes, in the order it concatenates the legacy pooling_mode_* flags.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_MODE_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_SEQUENCE_CLASSIFIER = "ForSequenceClassification"
# torch.nn.modules classes a cross-encoder's config may name as its score activation (vLLM loads only those).
_ACTIVATIONS: dict[str, Activation] = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh"}


class TaskError(ValueError):
    """The model cannot serve the task asked for (or its files are not what a task needs)."""


@dataclasses.dataclass(frozen=True)
class SentencePooling:
    """A sentence-transformers pipeline this server runs: Transformer, Pooling, optionally Normalize."""

    transformer_path: str = ""  # the Transformer module's folder inside the model directory
    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False


@dataclasses.dataclass(frozen=True)
class ModelTask:
    task: Task
    serves: frozenset[Task]
    pooling: SentencePooling | None = None  # embed
    labels: tuple[str, ...] = ()  # classify and score: the classifier's labels by index
    classify_activation: Activation = "softmax"
    score_activation: Activation = "sigmoid"
    is_matryoshka: bool = False  # embed: any `dimensions` (vLLM's config.json keys)
    matryoshka_dimensions: tuple[int, ...] | None = None  # embed: only these


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise TaskError(f"{path} is not readable JSON: {error}") from None


def _pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    """Both formats: sentence-transformers 6's `pooling_mode` (a name or a list), or the older flags."""
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(name for key, name in _LEGACY_MODE_KEYS.items() if config.get(key))
    modes = modes or ("mean",)  # sentence-transformers' default when no flag is set
    unknown = [name for name in modes if name not in POOLING_MODES]
    if unknown:
        raise TaskError(
            f"pooling mode {unknown[0]!r} is not supported (supported: {', '.join(POOLING_MODES)})"
        )
    return modes


def sentence_pooling(model_dir: Path) -> SentencePooling | None:
    """The sentence-transformers pipeline of `model_dir`, or None when it has no Pooling module."""
    modules = _read_json(model_dir / "modules.json")
    if not isinstance(modules, list):
        return None
    kinds = {str(module.get("type", "")).rsplit(".", 1)[-1]: module for module in modules}
    if "Pooling" not in kinds:
        return None
    unsupported = [name for name in kinds if name not in ("Transformer", "Pooling", "Normalize")]
    if unsupported:
        module = kinds[unsupported[0]]
        raise TaskError(
            f"sentence-transformers module {module.get('type')!r} ({module.get('path')}) is not supported: "
            "this server runs Transformer, Pooling and Normalize modules"
        )
    order = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    if order != ["Transformer", "Pooling", *(["Normalize"] if "Normalize" in kinds else [])]:
        raise TaskError(
            f"sentence-transformers modules {order}: this server runs Transformer, Pooling[, Normalize]"
        )
    transformer_path = str(kinds.get("Transformer", {}).get("path", ""))
    pooling_config = _read_json(model_dir / str(kinds["Pooling"].get("path", "")) / "config.json") or {}
    bert_config = _read_json(model_dir / transformer_path / "sentence_bert_config.json") or {}
    return SentencePooling(
        transformer_path=transformer_path,
        modes=_pooling_modes(pooling_config),
        normalize="Normalize" in kinds,
        max_seq_length=bert_config.get("max_seq_length"),
        do_lower_case=bool(bert_config.get("do_lower_case", False)),
    )


def _labels(config: dict[str, Any]) -> tuple[str, ...]:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return tuple(str(label) for _, label in sorted(id2label.items(), key=lambda item: int(item[0])))
    return tuple(
        f"LABEL_{index}" for index in range(int(config.get("num_labels", 2)))
    )  # transformers' default


def _classify_activation(config: dict[str, Any], num_labels: int) -> Activation:
    """vLLM's classify activation, aligned with transformers' losses for the config's problem_type."""
    problem = config.get("problem_type")
    if problem == "regression":
        return "identity"
    if problem == "multi_label_classification" or num_labels < 2:
        return "sigmoid"
    return "softmax"


def _score_activation(config: dict[str, Any]) -> Activation:
    """A cross-encoder's activation as sentence-transformers' CrossEncoder and vLLM pick it: the one its
    config names (config.sentence_transformers.activation_fn, or the older key), else sigmoid."""
    named = (config.get("sentence_transformers") or {}).get("activation_fn") or config.get(
        "sbert_ce_default_activation_function"
    )
    if named is None:
        return "sigmoid"
    name = str(named).rsplit(".", 1)[-1]
    if not str(named).startswith("torch.nn.modules.") or name not in _ACTIVATIONS:
        raise TaskError(f"the cross-encoder's activation_fn {named!r} is not supported")
    return _ACTIVATIONS[name]


def _default_pooling(architectures: list[str]) -> SentencePooling:
    """An embedding model without sentence-transformers files, as vLLM pools it: a decoder by its last
    token, an encoder by its CLS token; normalized."""
    causal = any(arch.endswith(_CAUSAL_SUFFIXES) for arch in architectures)
    return SentencePooling(modes=("lasttoken",) if causal else ("cls",), normalize=True)


def resolve_task(model_dir: Path, requested: Task | Literal["auto"]) -> ModelTask:
    """The task `model_dir` is served for, or TaskError saying why the model cannot do `requested`."""
    config = _read_json(model_dir / "config.json")
    if not isinstance(config, dict):
        raise TaskError(f"no model at {model_dir}: config.json is missing")
    architectures = [str(arch) for arch in config.get("architectures") or []]
    described = ", ".join(architectures) or "no architectures"
    pooling = sentence_pooling(model_dir)
    classifier = any(arch.endswith(_SEQUENCE_CLASSIFIER) for arch in architectures)
    labels = _labels(config) if classifier else ()
    if requested == "auto":
        if pooling is not None:
            requested = "embed"
        elif classifier:
            requested = "score" if len(labels) == 1 else "classify"
        else:
            requested = "generate"
    if requested == "generate":
        causal = any(arch.endswith(_CAUSAL_SUFFIXES) for arch in architectures)
        if pooling is not None or (architectures and not causal):
            kind = "a sentence-transformers embedding model" if pooling is not None else f"a {described}"
            hint = "task classify or score" if classifier else "task embed"
            raise TaskError(
                f"task generate needs a causal language model (an architecture ending in ForCausalLM); "
                f"{model_dir} is {kind}: serve it with {hint}"
            )
        return ModelTask("generate", frozenset({"generate"}))
    if requested == "embed":
        matryoshka = config.get("matryoshka_dimensions")
        return ModelTask(
            "embed",
            frozenset({"embed", "score"}),
            pooling=pooling or _default_pooling(architectures),
            is_matryoshka=bool(config.get("is_matryoshka")) or matryoshka is not None,
            matryoshka_dimensions=tuple(int(d) for d in matryoshka) if matryoshka else None,
        )
    if not classifier:
        raise TaskError(
            f"task {requested} needs a sequence-classification model (an architecture ending in "
            f"ForSequenceClassification in config.json); {model_dir} has {described}"
        )
    if requested == "score" and len(labels) != 1:
        raise TaskError(
            f"task score needs a cross-encoder (a ForSequenceClassification model with one label); "
            f"{model_dir} has {len(labels)} labels: use task classify"
        )
    return ModelTask(
        requested,
        frozenset({"classify", "score"} if len(labels) == 1 else {"classify"}),
        labels=labels,
        classify_activation=_classify_activation(config, len(labels)),
        score_activation=_score_activation(config) if len(labels) == 1 else "sigmoid",
    )
