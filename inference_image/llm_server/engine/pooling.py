"""The pure pieces of the pooling engine: how many inputs one forward takes, padding them into one batch or
packing them side by side into one row, sentence-transformers' pooling modes over the token states, and the
activations after the forward."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from llm_server.engine.interface import PoolInput
from llm_server.engine.ragged_attention import RaggedSpans
from llm_server.engine.tasks import Activation


def batch_rows(lengths: Iterable[int], max_rows: int, max_tokens: int, packed: bool = False) -> int:
    """How many of the inputs at the front (first come, first served) one forward takes: at most `max_rows`,
    and its tokens within `max_tokens`: rows x the longest when padded, their own tokens when packed. Always
    one at least: an input longer than the budget runs alone."""
    rows, longest, total = 0, 0, 0
    for length in lengths:
        widest, cost = max(longest, length), total + length
        if rows == max_rows or (rows and (cost if packed else (rows + 1) * widest) > max_tokens):
            break
        rows, longest, total = rows + 1, widest, cost
    return rows


def ragged_batch(
    inputs: Sequence[PoolInput], token_types: bool, device: torch.device
) -> tuple[dict[str, torch.Tensor], RaggedSpans]:
    """The model's keyword arguments with every input's tokens side by side in one row, positions restarting
    at 0 for each (ragged_attention.py keeps each input's attention to its own), and the inputs' spans."""
    ids = torch.tensor([token for item in inputs for token in item.token_ids], dtype=torch.long)
    positions = torch.cat([torch.arange(len(item.token_ids)) for item in inputs])
    batch = {"input_ids": ids[None], "position_ids": positions[None]}
    if token_types:
        types = [token for item in inputs for token in item.token_type_ids or (0,) * len(item.token_ids)]
        batch["token_type_ids"] = torch.tensor(types, dtype=torch.long)[None]
    spans = RaggedSpans(tuple(len(item.token_ids) for item in inputs))
    return {name: tensor.to(device) for name, tensor in batch.items()}, spans


def unragged(hidden: torch.Tensor, spans: RaggedSpans) -> tuple[torch.Tensor, torch.Tensor]:
    """A ragged forward's token states (1, tokens, hidden) as one right-padded row per input (inputs,
    longest, hidden), and their mask, for `pool_tokens`."""
    rows = pad_sequence(list(hidden[0].split(list(spans.lengths))), batch_first=True)
    lengths = torch.tensor(spans.lengths, device=hidden.device)
    mask = (torch.arange(rows.shape[1], device=hidden.device)[None, :] < lengths[:, None]).long()
    return rows, mask


def pad_batch(
    inputs: Sequence[PoolInput], pad_id: int, token_types: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for `inputs`, right-padded to the longest: positions stay 0..n-1 for
    every row, and the attention mask hides the padding from attention and pooling."""
    width = max(len(item.token_ids) for item in inputs)
    ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    types = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, item in enumerate(inputs):
        length = len(item.token_ids)
        ids[row, :length] = torch.tensor(item.token_ids, dtype=torch.long)
        mask[row, :length] = 1
        if item.token_type_ids is not None:
            types[row, :length] = torch.tensor(item.token_type_ids, dtype=torch.long)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if token_types:
        batch["token_type_ids"] = types.to(device)
    return batch


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """sentence-transformers' Pooling module: each mode over the unmasked tokens of each row, concatenated
    in `modes` order; in float32 whatever the model's dtype."""
    hidden = hidden.float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (rows, tokens, 1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    pooled = []
    for mode in modes:
        if mode == "cls":
            pooled.append(_gather(hidden, mask.argmax(dim=1)))  # the first unmasked token
        elif mode == "lasttoken":
            pooled.append(_gather(hidden, mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)))
        elif mode == "max":
            pooled.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode == "mean":
            pooled.append((hidden * weights).sum(dim=1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            pooled.append((hidden * weights).sum(dim=1) / counts.sqrt())
        elif mode == "weightedmean":  # token i of a row weighs i (from 1)
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
            weighted = weights * positions.view(1, -1, 1)
            pooled.append((hidden * weighted).sum(dim=1) / weighted.sum(dim=1).clamp(min=1e-9))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(pooled, dim=-1)


def _gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]


def finish_embedding(vector: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka's shortening first, then the model's Normalize module (as vLLM: a shortened vector is
    unit length again)."""
    if dimensions is not None:
        vector = vector[..., :dimensions]
    return F.normalize(vector, p=2, dim=-1) if normalize else vector


def activate(activation: Activation, logits: torch.Tensor) -> torch.Tensor:
    if activation == "softmax":
        return logits.softmax(dim=-1)
    if activation == "sigmoid":
        return logits.sigmoid()
    if activation == "tanh":
        return logits.tanh()
    return logits
