"""Cost of the memory layer's decisions and of one simulation step, at population scale.

The real manager, index, tracker and policy code over N agents owning M resident objects (a
tenth of them shared by three agents), with what serving really has: every agent has called
twice (so each has a learned inter-arrival gap that the step clock passes), a disk store is
attached, the host tier is bounded so device evictions cascade to disk, and each step hints 1%
of the agents. Objects are of a kind whose moves are free (this times decisions, not copies).

Per step it times `hint(step=...)` as the engine runs it (parse the hint, advance the step,
apply it: re-keying whatever changed) and, after a few requests, three kinds of decision: an
eviction making device room, an on-demand load of an object off the device, and a prefetch
pass. It also measures the bookkeeping bytes per agent and per object (tracemalloc), and a hint
naming 600,000 agents nobody registered, with the longest time another thread waited for the
manager's lock meanwhile.
"""

import random
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import torch

from scalesim.distance.hints import estimate_distances
from scalesim.distance.tracker import DistanceTracker
from scalesim.engine.block_pool import BlockPool
from scalesim.memory.disk_store import DiskStore
from scalesim.memory.manager import MemoryManager, PrefetchSettings
from scalesim.memory.policies import POLICIES
from scalesim.memory.resident import ResidentObject
from scalesim.models.config import ModelConfig

BLOCK_TOKENS = 16
HINTED_SHARE = 0.01
REQUEST_SHARE = 0.005
UNKNOWN_HINT_AGENTS = 600_000
_CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=1,
                      rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_bias=False)


class _State(ResidentObject):
    kind = "bench"

    def __init__(self, index: int, nbytes: int, owners: set[str]) -> None:
        super().__init__()
        self._key, self._nbytes, self._tier = f"obj:{index}", nbytes, "disk"
        self.owners = owners

    key = property(lambda self: self._key)
    nbytes = property(lambda self: self._nbytes)
    tier = property(lambda self: self._tier)
    pin_count = property(lambda self: 0)

    def move_to(self, tier: str) -> None:
        self._tier = tier


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@dataclass
class MemoryBenchResult:
    agents: int
    objects: int
    steps: int
    decision_ms_p50: float
    decision_ms_p99: float
    eviction_ms_p99: float
    load_ms_p99: float
    prefetch_ms_p99: float
    step_ms_p50: float
    step_ms_p99: float
    agents_rekeyed_per_step: float
    metadata_bytes_per_agent: float
    metadata_bytes_per_object: float
    unknown_hint_agents: int
    unknown_hint_s: float
    unknown_hint_max_lock_wait_ms: float


def _percentile(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[int(q) - 1], 4)


def _timed_ms(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - started) * 1e3


def _unknown_hint(manager: MemoryManager, step: int) -> tuple[float, float]:
    """Seconds to parse and apply a hint naming UNKNOWN_HINT_AGENTS strangers, and the longest
    wait for the manager lock seen by another thread meanwhile (milliseconds)."""
    hint = {f"stranger-{i}": float(i % 7) for i in range(UNKNOWN_HINT_AGENTS)}
    waits, done = [], threading.Event()

    def bystander() -> None:
        while not done.is_set():
            started = time.perf_counter()
            with manager.lock:
                waits.append(time.perf_counter() - started)
            time.sleep(0.001)

    thread = threading.Thread(target=bystander)
    thread.start()
    started = time.perf_counter()
    manager.hint(estimate_distances(step, distances=hint))
    seconds = time.perf_counter() - started
    done.set()
    thread.join()
    return seconds, max(waits, default=0.0) * 1e3


