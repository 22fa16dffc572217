"""The pure pieces of the pooling engine: how many inputs one forward takes, padding them into one batch or
packing several into each row, sentence-transformers' pooling modes over the token states, and the activations
after the forward."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from llm_server.engine.interface import PoolInput
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


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """The inputs' indices grouped into rows of at most `width` tokens, first fit, longest first (an input
    longer than `width` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([index])
            room.append(width - lengths[index])
        else:
            rows[row].append(index)
            room[row] -= lengths[index]
    return rows


def packed_batch(
    inputs: Sequence[PoolInput], pad_id: int, token_types: bool, dtype: torch.dtype, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The model's keyword arguments with several inputs in each row as wide as the longest, as if each ran
    alone: positions restart at 0 for each input, and a block-diagonal attention mask (additive, rows x 1 x
    width x width) keeps each input's tokens to its own; the padding at a row's end attends only to itself.
    Also where each input's tokens land in the flattened output (inputs x longest, an index into rows x width)
    and their mask, for `unpack`."""
    lengths = [len(item.token_ids) for item in inputs]
    # Wider rows would pack tighter but pay more attention: on 8-64 token inputs, rows as wide as the longest
    # ran 4-25% faster than 128-wide ones.
    width = max(lengths)
    rows = pack_rows(lengths, width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    where = torch.zeros((len(inputs), max(lengths)), dtype=torch.long)
    token_mask = torch.zeros((len(inputs), max(lengths)), dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            item, length = inputs[index], lengths[index]
            span = slice(start, start + length)
            ids[row, span] = torch.tensor(item.token_ids, dtype=torch.long)
            positions[row, span] = torch.arange(length)
            if item.token_type_ids is not None:
                types[row, span] = torch.tensor(item.token_type_ids, dtype=torch.long)
            segment[row, span] = index
            where[index, :length] = torch.arange(row * width + start, row * width + start + length)
            token_mask[index, :length] = 1
            start += length
    own = (segment.unsqueeze(2) == segment.unsqueeze(1)) & (segment.unsqueeze(2) >= 0)
    own |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros((len(rows), 1, width, width), dtype=dtype)
    mask.masked_fill_(~own.unsqueeze(1), torch.finfo(dtype).min)
    batch = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
    if token_types:
        batch["token_type_ids"] = types
    return {name: tensor.to(device) for name, tensor in batch.items()}, where, token_mask


def unpack(hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Packed token states (rows, width, hidden) back to one row per input (inputs, longest, hidden), by
    `packed_batch`'s index; an input's padding repeats the batch's first state, which its mask hides."""
    return hidden.reshape(-1, hidden.shape[-1])[where.to(hidden.device)]


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
