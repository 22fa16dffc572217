"""Linear layers on oneDNN with their weights reordered once (prepacked), for float32 inference on a CPU.

`nn.Linear` calls MKL's sgemm, which re-lays the weight out on every call and on this AMD EPYC runs
12-35% slower than oneDNN's kernel over a weight packed ahead of time (one thread, 384x1536: 6.4 vs 5.6 ms at
504 rows, 0.19 vs 0.12 ms at 8), the op inductor's freezing emits. The packed copy sits beside the weight
(state dicts and `.weight` readers see an unchanged `nn.Linear`); results differ from sgemm's by float
rounding only, and a layer whose packed result disagrees more than that keeps sgemm.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)
AGREEMENT = 1e-4  # relative to the output's scale: float32 rounding of a different summation order


class PrepackedLinear(nn.Linear):
    """An `nn.Linear` whose forward runs oneDNN over `packed_weight`, packed again when its weight has
    changed in place since (a loaded state dict, an adapter merged into it)."""

    packed_weight: torch.Tensor
    packed_version: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight._version != self.packed_version:
            _attach(self, _reordered(self.weight))
        return _onednn_linear(input, self.packed_weight, self.bias)

    def __deepcopy__(self, memo: dict[int, object]) -> nn.Linear:
        """A plain `nn.Linear` copy: oneDNN's packed tensors cannot be copied (copy.deepcopy of the model
        would fail), and whoever copies a layer may change its weights."""
        twin = nn.Linear(self.in_features, self.out_features, self.bias is not None, dtype=self.weight.dtype)
        twin.load_state_dict(self.state_dict())
        return twin.train(self.training)


def _reordered(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _onednn_linear(input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(input, packed, bias, "none", [], "")


def _attach(module: nn.Linear, packed: torch.Tensor) -> None:
    module.packed_weight, module.packed_version = packed, module.weight._version


def plain_float32_cpu_linear(module: nn.Module) -> bool:
    """Whether `module` is exactly an `nn.Linear` (not a quantized or adapter subclass) with a float32 weight
    on the CPU: the layers whose kernel this module and split_linear.py replace."""
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
    )


def _agrees(module: nn.Linear, packed: torch.Tensor) -> bool:
    probe = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
    expected = nn.functional.linear(probe, module.weight, module.bias)
    got = _onednn_linear(probe, packed, module.bias)
    return bool((got - expected).abs().max() <= AGREEMENT * expected.abs().max().clamp(min=1.0))


@torch.no_grad()
def prepack_linears(model: nn.Module) -> int:
    """Turns the model's float32 CPU `nn.Linear`s into PrepackedLinear in place; returns how many. Nothing
    changes where this torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for module in model.modules():
        if not plain_float32_cpu_linear(module):
            continue
        try:
            packed = _reordered(module.weight)
        except (RuntimeError, AttributeError) as error:  # this build's oneDNN cannot take the layer
            logger.info("linear layers keep sgemm", extra={"error": repr(error)})
            return count
        if not _agrees(module, packed):
            continue
        module.__class__ = PrepackedLinear
        _attach(module, packed)
        count += 1
    return count
