"""The running batch's KV cache in preallocated buffers, written in place.

transformers' DynamicCache grows by concatenation: every decoding step copies the whole cache of every
layer, and adding or removing a request rebuilds it. Here each layer keeps one buffer per keys and values,
(rows, heads, capacity, head_dim): a row per request, columns shared by all rows. Rows are left-padded to
a common end, so a step writes one column for all rows at once and attends over the used region
[start, end). A request joins by copying its prefill into a free row; one leaving hands its row to the
last row (one row copied, order does not matter); columns that only padding uses are dropped by moving
`start`. The buffers grow by doubling and the region is moved to the left edge when it reaches the end,
so copies are rare and every step's cost is the model's.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache


class _Region:
    """The rows in use and the columns [start, end) they span; shared by all layers of one cache."""

    def __init__(self) -> None:
        self.rows = 0
        self.start = 0
        self.end = 0

    @property
    def width(self) -> int:
        return self.end - self.start


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values; `update` writes the step's columns in place and returns views."""

    is_sliding = False

    def __init__(self, region: _Region, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.region, self.keys, self.values = region, keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("slot layers are allocated up front")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        region = self.region
        rows, start, end, new = region.rows, region.start, region.end, key_states.shape[2]
        self.keys[:rows, :, end : end + new] = key_states
        self.values[:rows, :, end : end + new] = value_states
        return self.keys[:rows, :, start : end + new], self.values[:rows, :, start : end + new]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.region.width + query_length, 0

    def get_seq_length(self) -> int:
        return self.region.width

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The batch's cache and attention mask (1 for real tokens); the engine owns row order."""

    def __init__(self, like: DynamicCache, max_rows: int) -> None:
        self.region = _Region()
        self.max_rows = max_rows
        first = like.layers[0].keys
        self.device = first.device
        # Per layer (heads, head_dim, dtype): models may differ between layers.
        self._shapes = [(layer.keys.shape[1], layer.keys.shape[3], layer.keys.dtype) for layer in like.layers]
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        super().__init__(layers=[self._layer(0, 0, shape) for shape in self._shapes])

    def _layer(self, rows: int, columns: int, shape: tuple[int, int, torch.dtype]) -> SlotLayer:
        heads, head_dim, dtype = shape
        size = (rows, heads, columns, head_dim)
        # Zeros, not empty: padded columns are masked out, but NaN garbage would still poison softmax.
        return SlotLayer(
            self.region,
            torch.zeros(size, dtype=dtype, device=self.device),
            torch.zeros(size, dtype=dtype, device=self.device),
        )

    @property
    def rows(self) -> int:
        return self.region.rows

    @property
    def width(self) -> int:
        return self.region.width

    # -- a decoding step ----------------------------------------------------------------------------
    def step_mask(self) -> torch.Tensor:
        """Makes room for one more column and returns the attention mask including it."""
        self._make_room(self.region.width, 1, self.region.rows)
        region = self.region
        self.mask[: region.rows, region.end] = 1
        return self.mask[: region.rows, region.start : region.end + 1]

    def advance(self, columns: int = 1) -> None:
        """Called after the forward that wrote `columns` new positions for every row."""
        self.region.end += columns

    # -- membership ---------------------------------------------------------------------------------
    def append(self, prefill: DynamicCache, mask: torch.Tensor) -> None:
        """Adds the rows of a prefill (left-padded; `mask` marks their real tokens) after the current ones."""
        added, length = mask.shape
        region = self.region
        self._make_room(max(region.width, length), 0, region.rows + added)
        region = self.region
        if length > region.width:  # older rows gain padding on the left: it must be masked out
            self.mask[: region.rows, region.end - length : region.start] = 0
            region.start = region.end - length
        first, last, left = region.rows, region.rows + added, region.end - length
        for layer, new in zip(self.layers, prefill.layers, strict=True):
            layer.keys[first:last, :, left : region.end] = new.keys
            layer.values[first:last, :, left : region.end] = new.values
        self.mask[first:last, region.start : left] = 0
        self.mask[first:last, left : region.end] = mask
        region.rows = last

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
            region.start = region.end = 0
        else:
            used = self.mask[: region.rows, region.start : region.end].any(dim=0)
            region.start += int(torch.nonzero(used)[0].item())  # drop columns only padding uses
        return moves

    def _copy_row(self, source: int, target: int) -> None:
        start, end = self.region.start, self.region.end
        for layer in self.layers:
            layer.keys[target, :, start:end] = layer.keys[source, :, start:end]
            layer.values[target, :, start:end] = layer.values[source, :, start:end]
        self.mask[target, start:end] = self.mask[source, start:end]

    # -- capacity -----------------------------------------------------------------------------------
    def _make_room(self, left: int, right: int, rows: int) -> None:
        """Ensures `left` columns before `end`, `right` after it and `rows` rows; moves or grows rarely."""
        region = self.region
        columns, row_capacity = self.mask.shape[1], self.mask.shape[0]
        if region.end - left >= 0 and region.end + right <= columns and rows <= row_capacity:
            return
        new_rows = row_capacity if rows <= row_capacity else min(max(rows, 2 * row_capacity), self.max_rows)
        new_rows = max(new_rows, rows)
        # Twice what is needed, so the region reaches the edge again only after as many steps as it is wide.
        new_columns = max(columns, 2 * (left + right) + 16)
        new_end = left
        new_start = new_end - region.width
        old_start, old_end, used = region.start, region.end, region.rows
        for index, (layer, shape) in enumerate(zip(self.layers, self._shapes, strict=True)):
            fresh = self._layer(new_rows, new_columns, shape)
            fresh.keys[:used, :, new_start:new_end] = layer.keys[:used, :, old_start:old_end]
            fresh.values[:used, :, new_start:new_end] = layer.values[:used, :, old_start:old_end]
            self.layers[index] = fresh
        mask = torch.zeros((new_rows, new_columns), dtype=self.mask.dtype, device=self.device)
        mask[:used, new_start:new_end] = self.mask[:used, old_start:old_end]
        self.mask = mask
        region.start, region.end = new_start, new_end
