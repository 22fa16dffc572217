"""Sampling a whole step at once honours each row's own parameters."""

import torch

from llm_server.engine.interface import SamplingParams
from llm_server.engine.sampling import make_generator, sample, sample_rows


def test_each_row_keeps_its_own_parameters_when_sampled_together() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [
        SamplingParams(1, temperature=0.0),  # greedy
        SamplingParams(1, temperature=1.0, top_p=1e-9),  # nucleus of one token: the argmax
        SamplingParams(1, temperature=1.0, seed=7),
        SamplingParams(1, temperature=5.0, top_p=1e-9),
        SamplingParams(1, temperature=0.7, top_p=0.9, seed=8),
        SamplingParams(1, temperature=1.0),
    ]
    generators = [make_generator(p, torch.device("cpu")) for p in params]
    tokens = sample_rows(logits, params, generators)
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[0] == argmax[0] and tokens[1] == argmax[1] and tokens[3] == argmax[3]
    # Seeded rows draw alone, from their own generator: as if the request were the only one.
    for row in (2, 4):
        alone = sample(logits[row], params[row], make_generator(params[row], torch.device("cpu")))
        assert tokens[row] == alone
    assert 0 <= tokens[5] < 50


def test_pooled_rows_follow_their_own_temperature() -> None:
    """Two unseeded rows with the same logits, one cold and one hot, drawn together many times: the cold
    one concentrates on the argmax, the hot one spreads out."""
    torch.manual_seed(1)
    row = torch.randn(20) * 3
    logits = torch.stack([row, row])
    params = [SamplingParams(1, temperature=0.05), SamplingParams(1, temperature=50.0)]
    draws = [sample_rows(logits, params, [None, None]) for _ in range(400)]
    best = int(row.argmax())
    cold = sum(tokens[0] == best for tokens in draws) / len(draws)
    hot = sum(tokens[1] == best for tokens in draws) / len(draws)
    assert cold > 0.95
    assert hot < 0.3
