"""The running batch's KV cache in preallocated buffers, written in place.

transformers' DynamicCache grows by concatenation: every decoding step copies the whole cache of every
layer, and adding or removing a request rebuilds it. Here each layer keeps one buffer per keys and values,
(rows, heads, capacity, head_dim): a row per request, columns shared by all rows. Rows end at a common
column: a step writes the next column for every decoding row and a newcomer's whole prompt into the
columns that end there (attention.py's plan says which token goes where), and attention reads the used
region [start, end). One leaving hands its row to the last row (one row copied, order does not matter);
columns that only padding uses are dropped by moving `start`. When the region reaches the buffers' end it
moves back to the left edge in place (only the used rows' region is copied); the buffers grow (doubling)
only past their high-water mark, so every step's cost is the model's.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from llm_server.engine.attention import Prefill, StepPlan


@dataclasses.dataclass(frozen=True)
class PromptPart:
    """A prompt to prefill in a step: `done` of its `length` tokens are in the cache already, and it
    takes `chunk` tokens per step (its length or more: all at once)."""

    length: int
    done: int = 0
    chunk: int = 0  # 0: all at once

    @property
    def remaining(self) -> int:
        return self.length - self.done

    @property
    def step_tokens(self) -> int:
        return min(self.chunk or self.remaining, self.remaining)

    @property
    def steps_left(self) -> int:
        """Steps to the end of the prompt, this one included."""
        return -(-self.remaining // (self.chunk or self.remaining))


class _Region:
    """The rows in use, the columns [start, end) they span and the step being written; shared by layers."""

    def __init__(self) -> None:
        self.rows = 0
        self.start = 0
        self.end = 0
        self.step: StepPlan | None = None

    @property
    def width(self) -> int:
        return self.end - self.start


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values; `update` writes the step's tokens in place and returns the region."""

    is_sliding = False

    def __init__(self, cache: SlotCache) -> None:
        super().__init__()
        self.cache, self.region = cache, cache.region
        self.keys: torch.Tensor | None = None  # allocated on the first write: its shape comes from the model
        self.values: torch.Tensor | None = None
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("slot layers allocate in update")

    def allocate(
        self, rows: int, columns: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        # Zeros, not empty: padded columns are masked out, but NaN garbage would still poison softmax.
        # On the layer's own device: with several GPUs (device_map="auto") layers live on different ones.
        size = (rows, heads, columns, head_dim)
        self.keys = torch.zeros(size, dtype=dtype, device=device)
        self.values = torch.zeros(size, dtype=dtype, device=device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states: (tokens, heads, 1, head_dim), the step's tokens in its plan's order."""
        region, step = self.region, self.region.step
        assert step is not None, "a slot cache is written through a step plan"
        if self.keys is None:
            rows, columns = self.cache.capacity
            _, heads, _, head_dim = key_states.shape
            self.allocate(rows, columns, heads, head_dim, key_states.dtype, key_states.device)
        assert self.keys is not None and self.values is not None
        column, decoding = region.end, step.decoding
        if decoding:
            self.keys[:decoding, :, column] = key_states[:decoding, :, 0]
            self.values[:decoding, :, column] = value_states[:decoding, :, 0]
        for prefill in step.prefills:
            tokens = slice(prefill.offset, prefill.offset + prefill.length)
            end = region.start + prefill.keys_to
            columns = slice(end - prefill.length, end)
            self.keys[prefill.row, :, columns] = key_states[tokens, :, 0].transpose(0, 1)
            self.values[prefill.row, :, columns] = value_states[tokens, :, 0].transpose(0, 1)
        used = slice(region.start, column + 1)
        return self.keys[: region.rows, :, used], self.values[: region.rows, :, used]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.region.width + query_length, 0

    def get_seq_length(self) -> int:
        return self.region.width

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The batch's cache and attention mask (True for real tokens); the engine owns row order."""

    def __init__(self, num_layers: int, max_rows: int, device: torch.device) -> None:
        self.region = _Region()
        self.max_rows = max_rows
        self.device = device
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=device)
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @property
    def rows(self) -> int:
        return self.region.rows

    @property
    def width(self) -> int:
        return self.region.width

    @property
    def capacity(self) -> tuple[int, int]:
        return self.mask.shape[0], self.mask.shape[1]

    # -- a step -------------------------------------------------------------------------------------
    def plan(self, prompts: list[PromptPart], continuing: bool = False) -> StepPlan:
        """Plans one step: every row decodes except the prompts being prefilled, which are `prompts`
        (new rows after the current ones; with `continuing`, the first is the last row's prompt, part-way
        in the cache). Makes room and returns the plan the forward writes and attends by; `advance` once
        that forward is done.

        A prompt split into chunks is placed so that its last chunk ends at the column of the step that
        writes it, where every decoding row's token goes: its columns are fixed by its length and the
        steps it still needs, so each chunk lands at or before the step's column."""
        region = self.region
        existing = region.rows
        decoding = existing - 1 if continuing else existing
        new = prompts[1:] if continuing else prompts
        # Columns a new prompt needs before the step's column (its last chunk ends steps_left - 1 later).
        before = [part.length - part.steps_left for part in new]
        self._make_room(max([region.width, *before]), 1, existing + len(new))
        region = self.region
        column = region.end
        earliest = column - max(before, default=0)
        if earliest < region.start:  # older rows gain padding on the left: masked out
            self.mask[:existing, earliest : region.start] = False
            region.start = earliest
        self.mask[:existing, column] = True  # decoding rows' token; a continuing prompt's span
        prefills, offset = [], decoding
        for index, part in enumerate(prompts):
            row = decoding + index
            final_column = column + part.steps_left - 1
            first = final_column - part.remaining + 1  # this chunk's first column
            if row >= existing:  # a new row: its whole prompt span is its (the rest is padding)
                start = final_column - part.length + 1
                self.mask[row, region.start : start] = False
                self.mask[row, start : column + 1] = True
            size = part.step_tokens
            prefills.append(
                Prefill(row, offset, size, part.done, first + size - region.start, size == part.remaining)
            )
            offset += size
        region.rows = existing + len(new)
        decode_mask = self.mask[:decoding, region.start : column + 1][:, None, None, :]
        region.step = StepPlan(decoding, tuple(prefills), decode_mask)
        return region.step

    def prompt_column(self, prefill: Prefill) -> int:
        """The buffers' column of the first token of the prompt `prefill` is part of (before its earlier
        chunks, or blocks copied in from the prefix cache): its prompt runs from there to `keys_to`."""
        return self.region.start + prefill.keys.start

    def advance(self) -> None:
        """Called after the forward that wrote the planned step."""
        self.region.end += 1
        self.region.step = None

    # -- membership ---------------------------------------------------------------------------------
    def remove(self, rows: list[int]) -> list[tuple[int, int]]:
        """Frees `rows`; returns the (from, to) moves the caller must mirror in its own row order."""
        region = self.region
        moves = []
        for row in sorted(rows, reverse=True):
            last = region.rows - 1
            if row != last:
                self._copy_row(last, row)
                moves.append((last, row))
            region.rows = last
        if region.rows == 0:
            self.clear()
        else:
            used = self.mask[: region.rows, region.start : region.end].any(dim=0)
            region.start += int(torch.nonzero(used)[0].item())  # drop columns only padding uses
        return moves

    def swap(self, first: int, second: int) -> None:
        """Exchanges two rows (keys, values and mask)."""
        start, end = self.region.start, self.region.end
        for layer in self._allocated():
            for buffer in (layer.keys, layer.values):
                kept = buffer[first, :, start:end].clone()  # type: ignore[index]
                buffer[first, :, start:end] = buffer[second, :, start:end]  # type: ignore[index]
                buffer[second, :, start:end] = kept  # type: ignore[index]
        kept_mask = self.mask[first, start:end].clone()
        self.mask[first, start:end] = self.mask[second, start:end]
        self.mask[second, start:end] = kept_mask

    def clear(self) -> None:
        self.region.rows = self.region.start = self.region.end = 0
        self.region.step = None

    def _copy_row(self, source: int, target: int) -> None:
        start, end = self.region.start, self.region.end
        for layer in self._allocated():
            layer.keys[target, :, start:end] = layer.keys[source, :, start:end]
            layer.values[target, :, start:end] = layer.values[source, :, start:end]
        self.mask[target, start:end] = self.mask[source, start:end]

    def _allocated(self) -> list[SlotLayer]:
        return [layer for layer in self.layers if layer.keys is not None]  # type: ignore[union-attr]

    # -- capacity -----------------------------------------------------------------------------------
    def _make_room(self, left: int, right: int, rows: int) -> None:
        """Ensures `left` columns before `end`, `right` after it and `rows` rows: usually nothing to do,
        else the region moves to `left` from the buffers' left edge (copying only the used rows' region),
        and only when the buffers are too small do they grow (twice what is needed)."""
        region = self.region
        row_capacity, columns = self.capacity
        if region.end - left >= 0 and region.end + right <= columns and rows <= row_capacity:
            return
        new_end = left
        new_start = new_end - region.width
        old, used = slice(region.start, region.end), region.rows
        if left + right <= columns and rows <= row_capacity:
            # A fresh allocation here would zero the whole capacity (gigabytes once a long prompt has
            # widened it): seconds of stall for every stream, each time the region reaches the edge.
            for buffer in self._buffers():
                buffer[:used, :, new_start:new_end] = buffer[:used, :, old].clone()
            self.mask[:used, new_start:new_end] = self.mask[:used, old].clone()
            region.start, region.end = new_start, new_end
            return
        new_rows = row_capacity if rows <= row_capacity else min(max(rows, 2 * row_capacity), self.max_rows)
        new_rows = max(new_rows, rows)
        # Twice what is needed, so the region reaches the edge again only after as many steps as it is wide.
        new_columns = max(columns, 2 * (left + right) + 16)
        for layer in self._allocated():
            old_keys, old_values = layer.keys, layer.values
            assert old_keys is not None and old_values is not None
            _, heads, _, head_dim = old_keys.shape
            layer.allocate(new_rows, new_columns, heads, head_dim, old_keys.dtype, old_keys.device)
            layer.keys[:used, :, new_start:new_end] = old_keys[:used, :, old]  # type: ignore[index]
            layer.values[:used, :, new_start:new_end] = old_values[:used, :, old]  # type: ignore[index]
        mask = torch.zeros((new_rows, new_columns), dtype=torch.bool, device=self.device)
        mask[:used, new_start:new_end] = self.mask[:used, old]
        self.mask = mask
        region.start, region.end = new_start, new_end

    def _buffers(self) -> list[torch.Tensor]:
        return [buffer for layer in self._allocated() for buffer in (layer.keys, layer.values)]  # type: ignore[misc]
