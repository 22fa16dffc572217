"""The KV cache's block bookkeeping (issue 17): block tables, content hashes chained over the prefix and the
adapter, sharing by reference count, least-recently-released eviction, all-or-nothing admission."""

import pytest

from llm_server.engine.kv_blocks import BlockPool, CacheFull, block_hashes

SYSTEM = list(range(100, 132))  # a 32-token shared system prompt: two blocks of 16


def test_hashes_cover_full_blocks_and_depend_on_everything_before_and_the_adapter() -> None:
    hashes = block_hashes([*SYSTEM, 1, 2, 3], 16, None)
    assert len(hashes) == 2  # the three tokens after the system prompt are no full block
    assert block_hashes(SYSTEM, 16, None) == hashes
    assert block_hashes([*SYSTEM[:16], *SYSTEM[:16]], 16, None)[1] != block_hashes(SYSTEM[:16], 16, None)[0]
    assert block_hashes(SYSTEM, 16, "sql-lora") != hashes  # a LoRA changes the keys and values
    continued = block_hashes(SYSTEM[16:], 16, None, parent=hashes[0])
    assert continued == hashes[1:]


def test_a_second_request_with_the_same_prefix_shares_its_blocks() -> None:
    pool = BlockPool(num_blocks=10, block_size=16)
    first = pool.admit([*SYSTEM, 7, 8], None, reserve=4)
    assert first.cached_tokens == 0 and len(first.blocks) == 3
    pool.write(first, [*SYSTEM, 7, 8])
    second = pool.admit([*SYSTEM, 9], None, reserve=4)
    assert second.cached_tokens == 32
    assert second.blocks[:2] == first.blocks[:2] and second.blocks[2] != first.blocks[2]
    assert pool.free_blocks == 10 - 4
    assert (pool.queried_tokens, pool.hit_tokens) == (34 + 33, 32)
    other_adapter = pool.admit([*SYSTEM, 9], "sql-lora", reserve=0)
    assert other_adapter.cached_tokens == 0


def test_a_fully_cached_prompt_still_computes_its_last_block_for_the_first_token() -> None:
    pool = BlockPool(num_blocks=8, block_size=16)
    first = pool.admit(SYSTEM, None, reserve=0)
    pool.write(first, SYSTEM)
    again = pool.admit(SYSTEM, None, reserve=1)
    assert again.cached_tokens == 16
    assert again.blocks[0] == first.blocks[0] and again.blocks[1] != first.blocks[1]


def test_released_blocks_stay_findable_until_needed_and_the_oldest_goes_first() -> None:
    pool = BlockPool(num_blocks=4, block_size=16)
    a = pool.admit(SYSTEM, None, reserve=0)
    pool.write(a, SYSTEM)
    pool.release(a)
    assert pool.usage == 0.0
    assert pool.cached_prefix([*SYSTEM, 1], None) == 32  # no request holds them; still cached
    b_prompt = list(range(500, 532))
    b = pool.admit(b_prompt, None, reserve=0)  # the two uncached blocks are reused first
    assert pool.cached_prefix([*SYSTEM, 1], None) == 32
    pool.write(b, b_prompt)
    pool.release(b)
    # One block: the least recently released, which is the system prompt's last (a chain's tail goes first).
    pool.admit(list(range(900, 916)), None, reserve=0)
    assert pool.cached_prefix([*SYSTEM, 1], None) == 16 and pool.cached_prefix([*b_prompt, 1], None) == 32


def test_a_request_that_does_not_fit_takes_nothing() -> None:
    pool = BlockPool(num_blocks=3, block_size=16)
    holder = pool.admit(SYSTEM, None, reserve=0)
    before = (pool.free_blocks, pool.queried_tokens, pool.hit_tokens)
    with pytest.raises(CacheFull):
        pool.admit(list(range(40)), None, reserve=0)  # three blocks, one free
    assert (pool.free_blocks, pool.queried_tokens, pool.hit_tokens) == before
    with pytest.raises(CacheFull):
        pool.write(holder, list(range(60)))  # four blocks: two more, one free
    assert holder.tokens == [] and len(holder.blocks) == 2 and pool.free_blocks == 1


def test_decoding_grows_the_table_a_block_at_a_time_and_release_frees_all() -> None:
    pool = BlockPool(num_blocks=6, block_size=4)
    table = pool.admit([1, 2, 3], None, reserve=0)
    pool.write(table, [1, 2, 3])
    assert len(table.blocks) == 1 and table.hashes == []
    pool.write(table, [4])  # fills the block: now findable
    assert len(table.hashes) == 1 and pool.cached_prefix([1, 2, 3, 4, 5], None) == 4
    pool.write(table, [5])
    assert len(table.blocks) == 2 and pool.usage == pytest.approx(2 / 6)
    pool.release(table)
    assert pool.free_blocks == 6 and table.blocks == []


def test_without_caching_nothing_is_shared() -> None:
    pool = BlockPool(num_blocks=8, block_size=16, caching=False)
    first = pool.admit([*SYSTEM, 1], None, reserve=0)
    pool.write(first, [*SYSTEM, 1])
    second = pool.admit([*SYSTEM, 1], None, reserve=0)
    assert second.cached_tokens == 0 and not set(first.blocks) & set(second.blocks)
