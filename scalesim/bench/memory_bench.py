"""Cost of one memory decision at scale: 10,000 agents owning 100,000 resident objects.

Objects are plain resident objects of random sizes (the manager does not care about kinds),
each owned by one agent; a tenth are shared by a few agents. Each timed round is what a serving
step does: a hint moves some agents (re-keying their objects), then one eviction decision frees
room for an object and one prefetch decision runs. Reports p50/p99 milliseconds per decision.
"""

import random
import statistics
import time
from dataclasses import dataclass

import torch

from scalesim.distance.tracker import DistanceTracker
from scalesim.engine.block_pool import BlockPool
from scalesim.memory.manager import MemoryManager, PrefetchSettings
from scalesim.memory.policies import POLICIES
from scalesim.memory.resident import ResidentObject
from scalesim.models.config import ModelConfig

BLOCK_TOKENS = 16
_CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=1,
                      rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_bias=False)


class _State(ResidentObject):
    kind = "bench"

    def __init__(self, index: int, nbytes: int, owners: set[str]) -> None:
        super().__init__()
        self._key, self._nbytes, self._tier = f"obj:{index}", nbytes, "host"
        self.owners = owners

    key = property(lambda self: self._key)
    nbytes = property(lambda self: self._nbytes)
    tier = property(lambda self: self._tier)
    pin_count = property(lambda self: 0)

    def move_to(self, tier: str) -> None:
        self._tier = tier


@dataclass
class MemoryBenchResult:
    agents: int
    objects: int
    decisions: int
    device_objects_at_start: int
    eviction_ms_p50: float
    eviction_ms_p99: float
    prefetch_ms_p50: float
    prefetch_ms_p99: float
    decision_ms_p50: float
    decision_ms_p99: float


def _percentile(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[int(q) - 1], 4)


def run_memory_bench(num_agents: int, num_objects: int, decisions: int, seed: int = 0) -> MemoryBenchResult:
    rng = random.Random(seed)
    block_nbytes = _CONFIG.kv_bytes_per_token * 4 * BLOCK_TOKENS
    device_blocks = num_objects // 4 * 2  # a quarter of the objects fit on the device
    pool = BlockPool(_CONFIG, device_blocks * block_nbytes, BLOCK_TOKENS, torch.float32, "cpu")
    tracker = DistanceTracker()
    manager = MemoryManager(pool, tracker, POLICIES["scalesim"], host_nbytes=10**15, store=None,
                            prefetch=PrefetchSettings(max_bytes_in_flight=4 * block_nbytes))
    agents = [f"agent-{i}" for i in range(num_agents)]
    objects = []
    for i in range(num_objects):
        owners = {rng.choice(agents)} if rng.random() > 0.1 else set(rng.sample(agents, 3))
        objects.append(_State(i, rng.randint(1, 3) * block_nbytes, owners))
        manager.add(objects[-1])
    manager.agents_changed(tracker.hint({a: rng.randint(0, 50) for a in agents}))
    for obj in objects:
        if pool.num_free < obj.device_blocks_needed(block_nbytes):
            break
        manager.promote(obj)
    device_objects = sum(o.tier == "device" for o in objects)
    evictions, prefetches = [], []
    for step in range(1, decisions + 1):
        tracker.advance(step)
        manager.agents_changed(tracker.hint({rng.choice(agents): rng.randint(0, 50) for _ in range(5)}))
        started = time.perf_counter()
        manager.make_device_room(pool.num_free + rng.randint(1, 3))
        evictions.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        manager.prefetch_once()
        prefetches.append((time.perf_counter() - started) * 1e3)
    both = evictions + prefetches
    return MemoryBenchResult(
        agents=num_agents, objects=num_objects, decisions=decisions,
        device_objects_at_start=device_objects,
        eviction_ms_p50=_percentile(evictions, 50), eviction_ms_p99=_percentile(evictions, 99),
        prefetch_ms_p50=_percentile(prefetches, 50), prefetch_ms_p99=_percentile(prefetches, 99),
        decision_ms_p50=_percentile(both, 50), decision_ms_p99=_percentile(both, 99))
