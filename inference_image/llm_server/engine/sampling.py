"""Next-token choice from logits: greedy at temperature 0, else temperature and nucleus (top_p) sampling."""

import torch

from llm_server.engine.interface import SamplingParams

GREEDY_BELOW = 1e-5


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def nucleus_probabilities(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Rows of `logits` (rows, vocab) as probabilities after temperature, cut to each row's top_p nucleus."""
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p[:, None]
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """`logits`: the last position's scores, shape (vocab,)."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits).item())
    one = torch.tensor([params.temperature], device=logits.device)
    probs = nucleus_probabilities(logits[None], one, torch.tensor([params.top_p], device=logits.device))
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
        device = logits.device
        temperature = torch.tensor([params[row].temperature for row in pooled], device=device)
        top_p = torch.tensor([params[row].top_p for row in pooled], device=device)
        index = torch.tensor(pooled, device=device)
        probs = nucleus_probabilities(logits.index_select(0, index), temperature, top_p)
        for row, token in zip(pooled, torch.multinomial(probs, 1)[:, 0].tolist(), strict=True):
            tokens[row] = token
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.temperature >= GREEDY_BELOW and generator is not None:
            tokens[row] = sample(logits[row], p, generator)
    return tokens