def run_memory_bench(num_agents: int, num_objects: int, steps: int, seed: int = 0) -> MemoryBenchResult:
    rng = random.Random(seed)
    block_nbytes = _CONFIG.kv_bytes_per_token * 4 * BLOCK_TOKENS
    clock = _Clock()
    agents = [f"agent-{i}" for i in range(num_agents)]
    objects = []
    for i in range(num_objects):
        owners = {rng.choice(agents)} if rng.random() > 0.1 else set(rng.sample(agents, 3))
        objects.append(_State(i, rng.randint(1, 3) * block_nbytes, owners))
    total_nbytes = sum(o.nbytes for o in objects)
    pool = BlockPool(_CONFIG, total_nbytes // 4, BLOCK_TOKENS, torch.float32, "cpu")  # a quarter fits
    with tempfile.TemporaryDirectory(prefix="scalesim-memory-bench-") as state_dir:
        store = DiskStore(Path(state_dir), 10 * total_nbytes)
        tracker = DistanceTracker(clock=clock)
        manager = MemoryManager(pool, tracker, POLICIES["scalesim"], host_nbytes=total_nbytes // 4, store=store,
                                prefetch=PrefetchSettings(max_bytes_in_flight=4 * block_nbytes))
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        manager.advance(0)
        calls = []  # two calls per agent, `gap` apart: every agent gets a learned inter-arrival gap
        for a in agents:
            first_s, gap_s = rng.uniform(0.0, 1.0), rng.uniform(5.0, 100.0)
            calls += [(first_s, a), (first_s + gap_s, a)]
        for at_s, agent in sorted(calls):
            while at_s >= tracker.step + 1:
                clock.now_s = tracker.step + 1.0
                manager.advance(tracker.step + 1)
            clock.now_s = at_s
            manager.on_request(agent)
            manager.on_finish(agent)
        agent_nbytes = tracemalloc.get_traced_memory()[0] - before
        before = tracemalloc.get_traced_memory()[0]
        for obj in objects:
            manager.add(obj)
        index_nbytes = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        by_agent_nbytes = sys.getsizeof(manager.index.by_agent) + sum(sys.getsizeof(s) for s in manager.index.by_agent.values())
        for obj in objects:
            if not manager.promote(obj):
                break
        first = tracker.step + 1
        evictions, loads, prefetches, step_times, rekeyed = [], [], [], [], []
        for step in range(first, first + steps):
            clock.now_s = float(step)
            hinted = {rng.choice(agents): rng.randint(0, 50) for _ in range(max(1, int(HINTED_SHARE * num_agents)))}
            started = time.perf_counter()
            distances = estimate_distances(step, distances=hinted)
            moved = manager.advance(step)
            manager.hint(distances)
            step_times.append((time.perf_counter() - started) * 1e3)
            rekeyed.append(moved + len(hinted))
            for agent in rng.sample(agents, max(1, int(REQUEST_SHARE * num_agents))):
                manager.on_request(agent)
                for obj in list(manager.index.of_agent(agent))[:2]:
                    manager.touch(obj, agent)
                manager.on_finish(agent)
            evictions.append(_timed_ms(manager.make_device_room, pool.num_free + rng.randint(1, 3)))
            off_device = rng.choice(objects)
            loads.append(_timed_ms(manager.promote, off_device))
            prefetches.append(_timed_ms(manager.prefetch_once))
        unknown_s, lock_wait_ms = _unknown_hint(manager, first + steps)
        store.close()
    decisions = evictions + loads + prefetches
    return MemoryBenchResult(
        agents=num_agents, objects=num_objects, steps=steps,
        decision_ms_p50=_percentile(decisions, 50), decision_ms_p99=_percentile(decisions, 99),
        eviction_ms_p99=_percentile(evictions, 99), load_ms_p99=_percentile(loads, 99),
        prefetch_ms_p99=_percentile(prefetches, 99),
        step_ms_p50=_percentile(step_times, 50), step_ms_p99=_percentile(step_times, 99),
        agents_rekeyed_per_step=round(statistics.fmean(rekeyed), 1),
        metadata_bytes_per_agent=round((agent_nbytes + by_agent_nbytes) / num_agents, 1),
        metadata_bytes_per_object=round((index_nbytes - by_agent_nbytes) / num_objects, 1),
        unknown_hint_agents=UNKNOWN_HINT_AGENTS, unknown_hint_s=round(unknown_s, 3),
        unknown_hint_max_lock_wait_ms=round(lock_wait_ms, 2))
