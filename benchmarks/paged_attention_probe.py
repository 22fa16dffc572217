"""Decode attention over a paged KV cache on this machine (issue 17), one layer of `make bench`'s model shape
(8 heads of 64), 32 rows of 64-200 cached tokens, blocks of 16 scattered in a pool:

- view: today's layout (engine/slots.py), rows ending at a common column, one SDPA with a padding mask;
- gather: the rows' blocks copied out of the pool by their block tables (index_select), then SDPA;
- flex: torch's flex_attention (compiled) reading the pool in place, a batch per row, its block mask made
  of the row's blocks (16-token KV blocks), so a row reads its own tokens only.

Not in CI; prints ms per layer and whether the paged results equal the view's.

    python -m benchmarks.paged_attention_probe
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from benchmarks.serving_bench import ms_per_call

ROWS, HEADS, HEAD_DIM, BLOCK = 32, 8, 64, 16
REPS, WARM_UP = 200, 10


def main() -> int:
    torch.manual_seed(0)
    lengths = torch.randint(64, 200, (ROWS,))
    blocks_per_row = (lengths + BLOCK - 1) // BLOCK
    most, total = int(blocks_per_row.max()), int(blocks_per_row.sum())
    query = torch.randn(ROWS, HEADS, 1, HEAD_DIM)
    pool_k, pool_v = (torch.randn(total, BLOCK, HEADS, HEAD_DIM) for _ in range(2))
    tables = torch.zeros(ROWS, most, dtype=torch.long)  # unused entries point at block 0, masked out
    owner, first_position = torch.zeros(total, dtype=torch.long), torch.zeros(total, dtype=torch.long)
    order, taken = torch.randperm(total), 0
    for row in range(ROWS):
        count = int(blocks_per_row[row])
        mine = order[taken : taken + count]
        tables[row, :count], owner[mine], first_position[mine] = mine, row, torch.arange(count) * BLOCK
        taken += count
    valid = (torch.arange(most * BLOCK)[None, :] < lengths[:, None])[:, None, None, :]

    def gathered(pool: torch.Tensor) -> torch.Tensor:
        return (
            pool.index_select(0, tables.reshape(-1)).view(ROWS, most * BLOCK, HEADS, HEAD_DIM).transpose(1, 2)
        )

    # The view: the same keys and values, contiguous, right-aligned as slots.py keeps them.
    width = int(lengths.max())
    view_k, view_v = (torch.zeros(ROWS, HEADS, width, HEAD_DIM) for _ in range(2))
    padding = torch.zeros(ROWS, 1, 1, width, dtype=torch.bool)
    rows_k, rows_v = gathered(pool_k), gathered(pool_v)
    for row in range(ROWS):
        length = int(lengths[row])
        view_k[row, :, width - length :] = rows_k[row, :, :length]
        view_v[row, :, width - length :] = rows_v[row, :, :length]
        padding[row, ..., width - length :] = True

    flat_k, flat_v = (
        pool.reshape(1, total * BLOCK, HEADS, HEAD_DIM).transpose(1, 2) for pool in (pool_k, pool_v)
    )

    def own_tokens(
        batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        block = kv // BLOCK
        return (owner[block] == batch) & (first_position[block] + kv % BLOCK < lengths[batch])

    block_mask = create_block_mask(
        own_tokens, ROWS, None, 1, total * BLOCK, device="cpu", BLOCK_SIZE=(1, BLOCK)
    )
    flex = torch.compile(flex_attention)
    keys, values = flat_k.expand(ROWS, -1, -1, -1), flat_v.expand(ROWS, -1, -1, -1)
    with torch.inference_mode():
        reference = F.scaled_dot_product_attention(query, view_k, view_v, attn_mask=padding)
        paged = F.scaled_dot_product_attention(query, gathered(pool_k), gathered(pool_v), attn_mask=valid)
        flexed = flex(query, keys, values, block_mask=block_mask)
        view_ms = ms_per_call(
            lambda: F.scaled_dot_product_attention(query, view_k, view_v, attn_mask=padding), REPS, WARM_UP
        )
        gather_ms = ms_per_call(
            lambda: F.scaled_dot_product_attention(
                query, gathered(pool_k), gathered(pool_v), attn_mask=valid
            ),
            REPS,
            WARM_UP,
        )
        flex_ms = ms_per_call(lambda: flex(query, keys, values, block_mask=block_mask), REPS, WARM_UP)
    mean = float(lengths.float().mean())
    print(f"{ROWS} rows of {int(lengths.min())}-{width} tokens (mean {mean:.0f}), blocks of {BLOCK}")
    print(f"view:   {view_ms:.3f} ms a layer")
    print(f"gather: {gather_ms:.3f} ms a layer, equal: {torch.allclose(paged, reference, atol=1e-5)}")
    print(f"flex:   {flex_ms:.3f} ms a layer, equal: {torch.allclose(flexed, reference, atol=1e-4)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
