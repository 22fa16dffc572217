"""What a request's parameters do to its row's logits before a token is chosen, in vLLM's order: logit bias,
min_tokens (end-of-generation and stop tokens masked until then), then the repetition, frequency and
presence penalties on the raw logits (temperature and the filters come after, in sampling.py), and last
a grammar's mask (structured outputs: every token it does not allow at -inf, which no adjustment before it
undoes, so that vLLM's masking first comes to the same).

Each request that asks keeps its own state over the vocabulary (the tokens it has seen, how often it has
produced each, its grammar matcher), updated by one index per token, so a step costs a few vector operations
per row that asks and nothing for the rows that do not. The rows with a grammar share one bitmask, filled
by llguidance and applied in one operation, as vLLM does."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

import llguidance
import numpy as np
import torch

from llm_server.engine.grammar import GrammarCompiler
from llm_server.engine.interface import SamplingParams

logger = logging.getLogger(__name__)


class LogitsState:
    """One request's running state for the adjustments its parameters ask for."""

    def __init__(
        self,
        params: SamplingParams,
        prompt: Sequence[int],
        end_ids: Collection[int],
        vocab: int,
        device: torch.device,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.params = params
        self.produced = 0
        self.grammars = grammars
        self.matcher: llguidance.LLMatcher | None = None  # its grammar's, advanced token by token
        if params.grammar is not None:
            assert grammars is not None, "a request with a grammar needs the engine's compiler"
            self.matcher = grammars.matcher(params.grammar)
        self.end_mask: torch.Tensor | None = None  # where a row with nothing left may still go
        if self.matcher is not None:
            self.end_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.end_mask[[token for token in end_ids if token < vocab]] = True
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
        # Whether `apply` changes the row: a row with only a grammar skips it (adjust_rows masks it).
        self.reshapes = bool(params.min_tokens) or any(
            state is not None for state in (self.bias, self.seen, self.counts)
        )

    @property
    def finished(self) -> bool:
        """Its grammar is complete and allows nothing more (or it broke): the generation ends there."""
        return self.matcher is not None and self.matcher.is_stopped()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits (vocab,) adjusted, as float32 (but for the grammar: see adjust_rows)."""
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
        if self.matcher is not None and not self.matcher.consume_token(token):
            logger.warning("a token broke the grammar, which ends the text: %s", self.matcher.get_error())


def adjust_rows(logits: torch.Tensor, states: Sequence[LogitsState | None]) -> torch.Tensor:
    """`logits` (rows, vocab) with each row that has a state adjusted; the same tensor when none has."""
    rows = [row for row, state in enumerate(states) if state is not None]
    if not rows:
        return logits
    adjusted = logits.float().clone()
    guided: list[tuple[int, llguidance.LLMatcher]] = []
    for row in rows:
        state = states[row]
        assert state is not None
        if state.reshapes:
            adjusted[row] = state.apply(logits[row])
        if state.matcher is not None:
            guided.append((row, state.matcher))
    if guided:
        state = states[guided[0][0]]
        assert state is not None and state.grammars is not None and state.end_mask is not None
        mask_grammar_rows(adjusted, state.grammars.bitmask(len(states), guided), state.end_mask)
    return adjusted


def mask_grammar_rows(logits: torch.Tensor, bitmask: np.ndarray, end_mask: torch.Tensor) -> None:
    """-inf, in place, on every token a row's grammar does not allow next: one bitmask for the step (all
    ones on the rows without a grammar, which stay as they are), applied in one operation."""
    width, device = logits.shape[-1], logits.device
    mask = blocked(bitmask, width) if device.type == "cpu" else blocked_on(device, bitmask, width)
    logits.masked_fill_(mask, float("-inf"))
    # Nothing allowed is left (min_tokens banned all that the grammar allows, say): the end tokens, not NaN.
    stuck = torch.isneginf(logits).all(dim=-1, keepdim=True)
    logits.masked_fill_(stuck & end_mask, 0.0)


def blocked(bitmask: np.ndarray, width: int) -> torch.Tensor:
    """(rows, width) bool, true where llguidance's (rows, words) int32 bitmask has token t's bit (t % 32 of
    word t // 32) clear, on the CPU: one numpy call (the words are little-endian, as on every host torch
    runs on). The mask covers the wider of the tokenizer and the logits: columns past the logits go."""
    return torch.from_numpy(np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :width] == 0)


def blocked_on(device: torch.device, bitmask: np.ndarray, width: int) -> torch.Tensor:
    """The same on an accelerator: the packed words cross (32 times smaller than booleans), then unpack."""
    words = torch.from_numpy(bitmask).to(device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    return ((words[:, :, None] >> shifts) & 1 == 0).flatten(1)[:, :width]
