"""Log probabilities of chosen tokens from a step's logits: one log-softmax, one gather and one top-k for all
the rows that ask (prompt positions included), none for the rows that do not."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm_server.engine.interface import TokenLogprob


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int]) -> list[TokenLogprob]:
    """For each row of `logits` (rows, vocab): the log probability and rank of its token in `tokens`, and
    its `tops[row]` most likely tokens."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = torch.tensor(tokens, device=logits.device)[:, None]
    values = logprobs.gather(1, chosen)
    ranks = (logprobs > values).sum(dim=-1) + 1
    most = max(tops)
    top_values, top_ids = logprobs.topk(most, dim=-1) if most else (None, None)
    values_list, ranks_list = values[:, 0].tolist(), ranks.tolist()
    top_lists = (
        (top_ids.tolist(), top_values.tolist()) if top_ids is not None and top_values is not None else None
    )
    result = []
    for row, token in enumerate(tokens):
        top: tuple[tuple[int, float], ...] = ()
        if top_lists is not None and tops[row]:
            ids, lps = top_lists[0][row][: tops[row]], top_lists[1][row][: tops[row]]
            top = tuple(zip(ids, lps, strict=True))
        result.append(TokenLogprob(token, values_list[row], ranks_list[row], top))
    return result
