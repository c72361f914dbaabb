"""Speculative decoding by prompt lookup: drafts found, and greedy tokens unchanged by it."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalesim import LLM, SamplingParams
from scalesim.engine.grammar import json_object_grammar
from scalesim.engine.sequence import Sequence
from scalesim.engine.speculation import PromptLookup, Speculator, StepCost, lookup
from tests.conftest import random_prompt

GRAMMAR = json_object_grammar()


def test_lookup_takes_the_tokens_after_the_latest_earlier_occurrence_of_the_longest_suffix():
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3]
    assert lookup(tokens, 2, max_ngram=3, min_ngram=1) == [7, 8]  # "2 3" last seen at 5..6
    assert lookup(tokens, 9, max_ngram=3, min_ngram=1) == [7, 8, 2, 3]  # stops at the end
    assert lookup([1, 2, 3, 4, 5], 3, max_ngram=3, min_ngram=1) == []  # nothing repeats
    assert lookup([5, 6, 5], 3, max_ngram=3, min_ngram=1) == [6, 5]  # a 1-gram
    assert lookup([5, 6, 5], 3, max_ngram=3, min_ngram=2) == []
    assert lookup([4, 4, 4], 2, max_ngram=3, min_ngram=1) == [4]  # a run continues
    # the longest suffix wins over a later shorter match: "1 2 3" -> 9, not "3" -> 7
    assert lookup([1, 2, 3, 9, 3, 7, 1, 2, 3], 1, max_ngram=3, min_ngram=1) == [9]


def _lookup_by_brute_force(tokens, num_tokens, max_ngram, min_ngram):
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first, never the suffix itself
            if tokens[start:start + n] == tokens[-n:]:
                return tokens[start + n:start + n + num_tokens]
    return []


@given(st.lists(st.integers(0, 4), min_size=1, max_size=40), st.integers(1, 5), st.integers(1, 4), st.integers(0, 3))
def test_lookup_equals_a_brute_force_search(tokens, num_tokens, min_ngram, extra):
    max_ngram = min_ngram + extra
    assert lookup(tokens, num_tokens, max_ngram, min_ngram) == _lookup_by_brute_force(tokens, num_tokens, max_ngram,
                                                                                       min_ngram)


def test_prompt_lookup_refuses_bad_settings():
    with pytest.raises(ValueError):
        PromptLookup(0)
    with pytest.raises(ValueError):
        PromptLookup(4, max_ngram=1, min_ngram=2)


class Replay:
    """A drafter that knows some prompts' greedy continuations and drafts them, wrong wherever
    (position + 1) is a multiple of `wrong_every`: steps keep some drafts and reject others.
    Other prompts get no draft."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], wrong_every: int = 4) -> None:
        self.continuations = continuations
        self.wrong_every = wrong_every

    def draft(self, seq, limit: int) -> list[int]:
        done = len(seq.output_token_ids)
        reference = self.continuations.get(tuple(seq.prompt_token_ids), [])
        return [t if (done + i + 1) % self.wrong_every else (t + 1) % 500
                for i, t in enumerate(reference[done:done + limit])]


def _llm(**kwargs) -> LLM:
    """A tiny engine, not speculating unless `num_speculative_tokens` says."""
    return LLM("tiny-random", **{"dtype": "fp32", "kv_cache_memory": "16MiB", "block_size_tokens": 4,
                                 "num_speculative_tokens": 0, **kwargs})


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [random_prompt(rng, n) for n in (30, 23, 9)]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


class Unpriced(StepCost):
    """A step cost that never fits: every draft is verified, whatever the clock says."""

    def fit(self):
        return None


def _replaying(prompts: list[list[int]], params: SamplingParams = GREEDY, **kwargs) -> tuple[LLM, list[list[int]]]:
    """An engine whose drafts replay a plain engine's tokens for `prompts` (with errors), all
    verified (so the test does not depend on timing), and those tokens."""
    expected = _tokens(_llm().generate(prompts, params))
    llm = _llm(num_speculative_tokens=8, **kwargs)
    llm.engine.speculator.drafter = Replay({tuple(p): t for p, t in zip(prompts, expected)})
    llm.engine.speculator.cost = Unpriced()
    return llm, expected


def _drafts(llm: LLM) -> tuple[int, int]:
    stats = llm.stats()
    return stats["draft_tokens"], stats["accepted_draft_tokens"]


