"""Which LoRA adapter each row of a forward uses, without peft's per-call hook set-up.

peft mixes adapters in one batch when a forward is given `adapter_names`: it then walks every module
twice and registers, then removes, a pre-hook on every LoRA layer, about 2 ms per forward on this CPU (a
quarter of a one-request decoding step). Here one pre-hook per LoRA layer is registered when adapters
change, and hands the names of the step being run to the same peft code path (the layers' mixed-batch
forward). Outside `RowAdapters.selecting` the hooks do nothing, so peft's own `adapter_names` still works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper


class RowAdapters:
    def __init__(self) -> None:
        self._names: list[str] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, model: Any) -> None:
        """(Re)registers the hooks on `model`'s current LoRA layers; None or a plain model: none."""
        for handle in self._handles:
            handle.remove()
        self._handles = [
            module.register_forward_pre_hook(self._inject, with_kwargs=True)
            for module in (model.modules() if model is not None else ())
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper))
        ]

    @contextlib.contextmanager
    def selecting(self, names: list[str]) -> Iterator[None]:
        """Forwards inside use adapter `names[i]` for row i (peft's "__base__" for none)."""
        self._names = names
        try:
            yield
        finally:
            self._names = None

    def _inject(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._names is None:
            return None
        return args, {**kwargs, "adapter_names": self._names}
