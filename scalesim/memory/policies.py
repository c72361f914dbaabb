"""Eviction policies as small key functions: the object with the LARGEST key is demoted first.

Each takes the object and a `PolicyContext` and returns a sortable tuple. Adding a policy is
adding a function here and a line in POLICIES.
"""

import math
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

from scalesim.distance.tracker import DistanceTracker
from scalesim.memory.resident import ResidentObject, TierBandwidth

INF = math.inf


@dataclass
class PolicyContext:
    tracker: DistanceTracker
    bandwidth: TierBandwidth
    future: dict[str, list[float]] = field(default_factory=dict)  # oracle: sorted steps of each agent's calls

    def next_call_step(self, agent_id: str) -> float:
        """Oracle only: the true step of the agent's next call at or after now."""
        calls = self.future.get(agent_id, [])
        i = bisect_left(calls, self.tracker.step)
        return calls[i] if i < len(calls) else INF


def _reload_cost_per_byte(obj: ResidentObject, ctx: PolicyContext) -> float:
    return obj.reload_seconds(ctx.bandwidth, "host") / max(obj.nbytes, 1)


def scalesim_key(obj: ResidentObject, ctx: PolicyContext) -> tuple:
    """Farthest next call first (min over owners); then cheapest to bring back; then least recent."""
    expected = min((ctx.tracker.expected_step(a) for a in obj.owners), default=INF)
    return (expected, -_reload_cost_per_byte(obj, ctx), -obj.last_use_s)


def lru_key(obj: ResidentObject, ctx: PolicyContext) -> tuple:
    """Least recently used first: SGLang's radix cache and LoRA pool."""
    return (-obj.last_use_s,)


def lfu_key(obj: ResidentObject, ctx: PolicyContext) -> tuple:
    """Least frequently used first, then least recent."""
    return (-obj.use_count, -obj.last_use_s)


def oracle_key(obj: ResidentObject, ctx: PolicyContext) -> tuple:
    """Belady: the object whose owners call farthest in the true future goes first."""
    return (min((ctx.next_call_step(a) for a in obj.owners), default=INF), -obj.last_use_s)


@dataclass(frozen=True)
class Policy:
    name: str
    key: Callable[[ResidentObject, PolicyContext], tuple]
    prefetch: bool
    unbounded_device: bool = False


POLICIES = {
    "scalesim": Policy("scalesim", scalesim_key, prefetch=True),
    "lru": Policy("lru", lru_key, prefetch=False),
    "lfu": Policy("lfu", lfu_key, prefetch=False),
    "oracle": Policy("oracle", oracle_key, prefetch=True),
    "ideal": Policy("ideal", lru_key, prefetch=False, unbounded_device=True),
}