def test_greedy_tokens_are_the_same_whatever_the_drafts():
    prompts = _prompts()
    llm, expected = _replaying(prompts)
    assert _tokens(llm.generate(prompts, GREEDY)) == expected
    drafted, kept = _drafts(llm)
    assert 0 < kept < drafted  # drafts were both kept and rejected
    assert llm.stats()["steps"] < 40 / 2  # three drafted tokens kept of four: 4 tokens a step


def test_max_tokens_and_stop_tokens_cut_a_step_inside_its_draft():
    prompts = _prompts()
    llm, expected = _replaying(prompts)
    for max_tokens in (1, 2, 5):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        outputs = llm.generate(prompts, params)
        assert _tokens(outputs) == [t[:max_tokens] for t in expected]
        assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    # a stop token (an end-of-sequence token takes the same path) among the tokens a step keeps:
    # the tokens kept after it are dropped
    stop = expected[0][13]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    kept_before = llm.stats()["accepted_draft_tokens"]
    output = llm.generate(prompts[:1], params)[0].outputs[0]
    assert output.token_ids == expected[0][:expected[0].index(stop) + 1] and output.finish_reason == "stop"
    assert llm.stats()["accepted_draft_tokens"] - kept_before < len(output.token_ids) - 1  # some were dropped or missed


def test_a_stop_string_across_kept_tokens_ends_the_text_where_plain_decoding_does():
    prompts = _prompts()
    llm, expected = _replaying(prompts)
    plain = _llm()
    text = plain.generate(prompts[:1], GREEDY)[0].outputs[0].text
    stop = text[len(text) // 3:len(text) // 3 + 5]  # a few characters some kept tokens spell
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    want, got = plain.generate(prompts[:1], params)[0].outputs[0], llm.generate(prompts[:1], params)[0].outputs[0]
    assert (got.text, got.finish_reason) == (want.text, "stop") and stop not in got.text
    assert _drafts(llm)[1] > 0


def test_pages_cached_after_speculation_hold_the_kept_tokens_kv():
    """A finished sequence's pages, generated tokens included, enter the prefix cache: a rejected
    draft's KV must not be among them. A request behind the first one's whole text finds those
    pages and gets the tokens a fresh engine computes."""
    prompt = _prompts()[0]
    llm, expected = _replaying([prompt])
    first = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert first == expected[0] and 0 < _drafts(llm)[1] < _drafts(llm)[0]
    follow_up = prompt + first + [77]
    second = llm.generate([follow_up], GREEDY)[0]
    assert second.num_cached_tokens > len(prompt)  # generated tokens' pages were found
    assert second.outputs[0].token_ids == _tokens(_llm().generate([follow_up], GREEDY))[0]


def test_sampled_and_processed_requests_do_not_speculate():
    prompts = _prompts()
    llm, _ = _replaying(prompts)
    for params in (SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True),
                   SamplingParams(max_tokens=20, temperature=0, logit_bias={5: 1.0}, ignore_eos=True),
                   SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.2, ignore_eos=True),
                   SamplingParams(max_tokens=20, temperature=0, grammar=GRAMMAR)):
        assert _tokens(llm.generate(prompts, params)) == _tokens(_llm().generate(prompts, params))
    assert _drafts(llm) == (0, 0)
    llm.generate(prompts, GREEDY)
    assert _drafts(llm)[0] > 0  # the same engine drafts for plain greedy requests


def test_logprobs_come_one_per_kept_token():
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)
    prompts = _prompts()
    llm, _ = _replaying(prompts, params)
    expected, got = _llm().generate(prompts, params), llm.generate(prompts, params)
    assert _drafts(llm)[1] > 0
    for a, b in zip(expected, got):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert [x["token_id"] for x in b.outputs[0].logprobs] == b.outputs[0].token_ids
        assert [x["logprob"] for x in b.outputs[0].logprobs] == pytest.approx(
            [x["logprob"] for x in a.outputs[0].logprobs], abs=1e-4)


