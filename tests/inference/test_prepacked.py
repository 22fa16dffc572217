"""oneDNN's prepacked linear layers: the loaded embedding model runs on them, computes as the same model on
sgemm does, and still looks like nn.Linear to state dicts and copies; other dtypes keep sgemm;
LLM_PREPACK_WEIGHTS turns it off."""

import copy
from pathlib import Path

import torch
from torch import nn

from llm_server.config import ServerSettings
from llm_server.engine.loading import LoadedPoolingModel, load_pooling_model
from llm_server.engine.prepacked import PrepackedLinear, prepack_linears
from llm_server.engine.tasks import resolve_task
from tests.inference.pooling_models import MINILM


def test_the_loaded_embedding_model_runs_prepacked_and_embeds_as_on_sgemm() -> None:
    def load() -> LoadedPoolingModel:
        return load_pooling_model(MINILM, resolve_task(MINILM, "embed"), "float32", "cpu", None)

    loaded = load()
    linears = [module for module in loaded.model.modules() if isinstance(module, nn.Linear)]
    assert linears and all(type(module) is PrepackedLinear for module in linears)
    sgemm = load().model
    for module in sgemm.modules():
        if type(module) is PrepackedLinear:
            module.__class__ = nn.Linear
    batch = loaded.tokenizer(["A first sentence to embed.", "And a second, longer one."], padding=True)
    batch = {name: torch.tensor(values) for name, values in batch.items()}
    with torch.inference_mode():
        packed = loaded.model(**batch).last_hidden_state
        reference = sgemm(**batch).last_hidden_state
    assert torch.nn.functional.cosine_similarity(packed, reference, dim=-1).min() >= 0.99999
    assert set(loaded.model.state_dict()) == set(sgemm.state_dict())  # nothing extra saved or loaded


def test_only_float32_linear_layers_are_prepacked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    half = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.randn(5, 8)
    expected = model(x)
    assert prepack_linears(model) == 2
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert prepack_linears(half) == 0
    assert all(type(module) is nn.Linear for module in half if isinstance(module, nn.Linear))


def test_a_prepacked_layer_follows_its_weight_changed_in_place_and_copies_as_a_plain_linear() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 16)
    prepack_linears(layer)
    x = torch.randn(5, 8)
    with torch.no_grad():
        layer.weight.mul_(2)  # as load_state_dict or a merged adapter would
    assert torch.allclose(layer(x), nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
    twin = copy.deepcopy(layer)  # peft copies the modules an adapter trains
    assert type(twin) is nn.Linear and torch.equal(twin.weight, layer.weight)
    assert twin.weight.data_ptr() != layer.weight.data_ptr()


def test_the_setting_turns_prepacking_off(tmp_path: Path) -> None:
    loaded = load_pooling_model(MINILM, resolve_task(MINILM, "embed"), "float32", "cpu", None, prepack=False)
    assert not any(type(module) is PrepackedLinear for module in loaded.model.modules())
    assert ServerSettings(model=tmp_path, prepack_weights="false").prepack_weights is False
