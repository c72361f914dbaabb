"""Many asyncio callers share one continuously batched engine."""

import asyncio
import random
import time

import pytest

from scalesim import AsyncLLM, LLM, SamplingParams
from tests.conftest import random_prompt

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def async_llm():
    llm = AsyncLLM("tiny-random", kv_cache_memory="8MiB", block_size_tokens=4)
    yield llm
    llm.shutdown()


async def _collect(llm: AsyncLLM, prompt, params=PARAMS, agent_id=None) -> list[int]:
    tokens: list[int] = []
    async for delta in llm.generate(prompt, params, agent_id=agent_id):
        tokens.extend(delta.token_ids)
    return tokens


def test_concurrent_callers_get_what_they_would_get_alone(async_llm):
    rng = random.Random(5)
    prompts = [random_prompt(rng, rng.randint(3, 40)) for _ in range(12)]
    expected = [o.outputs[0].token_ids for o in
                LLM("tiny-random", kv_cache_memory="8MiB", block_size_tokens=4).generate(prompts, PARAMS)]

    async def main():
        return await asyncio.gather(*(_collect(async_llm, p, agent_id=f"agent-{i}") for i, p in enumerate(prompts)))

    assert asyncio.run(main()) == expected


def test_leaving_a_stream_early_aborts_the_request_and_frees_its_pages(async_llm):
    async def main():
        stream = async_llm.generate(list(range(10, 50)), SamplingParams(max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while async_llm.stats()["running"] and time.monotonic() < deadline:  # the abort lands before the next step
        time.sleep(0.01)
    stats = async_llm.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["kv_blocks_free"] + stats["kv_blocks_cached"] == stats["kv_blocks_total"]


def test_a_bad_request_raises_in_its_caller_and_others_continue(async_llm):
    async def main():
        with pytest.raises(Exception, match="max_tokens|prompt"):
            await _collect(async_llm, "")
        return await _collect(async_llm, [10, 11, 12])

    assert len(asyncio.run(main())) == 10


def test_a_burst_that_reaches_an_idle_engine_starts_in_one_step(async_llm, monkeypatch):
    """Requests sent at once reach the engine one by one (each through a worker thread); the idle
    engine waits while they keep coming, so the burst is one step, not its first request alone.
    The window is widened here so that a slow machine cannot split the burst."""
    import scalesim.async_llm as async_module

    monkeypatch.setattr(async_module, "BURST_QUIET_S", 0.5)
    monkeypatch.setattr(async_module, "BURST_MAX_S", 5.0)
    rng = random.Random(9)
    prompts = [random_prompt(rng, 20) for _ in range(6)]
    one_token = SamplingParams(max_tokens=1, temperature=0)

    async def main():
        return await asyncio.gather(*(_collect(async_llm, p, one_token) for p in prompts))

    before = async_llm.stats()["steps"]
    assert all(len(tokens) == 1 for tokens in asyncio.run(main()))
    assert async_llm.stats()["steps"] - before == 1
