"""Eviction policies as small key functions: the object with the LARGEST key is demoted first.

A policy's key is `(agent_key of the nearest owner, *member_key(obj))`, or just `member_key(obj)`
for policies blind to agents. `agent_key(agent, ctx)` is a number per agent (for `scalesim` its
expected step, for `oracle` its true next call); an object shared by several agents takes the
smallest over its owners. `member_key` orders objects whose agent part is equal (tie-breakers,
or the whole key of a recency policy). Splitting the key this way lets the index rank an agent's
objects as one group, so that an agent whose expected step moves costs one heap update per tier,
whatever the number of its objects. Adding a policy is adding its functions and a line in POLICIES.
"""

import math
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

from scalesim.distance.tracker import DistanceTracker
from scalesim.memory.resident import ResidentObject, TierBandwidth
from scalesim.memory.slot_pool import SGLANG_MAX_LORAS_PER_BATCH, VLLM_MAX_CPU_LORAS, VLLM_MAX_LORAS

INF = math.inf


@dataclass
class PolicyContext:
    tracker: DistanceTracker
    bandwidth: TierBandwidth
    nearest: Callable[[ResidentObject], float] = lambda obj: INF  # the policy's agent_key over owners (the index's)
    future: dict[str, list[float]] = field(default_factory=dict)  # oracle: sorted steps of each agent's calls
    calls_made: dict[str, int] = field(default_factory=dict)      # oracle: requests each agent has issued

    def next_call_step(self, agent_id: str) -> float:
        """Oracle only: the true step of the agent's next call not yet issued, at request
        granularity: an agent whose call of this step has been made is next due at its
        following call, not now."""
        calls = self.future.get(agent_id, [])
        i = max(bisect_left(calls, self.tracker.step), self.calls_made.get(agent_id, 0))
        return calls[i] if i < len(calls) else INF

    def call_made(self, agent_id: str) -> None:
        if self.future:
            self.calls_made[agent_id] = self.calls_made.get(agent_id, 0) + 1


def expected_step(agent_id: str, ctx: PolicyContext) -> float:
    """The tracker's estimate of the step of the agent's next call (invocation distance)."""
    return ctx.tracker.expected_step(agent_id)


def true_next_call(agent_id: str, ctx: PolicyContext) -> float:
    """Belady: the step of the agent's next call in the recorded trace."""
    return ctx.next_call_step(agent_id)


def cheapest_then_least_recent(obj: ResidentObject, ctx: PolicyContext) -> tuple:
    """Ties of distance: cheapest to bring back per byte first, then least recently used."""
    return (-obj.reload_seconds(ctx.bandwidth, "host") / max(obj.nbytes, 1), -obj.last_use_s)


def least_recent(obj: ResidentObject, ctx: PolicyContext) -> tuple:
    return (-obj.last_use_s,)


def least_frequent(obj: ResidentObject, ctx: PolicyContext) -> tuple:
    return (-obj.use_count, -obj.last_use_s)


@dataclass(frozen=True)
class Policy:
    name: str
    member_key: Callable[[ResidentObject, PolicyContext], tuple]
    agent_key: Callable[[str, PolicyContext], float] | None
    prefetch: bool
    unbounded_device: bool = False
    # The tiers of the deployment the policy copies, whatever the regime: None follows the regime;
    # `host_per_device` is the host budget as a multiple of the device's (0: no host tier).
    host_per_device: float | None = None
    disk: bool | None = None
    # Adapters in a fixed pool of this many device slots, outside KV's budget (memory/slot_pool.py);
    # None: adapters share the device budget with KV pages under the policy's key.
    adapter_slots: int | None = None
    # Most adapters held at once in the slots and on the host together (vLLM's --max-cpu-loras);
    # past it the least recently used host copies are dropped and read from their files again.
    # None: every adapter stays in host memory (SGLang).
    adapter_held_cap: int | None = None
    # The policy whose key ranks off-device objects for prefetch, when it is not this one (an
    # eviction order blind to agents with a prefetch by distance: memory/two_order_index.py).
    prefetch_order: "Policy | None" = None

    @property
    def prefetch_is_use(self) -> bool:
        """A prefetch sets the object's recency where eviction is blind to distance: a recency
        order would otherwise push the prefetched object out first."""
        return self.agent_key is None

    def key(self, obj: ResidentObject, ctx: PolicyContext) -> tuple:
        """The object's whole key (largest is evicted first)."""
        member = self.member_key(obj, ctx)
        return member if self.agent_key is None else (ctx.nearest(obj), *member)


