"""Which KV cache blocks each request holds (paged attention's block tables) and which full blocks can be
shared between requests (automatic prefix caching, as vLLM's): bookkeeping only, no tensors.

The cache is `num_blocks` blocks of `block_size` token positions. A request holds a block table: the blocks
of its positions in order. A full block is content-addressed by a hash of its tokens, of the hash of the
block before it (so equal blocks after different prefixes differ) and of the adapter (a LoRA changes the
keys and values). A request whose prompt starts with blocks already cached takes them (reference counted)
instead of computing them again. A block no request holds keeps its contents and stays findable by its hash
until the pool needs it for something else: free blocks are reused least recently released first, uncached
ones before cached ones.

Every change is all or nothing: a request that does not fit takes no block and changes no count.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes


def block_hashes(
    token_ids: Sequence[int], block_size: int, adapter: str | None, parent: BlockHash | None = None
) -> list[BlockHash]:
    """The chained hashes of the full blocks of `token_ids` (a partial last block has none), starting after
    a block whose hash is `parent`. SHA-256, as vLLM's default: one user must not be able to craft a
    prompt whose block collides with another's."""
    hashes = []
    seed = hashlib.sha256(b"adapter\0" + (adapter or "").encode()).digest()
    previous = parent if parent is not None else seed
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = token_ids[start : start + block_size]
        digest = hashlib.sha256(previous + seed + struct.pack(f"<{block_size}q", *tokens)).digest()
        hashes.append(digest)
        previous = digest
    return hashes


class CacheFull(Exception):
    """Not enough free blocks for the request: nothing was taken."""


@dataclasses.dataclass
class BlockTable:
    """The blocks one request holds, in position order, and how many of its positions are written."""

    adapter: str | None
    blocks: list[int] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)  # the tokens of its positions so far
    hashes: list[BlockHash] = dataclasses.field(default_factory=list)  # of its full blocks, in order
    cached_tokens: int = 0  # positions found in the cache when it was admitted (not computed again)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the cache needs at least one block of at least one position")
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, BlockHash] = {}  # cached blocks: id -> hash
        self._by_hash: dict[BlockHash, int] = {}
        # Blocks no request holds, least recently released first; those with a hash can still be hit.
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self.queried_tokens = 0  # prompt tokens looked up (vllm:prefix_cache_queries_total)
        self.hit_tokens = 0  # of which found cached (vllm:prefix_cache_hits_total)

    # -- what the scheduler and the metrics read ---------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """The share of blocks some request holds (vllm:kv_cache_usage_perc)."""
        return 1 - len(self._free) / self.num_blocks

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def cached_prefix(
        self, token_ids: Sequence[int], adapter: str | None, hashes: Sequence[BlockHash] | None = None
    ) -> int:
        """How many leading tokens of `token_ids` `admit` would take from cached blocks now (no change to
        the pool); `hashes`: its block_hashes when the caller has them already."""
        if hashes is None:
            hashes = block_hashes(token_ids, self.block_size, adapter)
        return len(self._hits(hashes, len(token_ids))) * self.block_size

    # -- a request's life ----------------------------------------------------------------------------
    def admit(
        self,
        prompt: Sequence[int],
        adapter: str | None,
        reserve: int,
        hashes: Sequence[BlockHash] | None = None,
        counted: bool = True,
    ) -> BlockTable:
        """Blocks for `prompt` plus `reserve` positions beyond it: the cached full blocks its prompt starts
        with, new ones for the rest. At least the prompt's last token is computed, even when every block is
        cached, since its logits give the first output token. Raises CacheFull, taking nothing. Not
        `counted`: a lookup that is no prompt's (a finished request's own tokens, to store them)."""
        if hashes is None:
            hashes = block_hashes(prompt, self.block_size, adapter)
        hits = self._hits(hashes, len(prompt))
        needed = self.blocks_for(len(prompt) + reserve) - len(hits)
        reusable = sum(1 for block in hits if self._refs[block] == 0)  # in the free list now
        if needed > len(self._free) - reusable:
            raise CacheFull(f"{needed} blocks needed, {len(self._free) - reusable} free")
        if counted:
            self.queried_tokens += len(prompt)
            self.hit_tokens += len(hits) * self.block_size
        table = BlockTable(adapter, cached_tokens=len(hits) * self.block_size)
        for block in hits:
            self._hold(block)
        table.blocks = hits + [self._take_free() for _ in range(needed)]
        table.tokens = list(prompt[: table.cached_tokens])
        table.hashes = list(hashes[: len(hits)])
        return table

    def write(self, table: BlockTable, token_ids: Sequence[int]) -> None:
        """Record that `token_ids` were written at the table's next positions (a prompt's computed part, or
        generated tokens), growing the table when they pass its blocks, and make the blocks they filled
        findable. Raises CacheFull, changing nothing, when it must grow and cannot."""
        grow = self.blocks_for(len(table.tokens) + len(token_ids)) - len(table.blocks)
        if grow > len(self._free):
            raise CacheFull(f"{grow} blocks needed, {len(self._free)} free")
        table.blocks += [self._take_free() for _ in range(max(grow, 0))]
        table.tokens += token_ids
        full = len(table.tokens) // self.block_size
        if full > len(table.hashes):
            start = len(table.hashes) * self.block_size
            parent = table.hashes[-1] if table.hashes else None
            new = block_hashes(
                table.tokens[start : full * self.block_size], self.block_size, table.adapter, parent
            )
            for index, digest in enumerate(new, start=len(table.hashes)):
                self._publish(table.blocks[index], digest)
            table.hashes += new

    def release(self, table: BlockTable) -> None:
        """The request ended (finished, cancelled, failed): its blocks go back, last ones first so that a
        prompt's first blocks, the likeliest shared, are the last to be reused."""
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if block not in self._hash_of:
                    self._free.move_to_end(block, last=False)  # nothing to hit: reuse it first
        table.blocks = []

    # -- internals ---------------------------------------------------------------------------------------
    def _hits(self, hashes: Sequence[BlockHash], length: int) -> list[int]:
        """The cached leading blocks of a `length`-token sequence, short of its last token: that one is
        always computed, since its logits give the first output token."""
        if not self.caching:
            return []
        hits = []
        for digest in hashes:
            block = self._by_hash.get(digest)
            if block is None:
                break
            hits.append(block)
        return hits[:-1] if len(hits) * self.block_size >= length else hits

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        digest = self._hash_of.pop(block, None)  # evicted: its contents are about to be overwritten
        if digest is not None:
            del self._by_hash[digest]
        self._refs[block] = 1
        return block

    def _publish(self, block: int, digest: BlockHash) -> None:
        if not self.caching or digest in self._by_hash:  # an equal block is already findable
            return
        self._hash_of[block] = digest
        self._by_hash[digest] = block
