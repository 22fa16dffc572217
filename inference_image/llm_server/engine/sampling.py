"""Next-token choice from logits: greedy at temperature 0, else temperature, then vLLM's filters (min_p, then
top_k and top_p on what is left) and a draw."""

import torch

from llm_server.engine.interface import SamplingParams

GREEDY_BELOW = 1e-5


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def filtered_probabilities(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of `logits` (rows, vocab) as probabilities after temperature, with each row's filters: min_p
    drops tokens below min_p x its most likely one's probability, top_k keeps its k most likely (0: all),
    top_p the smallest nucleus of what is left holding top_p of its mass. Unnormalized (for multinomial)."""
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    if min_p is not None and bool((min_p > 0).any()):
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    cut_k = top_k is not None and bool((top_k > 0).any())
    if cut_k or bool((top_p < 1.0).any()):
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        if cut_k:
            assert top_k is not None
            ranks = torch.arange(probs.shape[-1], device=probs.device)
            sorted_probs[(ranks[None, :] >= top_k[:, None]) & (top_k[:, None] > 0)] = 0.0
        mass = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        sorted_probs[torch.cumsum(mass, dim=-1) - mass > top_p[:, None]] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def _filters(params: list[SamplingParams], device: torch.device) -> tuple[torch.Tensor, ...]:
    return (
        torch.tensor([p.temperature for p in params], device=device),
        torch.tensor([p.top_p for p in params], device=device),
        torch.tensor([p.top_k for p in params], device=device),
        torch.tensor([p.min_p for p in params], device=device),
    )


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """`logits`: the last position's scores, shape (vocab,)."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits).item())
    probs = filtered_probabilities(logits[None], *_filters([params], logits.device))
    return int(torch.multinomial(probs[0], 1, generator=generator).item())


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of `logits` (rows, vocab). Greedy rows share one argmax and unseeded sampled rows
    one softmax and one draw; a seeded row draws alone from its own generator, so its tokens are the same
    whatever else is in the batch."""
    tokens = logits.argmax(dim=-1).tolist()
    pooled = [
        row
        for row, (p, generator) in enumerate(zip(params, generators, strict=True))
        if p.temperature >= GREEDY_BELOW and generator is None
    ]
    if pooled:
        index = torch.tensor(pooled, device=logits.device)
        filters = _filters([params[row] for row in pooled], logits.device)
        probs = filtered_probabilities(logits.index_select(0, index), *filters)
        for row, token in zip(pooled, torch.multinomial(probs, 1)[:, 0].tolist(), strict=True):
            tokens[row] = token
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.temperature >= GREEDY_BELOW and generator is not None:
            tokens[row] = sample(logits[row], p, generator)
    return tokens
