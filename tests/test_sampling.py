"""Sampling knobs do what they say."""

import torch

from scalesim import SamplingParams
from scalesim.engine.sampler import sample


def _logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, 50) * 3


def test_top_k_one_is_greedy():
    logits = _logits()
    params = [SamplingParams(temperature=1.0, top_k=1)] * 4
    assert torch.equal(sample(logits, params, [None] * 4), logits.argmax(-1))


def test_tiny_top_p_is_greedy():
    logits = _logits()
    params = [SamplingParams(temperature=1.0, top_p=1e-6)] * 4
    assert torch.equal(sample(logits, params, [None] * 4), logits.argmax(-1))


def test_top_k_never_samples_outside_the_k_best():
    logits = _logits()
    allowed = logits.topk(3, dim=-1).indices
    params = [SamplingParams(temperature=5.0, top_k=3)] * 4
    for _ in range(50):
        tokens = sample(logits, params, [None] * 4)
        assert all(tokens[i] in allowed[i] for i in range(4))


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = _logits().repeat(8, 1)
    params = [SamplingParams(temperature=2.0)] * 32

    def draw(seed: int) -> torch.Tensor:
        return sample(logits, params, [torch.Generator().manual_seed(seed + i) for i in range(32)])

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