def test_drafts_take_only_free_pages_and_a_tiny_pool_preempts_as_without_them():
    rng = random.Random(4)
    prompts = [random_prompt(rng, 40) for _ in range(6)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    page_nbytes = _llm().engine.pool.block_nbytes
    tight, expected = _replaying(prompts, params, kv_cache_memory=page_nbytes * 40)
    assert _tokens(tight.generate(prompts, params)) == expected
    stats = tight.stats()
    assert stats["preemptions"] > 0 and _drafts(tight)[1] > 0
    assert stats["kv_blocks_free"] + stats["kv_blocks_cached"] == stats["kv_blocks_total"]  # no page leaked


def test_prompt_lookup_drafts_are_kept_on_the_real_model():
    """SmolLM2 continues a list it was shown: prompt lookup's drafts are kept, and the greedy
    text (float32) is plain decoding's."""
    prompt = "Days: Monday, Tuesday, Wednesday, Thursday, Friday. Again: Monday, Tuesday,"
    params = SamplingParams(max_tokens=24, temperature=0)
    plain = LLM("smollm2-135m", dtype="fp32", kv_cache_memory="64MiB", num_speculative_tokens=0)
    speculating = LLM("smollm2-135m", dtype="fp32", kv_cache_memory="64MiB")  # the default speculates
    expected = plain.generate([prompt], params)[0].outputs[0]
    got = speculating.generate([prompt], params)[0].outputs[0]
    assert got.token_ids == expected.token_ids and got.text == expected.text
    # which drafts a step verifies depends on its measured cost, so only that some were kept is fixed
    assert _drafts(speculating)[1] > 0 and speculating.stats()["steps"] < plain.stats()["steps"]


def test_step_cost_fits_base_and_per_row_seconds():
    cost = StepCost()
    assert cost.fit() is None
    for rows in (1, 1, 1, 1, 1):
        cost.add(rows, 0.0305)
    assert cost.fit() is None  # rows never differed: no slope to fit
    for rows in (16, 64, 80, 320, 4096):  # the 4,096-row prompt chunk is left out of the fit
        cost.add(rows, 0.030 + 0.0005 * rows if rows < 4096 else 9.0)
    base_s, per_row_s = cost.fit()
    assert base_s == pytest.approx(0.030) and per_row_s == pytest.approx(0.0005)


def test_a_line_with_no_positive_base_gives_no_price_and_steady_rows_fade_the_fit():
    cost = StepCost()
    for rows, seconds in ((500, 0.5), (400, 0.35), (3, 0.001), (3, 0.001), (3, 0.001)):
        cost.add(rows, seconds)  # steeper than linear: the line's base is below zero
    assert cost.fit() is None
    cost = StepCost()
    for rows in (1, 2, 4, 8, 16, 32):
        cost.add(rows, 0.030 + 0.0005 * rows)
    assert cost.fit() is not None
    for _ in range(300):  # no drafts at a steady batch of 16: the rows stop varying
        cost.add(16, 0.038)
    assert cost.fit() is None  # so the speculator drafts again, and learns again


class Fixed:
    """A drafter that always drafts `limit` copies of one token."""

    def draft(self, seq, limit: int) -> list[int]:
        return [7] * limit


def _priced(base_s: float, per_row_s: float) -> Speculator:
    speculator = Speculator(Fixed())
    for rows in (1, 2, 4, 8, 16, 32):
        speculator.observe(rows, base_s + per_row_s * rows)
    return speculator


def _sequences(count: int, kept: int, missed: int) -> list[Sequence]:
    seqs = [Sequence(request_id=f"r{i}", index=0, prompt_token_ids=[1, 2, 3], params=SamplingParams(temperature=0))
            for i in range(count)]
    for seq in seqs:
        seq.draft_kept, seq.draft_missed = kept, missed
    return seqs


def test_drafts_go_where_they_pay_and_not_where_rows_cost_more_than_they_keep():
    """AMX-like prices (30 ms a step, 0.5 ms a row): one sequence whose drafts are rarely kept
    still drafts (its step is nearly all fixed cost) while each token's chance beats the row's
    share of the step; 64 such sequences do not; 64 whose drafts are mostly kept do."""
    speculator = _priced(0.030, 0.0005)

    def drafted(seqs) -> list[int]:
        plans = speculator.plan([(s, 4) for s in seqs], rows=len(seqs), tokens=len(seqs), budget=4096)
        return [len(d) for d in plans]

    # chances 1/6 and 1/36 (kept 1 of 10, behind a prior of 1/2) beat a row's 1/61 of the step
    assert drafted(_sequences(1, kept=1, missed=9)) == [2]
    assert sum(drafted(_sequences(64, kept=1, missed=9))) == 0
    assert sum(drafted(_sequences(64, kept=90, missed=10))) > 64 * 2
    assert sum(len(d) for d in speculator.plan([(s, 4) for s in _sequences(64, 90, 10)], 64, 64, budget=10)) == 10


def test_an_empty_step_plans_nothing():
    assert _priced(0.030, 0.0005).plan([], rows=0, tokens=0, budget=4096) == []


def test_without_prices_every_draft_is_tried_within_the_budget():
    speculator = Speculator(Fixed())
    plans = speculator.plan([(s, 4) for s in _sequences(3, 0, 50)], rows=3, tokens=3, budget=6)
    assert [len(d) for d in plans] == [4, 2, 0]
