"""Engine behaviour: batching, chunked prefill, prefix reuse, preemption, stops, n, aborts."""

import random

import pytest

from scalesim import LLM, SamplingParams
from scalesim.errors import RequestTooLargeError
from tests.conftest import random_prompt

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_batched_results_equal_unbatched_results(tiny_llm):
    rng = random.Random(1)
    prompts = [random_prompt(rng, n) for n in (5, 17, 33, 9)]
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    for params in (GREEDY, sampled):
        batched = _tokens(tiny_llm.generate(prompts, params))
        alone = [_tokens(tiny_llm.generate([p], params))[0] for p in prompts]
        assert batched == alone


def test_chunked_prefill_gives_the_same_tokens_as_one_shot_prefill():
    rng = random.Random(2)
    prompts = [random_prompt(rng, 70), random_prompt(rng, 45)]
    one_shot = LLM("tiny-random", kv_cache_memory="8MiB", max_num_batched_tokens=512)
    chunked = LLM("tiny-random", kv_cache_memory="8MiB", max_num_batched_tokens=16)
    assert _tokens(one_shot.generate(prompts, GREEDY)) == _tokens(chunked.generate(prompts, GREEDY))


def test_a_second_request_sharing_a_long_prefix_reuses_its_pages():
    llm = LLM("tiny-random", kv_cache_memory="16MiB", block_size_tokens=16)
    rng = random.Random(3)
    prefix = random_prompt(rng, 1000)
    first = llm.generate([prefix + random_prompt(rng, 10)], GREEDY)[0]
    computed_before = llm.stats()["prompt_tokens"] - llm.stats()["cached_prompt_tokens"]
    second = llm.generate([prefix + random_prompt(rng, 10)], GREEDY)[0]
    computed_second = llm.stats()["prompt_tokens"] - llm.stats()["cached_prompt_tokens"] - computed_before
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 992  # every whole 16-token page of the 1000-token prefix
    assert computed_second == 1010 - 992


def test_requests_sent_together_behind_one_prefix_compute_it_once():
    """The burst of a simulation step: four calls behind one 200-token world description, sent
    at once. The first computes the prefix; the others wait one step and find it cached."""
    llm = LLM("tiny-random", kv_cache_memory="16MiB", block_size_tokens=16)
    rng = random.Random(5)
    prefix = random_prompt(rng, 200)
    prompts = [prefix + random_prompt(rng, 10) for _ in range(4)]
    outputs = llm.generate(prompts, GREEDY)
    stats = llm.stats()
    assert [o.num_cached_tokens for o in outputs] == [0, 192, 192, 192]
    assert stats["prompt_tokens"] - stats["cached_prompt_tokens"] == 4 * 210 - 3 * 192
    assert stats["shared_prefix_waits"] == 3
    alone = LLM("tiny-random", kv_cache_memory="16MiB", block_size_tokens=16)
    assert _tokens(outputs) == [_tokens(alone.generate([p], GREEDY))[0] for p in prompts]


