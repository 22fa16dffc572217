"""What a request's parameters do to its row's logits before a token is chosen, in vLLM's order: logit bias,
min_tokens (end-of-generation and stop tokens masked until then), then the repetition, frequency and
presence penalties on the raw logits (temperature and the filters come after, in sampling.py).

Each request that asks keeps its own state over the vocabulary (the tokens it has seen, how often it has
produced each), updated by one index per token, so a step costs a few vector operations per row that asks
and nothing for the rows that do not."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from llm_server.engine.interface import SamplingParams


class LogitsState:
    """One request's running state for the adjustments its parameters ask for."""

    def __init__(
        self,
        params: SamplingParams,
        prompt: Sequence[int],
        end_ids: Collection[int],
        vocab: int,
        device: torch.device,
    ) -> None:
        self.params = params
        self.produced = 0
        self.bias: torch.Tensor | None = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab, device=device)
            ids, values = zip(*params.logit_bias, strict=True)
            self.bias[list(ids)] = torch.tensor(values, device=device)
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(end_ids))
        self.banned = torch.tensor(
            sorted(token for token in banned if token < vocab), dtype=torch.long, device=device
        )
        self.seen: torch.Tensor | None = None  # prompt and output tokens, for the repetition penalty
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[list(prompt)] = True
        self.counts: torch.Tensor | None = None  # output tokens, for the frequency and presence penalties
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(vocab, device=device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits (vocab,) adjusted, as float32."""
        params, row = self.params, logits.float()
        if self.bias is not None:
            row = row + self.bias
        if self.produced < params.min_tokens and self.banned.numel():
            row = row.index_fill(0, self.banned, float("-inf"))
        if self.seen is not None:
            penalty = params.repetition_penalty
            penalized = torch.where(row < 0, row * penalty, row / penalty)
            row = torch.where(self.seen, penalized, row)
        if self.counts is not None:
            row = row - params.frequency_penalty * self.counts - params.presence_penalty * (self.counts > 0)
        return row

    def observe(self, token: int) -> None:
        """The token the row produced: it counts for min_tokens and the penalties from the next step on."""
        self.produced += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def adjust_rows(logits: torch.Tensor, states: Sequence[LogitsState | None]) -> torch.Tensor:
    """`logits` (rows, vocab) with each row that has a state adjusted; the same tensor when none has."""
    rows = [row for row, state in enumerate(states) if state is not None]
    if not rows:
        return logits
    adjusted = logits.float().clone()
    for row in rows:
        state = states[row]
        assert state is not None
        adjusted[row] = state.apply(logits[row])
    return adjusted
