"""Linear layers multiplied in slices of their output features (engine/split_linear.py): a loaded generation
model on a CPU runs on them, computes what sgemm computes, generates the same tokens with and without a
LoRA adapter, and LLM_SPLIT_LINEAR_LAYERS turns them off."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from llm_server.config import ServerSettings
from llm_server.engine.loading import load_model
from llm_server.engine.split_linear import SPLIT_ROWS, SplitLinear, split_linears
from llm_server.main import build_engine


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def on_sgemm(model: nn.Module) -> Iterator[None]:
    """The same model, its linear layers on nn.Linear's own forward for a while."""
    split = [module for module in model.modules() if type(module) is SplitLinear]
    for module in split:
        module.__class__ = nn.Linear
    try:
        yield
    finally:
        for module in split:
            module.__class__ = SplitLinear


@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (3, 1, 24), (SPLIT_ROWS, 24), (SPLIT_ROWS + 1, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_a_split_layer_computes_what_sgemm_does(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(24, 32, bias=bias)
    assert split_linears(layer, threads=2) == 1 and layer.slices == 4
    x = torch.randn(*shape)
    with torch.inference_mode():
        got, expected = layer(x), nn.functional.linear(x, layer.weight, layer.bias)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(2)  # a merged adapter or a loaded state dict changes it in place
    assert torch.allclose(layer(x), nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)


def test_layers_that_do_not_split_keep_sgemm() -> None:
    assert split_linears(nn.Linear(24, 32), threads=1) == 0  # nothing to run side by side
    assert split_linears(nn.Linear(24, 30), threads=2) == 0  # 30 outputs do not make 4 equal slices
    assert split_linears(nn.Linear(24, 32).to(torch.bfloat16), threads=2) == 0  # not measured


def test_the_loaded_generation_model_splits_and_generates_as_on_sgemm(demo: tuple[Path, Path]) -> None:
    model_dir, adapter = demo
    with torch_threads(2):
        loaded = load_model(model_dir, {"support": adapter}, "float32", "cpu", None)
    base = loaded.model.get_base_model()
    assert sum(type(m) is SplitLinear for m in base.modules()) >= 7 * base.config.num_hidden_layers
    ids = torch.tensor([loaded.tokenizer.encode("Serving models on Kubernetes, with adapters")])

    def greedy(adapter_name: str) -> list[int]:
        with torch.inference_mode():
            out = loaded.model.generate(
                input_ids=ids, max_new_tokens=24, do_sample=False, adapter_names=[adapter_name],
                pad_token_id=loaded.tokenizer.pad_token_id,
            )  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    for name in ("__base__", "support"):
        split = greedy(name)
        with on_sgemm(loaded.model):
            assert greedy(name) == split, name


def test_the_setting_turns_splitting_off(demo: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, _ = demo

    def split_layers() -> int:
        engine = build_engine(ServerSettings(model=model_dir))
        try:
            return sum(type(m) is SplitLinear for m in engine._loaded.model.modules())
        finally:
            engine.shutdown()

    with torch_threads(2):
        assert split_layers() > 0
        monkeypatch.setenv("LLM_SPLIT_LINEAR_LAYERS", "false")
        assert split_layers() == 0
