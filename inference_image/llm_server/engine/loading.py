"""Load a base model and its LoRA adapters, or a pooling model (embed, classify, score), from local
directories, onto the right device."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from llm_server.engine.attention import SLOT_ATTENTION
from llm_server.engine.interface import AdapterError
from llm_server.engine.prepacked import prepack_linears
from llm_server.engine.row_adapters import RowAdapters
from llm_server.engine.split_linear import split_linears
from llm_server.engine.tasks import ModelTask

logger = logging.getLogger(__name__)
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in per-row adapter selection


@dataclasses.dataclass
class LoadedModel:
    model: Any
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    max_model_len: int
    adapters: dict[str, str]
    rows: RowAdapters = dataclasses.field(default_factory=RowAdapters)  # per-row adapter choice
    end_ids: frozenset[int] = frozenset()  # tokens that end a generation (see end_of_generation_ids)

    @property
    def has_peft(self) -> bool:
        return isinstance(self.model, PeftModel)


def end_of_generation_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any) -> frozenset[int]:
    """The tokenizer's EOS and every id the model's generation config lists: chat models end a turn with
    one the tokenizer may not call EOS (Llama 3's <|eot_id|>, Gemma's <end_of_turn>); model.generate and
    vLLM stop on all of them."""
    listed = getattr(generation_config, "eos_token_id", None)
    ids = {listed} if isinstance(listed, int) else set(listed or ())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def load_model(
    model_dir: Path,
    adapters: dict[str, Path],
    dtype: str,
    device: str,
    max_model_len: int | None,
    split_linear: bool = True,
) -> LoadedModel:
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no model at {model_dir}: config.json is missing")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Several GPUs in the pod: spread the layers with accelerate; otherwise one device.
    spread = target.type == "cuda" and torch.cuda.device_count() > 1
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch_dtype,
        attn_implementation=SLOT_ATTENTION,  # transformers' SDPA, plus the engine's mixed steps
        device_map="auto" if spread else None,
    )
    if not spread:
        model.to(target)
    model.eval()
    # Before any adapter: peft wraps a SplitLinear as it wraps nn.Linear.
    split = split_linears(model) if split_linear and target.type == "cpu" else 0
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    loaded = LoadedModel(
        model,
        tokenizer,
        target,
        min(limit, max_model_len or limit),
        {},
        end_ids=end_of_generation_ids(tokenizer, model.generation_config),
    )
    for name, path in adapters.items():
        attach_adapter(loaded, name, str(path))
    logger.info(
        "model loaded",
        extra={
            "model": str(model_dir),
            "device": str(target),
            "dtype": str(torch_dtype),
            "adapters": sorted(loaded.adapters),
            "split_linear_layers": split,
        },
    )
    return loaded


def attach_adapter(loaded: LoadedModel, name: str, path: str) -> None:
    if name in loaded.adapters:
        raise AdapterError(f"adapter {name!r} is already loaded")
    if not (Path(path) / "adapter_config.json").exists():
        raise AdapterError(f"adapter {name!r} failed to load: no adapter_config.json in {path}")
    # peft puts an adapter's layers into the model before it loads their weights: a load that fails
    # (e.g. a shape mismatch) must take them out again, or the base model would run a half-loaded adapter.
    fresh = not loaded.has_peft
    try:
        target = (
            PeftModel(loaded.model, PeftConfig.from_pretrained(path), adapter_name=name)
            if fresh
            else loaded.model
        )
    except Exception as error:  # peft raises many kinds (missing target modules, bad config)
        raise AdapterError(f"adapter {name!r} failed to load from {path}: {error}") from error
    try:
        target.load_adapter(path, adapter_name=name)
        target.eval()
    except Exception as error:  # shape mismatch, missing keys, unreadable weights
        if fresh:
            target.unload()  # back to the plain model
        elif name in target.peft_config:
            target.delete_adapter(name)
        raise AdapterError(f"adapter {name!r} failed to load from {path}: {error}") from error
    loaded.model = target
    loaded.adapters[name] = path
    loaded.rows.attach(loaded.model)


def detach_adapter(loaded: LoadedModel, name: str) -> None:
    if name not in loaded.adapters:
        raise AdapterError(f"adapter {name!r} is not loaded")
    if len(loaded.adapters) == 1:
        # The last one: back to the plain model (peft cannot select "no adapter" with none loaded).
        loaded.model = loaded.model.unload()
    else:
        loaded.model.delete_adapter(name)
    del loaded.adapters[name]
    loaded.rows.attach(loaded.model)


@dataclasses.dataclass
class LoadedPoolingModel:
    model: Any  # the bare transformer (embed) or a *ForSequenceClassification (classify, score)
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    max_model_len: int
    task: ModelTask
    pad_id: int
    vocab_size: int
    token_types: bool  # the model takes token_type_ids (BERT-likes: the segments of a pair)
    batchable: bool  # rows can be padded together (transformers refuses a decoder classifier without pad id)
    embedding_width: int | None = None

    @property
    def embeds(self) -> bool:
        return self.task.pooling is not None


UNKNOWN_LENGTH = 1_000_000  # transformers' tokenizers say 1e30 when their config names no limit


def load_pooling_model(
    model_dir: Path,
    task: ModelTask,
    dtype: str,
    device: str,
    max_model_len: int | None,
    prepack: bool = True,
) -> LoadedPoolingModel:
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    pooling = task.pooling
    source = model_dir / pooling.transformer_path if pooling is not None else model_dir
    tokenizer = AutoTokenizer.from_pretrained(source)
    auto = AutoModel if pooling is not None else AutoModelForSequenceClassification
    model = auto.from_pretrained(source, dtype=torch_dtype)
    model.to(target)
    model.eval()
    prepacked = prepack_linears(model) if prepack and target.type == "cpu" else 0
    config = model.config
    # The shortest of the position embeddings, sentence-transformers' max_seq_length (the length it was
    # trained on, as vLLM reads it), the tokenizer's own limit and LLM_MAX_MODEL_LEN.
    limits = [
        getattr(config, "max_position_embeddings", None),
        pooling.max_seq_length if pooling is not None else None,
        tokenizer.model_max_length if tokenizer.model_max_length < UNKNOWN_LENGTH else None,
        max_model_len,
    ]
    config_pad = getattr(config, "pad_token_id", None)
    pad_id = next((pad for pad in (config_pad, tokenizer.pad_token_id) if pad is not None), 0)
    loaded = LoadedPoolingModel(
        model=model,
        tokenizer=tokenizer,
        device=target,
        max_model_len=min([limit for limit in limits if limit] or [2048]),  # 2048: as load_model
        task=task,
        pad_id=pad_id,
        vocab_size=model.get_input_embeddings().num_embeddings,
        token_types="token_type_ids" in tokenizer.model_input_names
        and "token_type_ids" in inspect.signature(model.forward).parameters,
        batchable=pooling is not None or config_pad is not None,
        embedding_width=config.hidden_size * len(pooling.modes) if pooling is not None else None,
    )
    logger.info(
        "model loaded",
        extra={
            "model": str(model_dir),
            "task": task.task,
            "device": str(target),
            "dtype": str(torch_dtype),
            "max_model_len": loaded.max_model_len,
            "prepacked_linear_layers": prepacked,
        },
    )
    return loaded