def test_preemption_under_a_tiny_pool_completes_with_the_same_tokens():
    rng = random.Random(4)
    prompts = [random_prompt(rng, 40) for _ in range(6)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    roomy = LLM("tiny-random", kv_cache_memory="8MiB", block_size_tokens=4)
    block_nbytes = roomy.engine.pool.block_nbytes
    tight = LLM("tiny-random", kv_cache_memory=block_nbytes * 40, block_size_tokens=4)
    assert _tokens(tight.generate(prompts, params)) == _tokens(roomy.generate(prompts, params))
    assert tight.stats()["preemptions"] > 0
    assert tight.engine.pool.nbytes <= block_nbytes * 40


def test_a_request_larger_than_the_whole_pool_is_a_clear_error_not_a_hang():
    page_nbytes = LLM("tiny-random", kv_cache_memory="1MiB", block_size_tokens=4).engine.pool.block_nbytes
    llm = LLM("tiny-random", kv_cache_memory=10 * page_nbytes, block_size_tokens=4)  # 40 tokens
    with pytest.raises(RequestTooLargeError, match="whole pool"):
        llm.generate([list(range(10, 200))], SamplingParams(max_tokens=4))
    assert llm.generate([[10, 11, 12]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_max_tokens_ends_generation_with_reason_length(tiny_llm):
    out = tiny_llm.generate([[20, 21, 22]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5
    assert out.outputs[0].finish_reason == "length"


def test_stop_token_id_ends_generation_and_is_the_last_token(tiny_llm):
    free = tiny_llm.generate([[30, 31, 32]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    third = free[0].outputs[0].token_ids[2]
    out = tiny_llm.generate([[30, 31, 32]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                           stop_token_ids=[third]))[0].outputs[0]
    assert out.token_ids == free[0].outputs[0].token_ids[:3]
    assert out.finish_reason == "stop"


def test_stop_string_is_cut_from_the_text(tiny_llm):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = tiny_llm.generate(["the agent will"], params)[0].outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    out = tiny_llm.generate(["the agent will"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                               stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]


def test_n_completions_with_a_seed_are_reproducible_and_distinct(tiny_llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=11, ignore_eos=True)
    first = [o.token_ids for o in tiny_llm.generate(["hello world"], params)[0].outputs]
    again = [o.token_ids for o in tiny_llm.generate(["hello world"], params)[0].outputs]
    assert first == again
    assert len({tuple(t) for t in first}) > 1


def test_agent_id_is_recorded_on_the_request_and_its_sequences(tiny_llm):
    engine = tiny_llm.engine
    request_id = engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), agent_id="isabella")
    seqs = engine.requests[request_id].seqs
    assert [s.agent_id for s in seqs] == ["isabella"]
    while engine.has_unfinished():
        engine.step()
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), agent_ids=["klaus"])[0]
    assert out.agent_id == "klaus"


def test_abort_frees_every_page_the_request_held(tiny_llm):
    engine = tiny_llm.engine
    tiny_llm.engine.reset_prefix_cache()
    free = engine.pool.num_free
    request_id = engine.add_request(list(range(10, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_free < free
    engine.abort(request_id)
    assert not engine.has_unfinished()
    engine.reset_prefix_cache()
    assert engine.pool.num_free == free


def test_streamed_deltas_add_up_to_the_final_text(tiny_llm):
    engine = tiny_llm.engine
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    expected = tiny_llm.generate(["Alice and Bob"], params)[0].outputs[0].text
    request_id = engine.add_request("Alice and Bob", params)
    text = ""
    while engine.has_unfinished():
        text += "".join(d.text for d in engine.step() if d.request_id == request_id)
    assert text == expected


POISON = 7  # a token id the test's model wrapper refuses, standing in for any per-sequence failure


class _RefusingModel:
    """The engine's model, raising whenever a step's input holds POISON."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, input_ids, *args, **kwargs):
        if (input_ids == POISON).any():
            raise RuntimeError("this sequence breaks the model")
        return self.model(input_ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("max_num_seqs", [8, 1])
def test_a_sequence_whose_step_raises_fails_alone(max_num_seqs):
    llm = LLM("tiny-random", dtype="fp32", kv_cache_memory="4MiB", block_size_tokens=4, max_num_seqs=max_num_seqs)
    clean = [[11, 12, 13, 14, 15], [21, 22, 23]]
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)]
    alone = [o.outputs[0] for o in llm.generate(clean, params)]
    llm.engine.runner.model = _RefusingModel(llm.engine.runner.model)
    outputs = llm.generate([clean[0], [31, POISON, 33], clean[1]],
                           [params[0], SamplingParams(max_tokens=6, ignore_eos=True), params[1]])
    assert outputs[1].outputs[0].finish_reason == "error"
    assert "this sequence breaks the model" in outputs[1].outputs[0].error
    for got, expected in zip((outputs[0].outputs[0], outputs[2].outputs[0]), alone):
        assert got.finish_reason == "length"
        assert got.token_ids == expected.token_ids  # seeded draws and logprobs not redone
        assert [i["token_id"] for i in got.logprobs] == [i["token_id"] for i in expected.logprobs]
    assert llm.engine.stats()["running"] == llm.engine.stats()["waiting"] == 0
