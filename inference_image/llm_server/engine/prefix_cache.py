"""Automatic prefix caching over the running batch's slot cache: a prompt's full blocks of keys and values
are kept after its prefill, addressed by content (kv_blocks.py: the tokens, everything before them and the
adapter), and a later prompt that starts with them gets them copied into its row instead of computing them.

The batch's cache is rows ending at a common column (slots.py), so blocks cannot be shared in place: the
store is a pool of its own per layer, (blocks, kv_heads, block_size, head_dim), written by copy when a
prompt's prefill ends and read by copy when a prompt that starts the same way joins. A copy of a block costs
microseconds; computing it costs its tokens' share of a forward. Nothing is held across steps except by a
prompt still being prefilled in chunks, so the pool is a cache only: blocks no prompt is being written into
stay findable until the pool needs them, least recently released first (kv_blocks.BlockPool).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm_server.engine.kv_blocks import BlockPool, BlockTable, CacheFull
from llm_server.engine.slots import SlotCache

DEFAULT_BLOCK_SIZE = 16  # vLLM's default --block-size


class PrefixCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int) -> None:
        self.blocks = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        # Allocated at the first store: shapes, dtype and devices come from the slot cache's layers.
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def queried_tokens(self) -> int:
        return self.blocks.queried_tokens

    @property
    def hit_tokens(self) -> int:
        return self.blocks.hit_tokens

    def cached_prefix(self, token_ids: Sequence[int], adapter: str | None) -> int:
        """Leading tokens that would come from the cache (at least the last token is always computed)."""
        cached = self.blocks.cached_prefix(token_ids, adapter)
        return cached - self.block_size if cached >= len(token_ids) else cached

    def admit(self, token_ids: Sequence[int], adapter: str | None) -> BlockTable | None:
        """Blocks for a joining prompt: its cached leading blocks (`cached_tokens` of it) and free ones for
        the rest, which `store` fills once the prompt is in the slot cache. None when the pool cannot hold
        it: the prompt is then computed and not cached."""
        try:
            return self.blocks.admit(token_ids, adapter, reserve=0)
        except CacheFull:
            return None

    def load(self, cache: SlotCache, table: BlockTable, row: int, column: int) -> None:
        """Copies the table's cached blocks into `row` of the slot cache, from absolute `column` on."""
        count = table.cached_tokens // self.block_size
        if count == 0:
            return
        width = count * self.block_size
        for index, layer in enumerate(cache.layers):
            pool_keys, pool_values = self._keys[index], self._values[index]
            assert pool_keys is not None and pool_values is not None, "a hit implies an earlier store"
            assert layer.keys is not None and layer.values is not None
            blocks = torch.tensor(table.blocks[:count], device=pool_keys.device)
            for pool, buffer in ((pool_keys, layer.keys), (pool_values, layer.values)):
                # (blocks, heads, block_size, dim) -> (heads, blocks x block_size, dim)
                taken = pool.index_select(0, blocks).transpose(0, 1).flatten(1, 2)
                buffer[row, :, column : column + width] = taken

    def store(
        self, cache: SlotCache, table: BlockTable, token_ids: Sequence[int], row: int, column: int
    ) -> None:
        """The prompt `token_ids` is in `row` of the slot cache from absolute `column` on: copies its full
        blocks past the cached ones into the table's blocks, makes them findable and releases the table."""
        cached = table.cached_tokens // self.block_size
        full = len(token_ids) // self.block_size
        if full > cached:
            for index, layer in enumerate(cache.layers):
                assert layer.keys is not None and layer.values is not None
                if self._keys[index] is None:
                    self._allocate(index, layer.keys)
                blocks = torch.tensor(table.blocks[cached:full], device=layer.keys.device)
                start, end = column + cached * self.block_size, column + full * self.block_size
                for pool, buffer in ((self._keys[index], layer.keys), (self._values[index], layer.values)):
                    assert pool is not None
                    heads, dim = buffer.shape[1], buffer.shape[3]
                    written = buffer[row, :, start:end].reshape(heads, full - cached, self.block_size, dim)
                    pool.index_copy_(0, blocks, written.transpose(0, 1))
        self.blocks.write(table, token_ids[table.cached_tokens :])  # within its blocks: cannot run out
        self.blocks.release(table)

    def release(self, table: BlockTable) -> None:
        """A prompt that will not be stored (its request ended first, or its step failed)."""
        self.blocks.release(table)

    def _allocate(self, index: int, like: torch.Tensor) -> None:
        # Empty, not zeros: a block is read only after a store wrote all of it.
        _, heads, _, dim = like.shape
        size = (self.blocks.num_blocks, heads, self.block_size, dim)
        self._keys[index] = torch.empty(size, dtype=like.dtype, device=like.device)
        self._values[index] = torch.empty(size, dtype=like.dtype, device=like.device)
