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

import logging
from collections.abc import Sequence

import torch

from llm_server.engine.kv_blocks import BlockHash, BlockPool, BlockTable, CacheFull, block_hashes
from llm_server.engine.slots import SlotCache

DEFAULT_BLOCK_SIZE = 16  # vLLM's default --block-size

logger = logging.getLogger(__name__)


class PrefixCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int) -> None:
        self.blocks = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        # Allocated at the first store: shapes, dtype and devices come from the slot cache's layers.
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self.disabled = False  # its store could not be allocated: prompts are computed whole from then on

    @property
    def queried_tokens(self) -> int:
        return self.blocks.queried_tokens

    @property
    def hit_tokens(self) -> int:
        return self.blocks.hit_tokens

    def hashes(self, token_ids: Sequence[int], adapter: str) -> list[BlockHash]:
        """The prompt's block hashes; `adapter` names the exact adapter weights (never reused for others)."""
        return block_hashes(token_ids, self.block_size, adapter)

    def cached_prefix(self, token_ids: Sequence[int], adapter: str, hashes: Sequence[BlockHash]) -> int:
        """Leading tokens that would come from the cache; `hashes` are `hashes(token_ids, adapter)`."""
        return self.blocks.cached_prefix(token_ids, adapter, hashes)

    def admit(self, token_ids: Sequence[int], adapter: str, hashes: Sequence[BlockHash]) -> BlockTable | None:
        """Blocks for a joining prompt: its cached leading blocks (`cached_tokens` of it) and free ones for
        the rest, which `store` fills once the prompt is in the slot cache. None when the pool cannot hold
        it: the prompt is then computed whole and not cached (looked up all the same, for the metrics)."""
        try:
            # The table hashes the blocks it fills with `adapter`, as `hashes` were.
            return self.blocks.admit(token_ids, adapter, reserve=0, hashes=hashes)
        except CacheFull:
            self.blocks.queried_tokens += len(token_ids)
            return None

    def store_history(
        self,
        cache: SlotCache,
        token_ids: Sequence[int],
        adapter: str,
        prompt_hashes: Sequence[BlockHash],
        row: int,
        column: int,
    ) -> None:
        """A finished request's tokens in the slot cache (its prompt and what it generated, `row` from
        absolute `column` on): stores their full blocks past those already cached, so the next turn of a
        conversation, which resends them, finds its previous answer too (as vLLM). Not a query.
        `prompt_hashes`: its prompt's, which the chain continues from."""
        known = len(prompt_hashes)
        parent = prompt_hashes[-1] if known else None
        rest = block_hashes(token_ids[known * self.block_size :], self.block_size, adapter, parent)
        try:
            table = self.blocks.admit(
                token_ids, adapter, reserve=0, hashes=[*prompt_hashes, *rest], counted=False
            )
        except CacheFull:
            return
        self.store(cache, table, token_ids, row, column)

    def load(self, cache: SlotCache, table: BlockTable, row: int, column: int) -> None:
        """Copies the table's cached blocks into `row` of the slot cache, from absolute `column` on."""
        count = table.cached_tokens // self.block_size
        if count == 0:
            return
        width = count * self.block_size
        ids = torch.tensor(table.blocks[:count], device=cache.layers[0].keys.device)  # type: ignore[union-attr]
        for index, layer in enumerate(cache.layers):
            pool_keys, pool_values = self._keys[index], self._values[index]
            assert pool_keys is not None and pool_values is not None, "a hit implies an earlier store"
            assert layer.keys is not None and layer.values is not None
            blocks = ids.to(pool_keys.device)  # a no-op but where layers live on several devices
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
        if full > cached and not self._allocated(cache):
            self.blocks.release(table)
            return
        if full > cached:
            ids = torch.tensor(table.blocks[cached:full], device=cache.layers[0].keys.device)  # type: ignore[union-attr]
            for index, layer in enumerate(cache.layers):
                assert layer.keys is not None and layer.values is not None
                blocks = ids.to(layer.keys.device)
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

    def _allocated(self, cache: SlotCache) -> bool:
        """Allocates the store at its first use, shaped as the slot cache's layers and on their devices.
        Where that memory is not there (a GPU the model and the batch fill) caching turns off for good,
        and the step goes on: a cache must not fail requests."""
        if self.disabled:
            return False
        if all(keys is not None for keys in self._keys):
            return True
        try:
            pools = []
            for layer in cache.layers:
                assert layer.keys is not None
                _, heads, _, dim = layer.keys.shape
                size = (self.blocks.num_blocks, heads, self.block_size, dim)
                # Empty, not zeros: a block is read only after a store wrote all of it.
                like = {"dtype": layer.keys.dtype, "device": layer.keys.device}
                pools.append((torch.empty(size, **like), torch.empty(size, **like)))
        except RuntimeError as error:  # torch.OutOfMemoryError among them
            self.disabled = True
            logger.warning(
                "prefix caching turned off: its store of %d blocks could not be allocated (%s)",
                self.blocks.num_blocks,
                type(error).__name__,
            )
            return False
        self._keys = [keys for keys, _ in pools]
        self._values = [values for _, values in pools]
        return True
