"""Linear layers whose few-row products run on every CPU thread: the decode step's.

MKL's sgemm runs a product of a few rows on one thread, so a decode step streams the weights from memory at
one core's bandwidth: on the 2-core bench machine the bench model's 56 linear layers took 8.8 ms at one row
with one thread or two. A batched GEMM over slices of the weight's output features runs the slices side by
side on all threads (torch's bmm over a view: no copy of the weight): 5.2 ms. From a few hundred rows
(prefill) sgemm parallelizes by itself and is as fast or faster, so larger inputs keep it.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_server.engine.prepacked import plain_float32_cpu_linear

SPLIT_ROWS = 128  # bench machine, 56 layers: 128 rows 50.2 ms sgemm vs 47.4 split; 256 rows: equal
SLICES_PER_THREAD = 2  # 4 slices on 2 threads: 10.8 ms a one-row step vs 11.5 with 2 (bench model)


class SplitLinear(nn.Linear):
    """An `nn.Linear` (state dict, peft wrapping, in-place weight changes: all unchanged) whose inputs of at
    most SPLIT_ROWS rows are multiplied slice by slice of its output features, one slice per GEMM of a bmm."""

    slices: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        outputs, features = self.weight.shape
        rows = input.numel() // features if features else 0
        if rows > SPLIT_ROWS or rows == 0:
            return nn.functional.linear(input, self.weight, self.bias)
        slices = self.weight.view(self.slices, outputs // self.slices, features).transpose(1, 2)
        flat = input.reshape(1, rows, features).expand(self.slices, rows, features)
        output = torch.bmm(flat, slices).transpose(0, 1).reshape(*input.shape[:-1], outputs)
        return output if self.bias is None else output + self.bias


def split_linears(model: nn.Module, threads: int | None = None) -> int:
    """Turns the model's float32 CPU `nn.Linear`s whose output features divide into slices for `threads`
    (default: torch's) into SplitLinear in place; returns how many. Nothing changes on one thread."""
    threads = threads or torch.get_num_threads()
    if threads < 2:
        return 0
    slices = SLICES_PER_THREAD * threads
    count = 0
    for module in model.modules():
        # float32: the one measured; contiguous: the slices are a view of the weight
        if (
            plain_float32_cpu_linear(module)
            and module.weight.is_contiguous()
            and module.out_features % slices == 0
        ):
            module.__class__ = SplitLinear
            module.slices = slices
            count += 1
    return count
