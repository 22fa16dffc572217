"""The batch's KV cache on its own: what a step writes is what later steps read, without reallocating."""

import torch

from llm_server.engine.slots import PromptPart, SlotCache


def write_step(cache: SlotCache, parts: list[PromptPart], value: float) -> torch.Tensor:
    step = cache.plan(parts)
    keys = torch.full((step.tokens, 2, 1, 4), value)
    written, _ = cache.layers[0].update(keys, keys.clone(), 0)
    cache.advance()
    return written


def test_rows_coming_and_going_for_many_steps_read_back_their_tokens_without_reallocating() -> None:
    cache = SlotCache(num_layers=1, max_rows=4, device=torch.device("cpu"))
    write_step(cache, [PromptPart(5), PromptPart(3)], 1.0)
    buffers = set()
    for step in range(2, 600):
        joining = [PromptPart(4)] if step % 10 == 0 else []
        if joining:
            cache.remove([0])  # the oldest leaves as a new one joins: the region stays narrow
        keys = write_step(cache, joining, float(step))
        # Every row's last token is this step's; a decoding row's earlier ones are the steps before.
        assert keys[:, 0, -1, 0].tolist() == [float(step)] * cache.rows
        if not joining and step % 10 > 3:
            assert keys[0, 0, -3:, 0].tolist() == [float(step - 2), float(step - 1), float(step)]
        if step > 100:
            buffers.add(cache.layers[0].keys.data_ptr())
    # The region reached the buffers' end again and again: it moved back in place, never reallocated.
    assert cache.capacity[1] < 100
    assert len(buffers) == 1