# the invocation-distance policy: farthest next call first, then the tie-breakers
SCALESIM = Policy("scalesim", cheapest_then_least_recent, expected_step, prefetch=True)

POLICIES = {
    "scalesim": SCALESIM,
    # the recency ablation of this machinery (no prefetch, blind to hints)
    "lru": Policy("lru", least_recent, None, prefetch=False),
    "lfu": Policy("lfu", least_frequent, None, prefetch=False),
    # the true future from a recorded trace (Belady), at request granularity
    "oracle": Policy("oracle", least_recent, true_next_call, prefetch=True),
    # no budget: the device holds everything the trace ever caches, nothing is moved or dropped
    "ideal": Policy("ideal", least_recent, None, prefetch=False, unbounded_device=True, host_per_device=0, disk=False),
    # SGLang's default RadixCache (python/sglang/srt/mem_cache/radix_cache.py): LRU over the tree's
    # leaves, device only, what is evicted is recomputed. Leaves first holds here because a use
    # touches a request's path from its leaf up (a parent is never less recent than its child)
    # and only a node without children can be dropped. Adapters as SGLang serves LoRA (docs "LoRA
    # Serving", lora/mem_pool.py): --max-loras-per-batch 8 device slots carved out of the same
    # device memory, LRU replacement, every adapter kept in host memory outside any KV budget.
    "sglang": Policy("sglang", least_recent, None, prefetch=False, host_per_device=0, disk=False,
                     adapter_slots=SGLANG_MAX_LORAS_PER_BATCH),
    # SGLang with --enable-hierarchical-cache (HiRadixCache, docs "Hierarchical KV caching"): the
    # same LRU plus a host tier of --hicache-ratio 2.0 times the device, loaded back on demand, no
    # prefetch, no disk. Differs from SGLang: a victim is copied to the host when evicted (write
    # back) rather than when inserted (write through). Adapters as for `sglang`.
    "sglang-hicache": Policy("sglang-hicache", least_recent, None, prefetch=False, host_per_device=2.0, disk=False,
                             adapter_slots=SGLANG_MAX_LORAS_PER_BATCH),
    # vLLM's default deployment (docs "Automatic Prefix Caching", v1/core/kv_cache_manager.py and
    # block_pool.py): blocks of a finished request go to an LRU free queue, tail blocks first, and
    # are evicted from its front when new blocks are needed, device only; what is evicted is
    # recomputed. On this engine that is the same leaf-first LRU as `sglang` (vLLM caches whole
    # blocks only, as the radix tree's pages here; its CPU block is 128 tokens, this engine's
    # page 16). Adapters as vLLM serves LoRA (docs "LoRA Adapters", lora/worker_manager.py):
    # --max-loras device slots, LRU, and a CPU cache of --max-cpu-loras adapters, LRU, with every
    # other adapter read from its files when a request needs it (slot_pool.py says which values).
    "vllm": Policy("vllm", least_recent, None, prefetch=False, host_per_device=0, disk=False,
                   adapter_slots=VLLM_MAX_LORAS, adapter_held_cap=VLLM_MAX_CPU_LORAS),
    # ablation: ScaleSim's eviction order by invocation distance, without its prefetch
    "scalesim-evict-only": Policy("scalesim-evict-only", cheapest_then_least_recent, expected_step, prefetch=False),
    # ablation: ScaleSim's prefetch (what is off the device, nearest call first) on LRU eviction
    "scalesim-prefetch-only": Policy("scalesim-prefetch-only", least_recent, None, prefetch=True,
                                     prefetch_order=SCALESIM),
}
