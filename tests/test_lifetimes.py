"""Engines end: `close()` and `with` stop their threads, and a dropped engine is freed (a policy
sweep or a notebook builds many in one process)."""

import asyncio
import ctypes
import gc
import os
import threading
import weakref

import pytest

from scalesim import LLM, AsyncLLM, SamplingParams

POOL = "128MiB"
POOL_MIB = 128


def _rss_mib() -> float:
    """Resident memory after glibc hands back what it holds free (its per-thread arenas keep freed
    chunks; in one CI run that retention alone read as two pools of growth)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _engine_threads() -> int:
    return sum(t.name.startswith("scalesim-") for t in threading.enumerate())


def _build(cls) -> tuple[weakref.ref, weakref.ref]:
    """Weak references to the engine and its KV pool tensor."""
    llm = cls("tiny-random", kv_cache_memory=POOL, block_size_tokens=4)
    llm.engine.pool.kv_cache.fill_(1.0)  # every page touched, as a long run leaves them
    return weakref.ref(llm.engine), weakref.ref(llm.engine.pool.kv_cache)


def test_close_and_with_stop_the_engine_threads():
    before = _engine_threads()
    with LLM("tiny-random", kv_cache_memory="2MiB", block_size_tokens=4) as llm:
        assert _engine_threads() > before
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    assert _engine_threads() == before
    llm.close()  # idempotent

    async def main():
        async with AsyncLLM("tiny-random", kv_cache_memory="2MiB", block_size_tokens=4) as async_llm:
            async for _ in async_llm.generate([1, 2, 3], SamplingParams(max_tokens=2)):
                pass
    asyncio.run(main())
    assert _engine_threads() == before


def test_ten_dropped_engines_are_freed():
    for cls in (LLM, AsyncLLM):  # one of each first: imports, kernels and the allocator's arenas
        _build(cls)
    gc.collect()
    baseline, threads = _rss_mib(), _engine_threads()
    engines = []
    for i in range(10):
        engines.append(_build(LLM if i % 2 else AsyncLLM))
        gc.collect()
    assert all(engine() is None and pool() is None for engine, pool in engines)
    assert _engine_threads() == threads
    grown = _rss_mib() - baseline
    # A leak of every other engine's pool would be 640 MiB; a bound of 3 pools leaves room for
    # what the allocator keeps and other tests' threads allocate meanwhile.
    assert grown < 3 * POOL_MIB, f"RSS grew {grown:.0f} MiB over ten dropped engines of {POOL_MIB} MiB pools"


def test_an_engine_that_cannot_be_built_raises_on_the_callers_thread_and_leaves_no_thread():
    """The engine is built on its loop thread (stepping it from another thread than the one that
    built it was 1.3x slower); what building raises still reaches the caller, and nothing is left running."""
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ValueError, match="dtype"):
        AsyncLLM("tiny-random", dtype="no-such-dtype")
    assert {t.ident for t in threading.enumerate() if t.is_alive()} <= before


def test_the_engine_is_built_on_its_loop_thread(monkeypatch):
    from scalesim import async_llm
    built_on = []
    real = async_llm.LLMEngine

    def recording(config):
        built_on.append(threading.current_thread())
        return real(config)

    monkeypatch.setattr(async_llm, "LLMEngine", recording)
    with AsyncLLM("tiny-random", dtype="fp32", kv_cache_memory="8MiB") as llm:
        assert built_on == [llm._core.thread] and built_on[0] is not threading.current_thread()
