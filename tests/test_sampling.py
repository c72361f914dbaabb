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
    assert torch.equal(sample(logits, params, [None] * 4)[0], logits.argmax(-1))


def test_tiny_top_p_is_greedy():
    logits = _logits()
    params = [SamplingParams(temperature=1.0, top_p=1e-6)] * 4
    assert torch.equal(sample(logits, params, [None] * 4)[0], logits.argmax(-1))


def test_top_k_never_samples_outside_the_k_best():
    logits = _logits()
    allowed = logits.topk(3, dim=-1).indices
    params = [SamplingParams(temperature=5.0, top_k=3)] * 4
    for _ in range(50):
        tokens = sample(logits, params, [None] * 4)[0]
        assert all(tokens[i] in allowed[i] for i in range(4))


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = _logits().repeat(8, 1)
    params = [SamplingParams(temperature=2.0)] * 32

    def draw(seed: int) -> torch.Tensor:
        return sample(logits, params, [torch.Generator().manual_seed(seed + i) for i in range(32)])[0]

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_a_row_of_nan_or_fully_masked_logits_fails_alone():
    logits = _logits()
    logits[1, 7] = float("nan")
    logits[2] = float("-inf")
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature, seed=3)] * 4
        generators = [torch.Generator().manual_seed(3) for _ in range(4)]
        tokens, failed = sample(logits, params, generators)
        assert failed.nonzero().flatten().tolist() == [1, 2]
        clean = sample(logits[[0, 3]], params[:2], [torch.Generator().manual_seed(3) for _ in range(2)])[0]
        assert tokens[[0, 3]].tolist() == clean.tolist()  # the healthy rows draw as if alone


def test_extreme_but_valid_knobs_sample_normally():
    logits = _logits()
    params = [SamplingParams(temperature=1e-50), SamplingParams(temperature=1.0, top_k=2**70),
              SamplingParams(temperature=100.0, top_p=1e-9), SamplingParams(temperature=2e-5)]
    tokens, failed = sample(logits, params, [None] * 4)
    assert not failed.any()
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax() and tokens[3] == logits[3].argmax()


def test_min_p_never_samples_a_token_less_likely_than_min_p_times_the_best():
    logits = _logits()
    probs = logits.softmax(-1)
    keep = probs >= 0.2 * probs.amax(-1, keepdim=True)
    params = [SamplingParams(temperature=1.0, min_p=0.2)] * 4
    for _ in range(50):
        tokens = sample(logits.clone(), params, [None] * 4)[0]
        assert keep[torch.arange(4), tokens].all()


def _seq(params: SamplingParams, prompt: list[int], output: list[int]):
    from scalesim.engine.sequence import Sequence

    return Sequence(request_id="r", index=0, prompt_token_ids=prompt, params=params, output_token_ids=output)


def test_presence_and_frequency_penalties_lower_the_completions_tokens_as_openai_defines():
    from scalesim.engine.logits_processors import process_logits

    row = torch.zeros(1, 10)
    seq = _seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[7], output=[3, 3, 3, 4])
    out = process_logits(row, [seq])[0]
    assert out[3] == -(0.5 + 3 * 0.25) and out[4] == -(0.5 + 0.25)
    assert out[7] == 0 and out[0] == 0  # the prompt's tokens are not penalized


def test_repetition_penalty_shrinks_every_seen_token_toward_unlikely():
    from scalesim.engine.logits_processors import process_logits

    row = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seq = _seq(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[])
    assert process_logits(row, [seq])[0].tolist() == [1.0, -4.0, 2.0, -2.0]


def test_a_greedy_request_with_a_penalty_stops_repeating_itself():
    from scalesim.engine.logits_processors import process_logits

    logits = torch.tensor([[5.0, 4.0, 0.0]])
    seq = _seq(SamplingParams(temperature=0, frequency_penalty=2.0), prompt=[], output=[0])
    assert sample(process_logits(logits, [seq]), [seq.params], [None])[0].item() == 1
