"""Properties of the whole memory layer under random operations, with real KV pages, a real
adapter and a real disk store: budgets hold (the device measured from tensor storage), weights
are never lost, pinned state never moves (every move of a pinned object raises, and no transfer
thread may log a failure), and a damaged disk file is never served."""

import logging

import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalesim import LLM, SamplingParams
from scalesim.memory.resident import TIERS
from tests.conftest import random_prompt
from tests.test_memory_kv import measured_device_nbytes

GREEDY = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
AGENTS = 5
ENGINE_ARGS = dict(dtype="fp32", device_memory="128KiB", host_memory="40KiB", disk_memory="600KiB", block_size_tokens=4,
                   max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    from scalesim.weights.fixtures import make_random_adapters
    return make_random_adapters("tiny-random", tmp_path_factory.mktemp("adapter"), count=1, rank=4)[0]


@pytest.fixture(scope="module")
def reference(adapter_folder):
    """Greedy tokens of every prompt the operations use, from an engine with room for everything."""
    llm = LLM("tiny-random", dtype="fp32", device_memory="16MiB", block_size_tokens=4)
    llm.register_agent("agent-0", adapter=str(adapter_folder))
    out = {}
    for agent in range(AGENTS):
        for turn in range(3):
            prompt = _prompt(agent, turn)
            out[(agent, turn)] = llm.generate([prompt], GREEDY, agent_ids=[f"agent-{agent}"])[0].outputs[0].token_ids
    return out


def _prompt(agent: int, turn: int) -> list[int]:
    shared = random_prompt(random.Random(1000), 12)
    return shared + random_prompt(random.Random(agent), 24) + random_prompt(random.Random(agent * 10 + turn), 4 * turn)


def _engine(state: Path, adapter_folder: Path) -> LLM:
    llm = LLM("tiny-random", disk_dir=str(state), **ENGINE_ARGS)
    llm.register_agent("agent-0", adapter=str(adapter_folder))
    return llm


def _settle(llm: LLM) -> None:
    deadline = time.monotonic() + 5
    while llm.engine.memory.tiers.staged and time.monotonic() < deadline:
        time.sleep(0.005)


def _check(llm: LLM) -> None:
    memory = llm.engine.memory
    deadline = time.monotonic() + 5
    while True:  # check between moves: a move in flight has claimed its target's room already
        memory.lock.acquire()
        if memory.mover.in_flight_nbytes == 0 or time.monotonic() > deadline:
            break
        memory.lock.release()
        time.sleep(0.002)
    try:
        stats = memory.snapshot()
        assert measured_device_nbytes(llm) <= stats["device_budget_nbytes"]
        host = sum(o.nbytes for o in memory.objects.values() if o.tier == "host")
        assert stats["host_used_nbytes"] == host <= stats["host_budget_nbytes"]
        store = memory.store
        with store._lock:
            indexed = store.db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM objects").fetchone()[0]
        assert stats["disk_used_nbytes"] == indexed <= stats["disk_budget_nbytes"]
        for handle in llm.engine.weights.handles():
            assert handle.tier in TIERS and (handle.tier != "disk" or handle.source.is_dir()), "a weight was lost"
            assert handle in memory.index
    finally:
        memory.lock.release()


OPERATIONS = st.lists(st.tuples(st.sampled_from(["request", "request", "hint", "evict", "damage", "restart"]),
                                st.integers(0, AGENTS - 1), st.integers(0, 2)), min_size=4, max_size=14)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(OPERATIONS)
def test_random_operations_keep_every_invariant(adapter_folder, reference, caplog, operations):
    caplog.clear()
    caplog.set_level(logging.ERROR, logger="scalesim.memory")
    state = Path(tempfile.mkdtemp(prefix="scalesim-prop-")) / "state"
    llm = _engine(state, adapter_folder)
    rng = random.Random(len(operations))
    step = 0
    try:
        for op, agent, turn in operations:
            if op == "request":
                out = llm.generate([_prompt(agent, turn)], GREEDY, agent_ids=[f"agent-{agent}"])[0]
                assert out.outputs[0].token_ids == reference[(agent, turn)], "served state must be the agent's own"
            elif op == "hint":
                step += 1
                llm.hint(step=step, distances={f"agent-{a}": (a + turn) % 4 for a in range(AGENTS)})
            elif op == "evict":
                llm.engine.memory.make_device_room(llm.engine.pool.num_blocks)
            elif op == "damage":
                _settle(llm)
                store = llm.engine.memory.store
                paths = [store.path_of(k) for k, _, _ in store.entries("kv")]
                if len(paths) >= 2:
                    first, second = rng.sample(paths, 2)
                    data = first.read_bytes()
                    if turn == 0:
                        first.write_bytes(second.read_bytes())  # swapped for another object's file
                    elif turn == 1:
                        first.write_bytes(data[: len(data) // 2])  # truncated
                    else:
                        first.write_bytes(data[:-40] + bytes(8) + data[-32:])  # a flipped payload
            elif op == "restart":
                llm.engine.shutdown()
                llm = _engine(state, adapter_folder)
            _settle(llm)
            _check(llm)
    finally:
        llm.engine.shutdown()
        shutil.rmtree(state.parent, ignore_errors=True)
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, f"a transfer thread failed (a pinned or moving object was moved?): {failures}"
