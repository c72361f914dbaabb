"""An index with two orders: one policy's key picks victims, another's picks what to prefetch.

A policy whose prefetch ranks objects differently from its eviction (memory/policies.py,
`Policy.prefetch_order`; the `scalesim-prefetch-only` ablation: least recently used first out,
invocation distance first in) gets this index. It is the eviction order's ObjectIndex, kept as
usual, plus a second ObjectIndex in the prefetch order that answers `top_wanted` and `nearest`.
Every change of membership, owner or key reaches both.

An eviction order without distance cannot keep a prefetch's hysteresis (displace only objects
whose owners call later): its victims are not ranked by step, so a prefetch displaces whatever
the eviction order puts first, as such a system would. The prefetcher's own guards stay: the cap
on bytes prefetched and unused, and the shorter lookahead after a prefetch is pushed out unused.
"""

from scalesim.memory.index import ObjectIndex
from scalesim.memory.policies import Policy, PolicyContext
from scalesim.memory.resident import ResidentObject


class TwoOrderIndex(ObjectIndex):
    def __init__(self, policy: Policy, ctx: PolicyContext) -> None:
        if policy.agent_key is not None or policy.prefetch_order is None:
            raise ValueError(f"policy {policy.name!r}: two orders need an eviction order blind to agents "
                             "and a prefetch order")
        super().__init__(policy, ctx)
        self.wanted = ObjectIndex(policy.prefetch_order, ctx)  # (ctx.nearest is now the prefetch order's)

    def add(self, obj: ResidentObject) -> None:
        super().add(obj)
        self.wanted.add(obj)

    def remove(self, obj: ResidentObject) -> None:
        super().remove(obj)
        self.wanted.remove(obj)

    def owner_added(self, obj: ResidentObject, agent_id: str) -> None:
        super().owner_added(obj, agent_id)
        self.wanted.owner_added(obj, agent_id)

    def rekey(self, obj: ResidentObject) -> None:
        super().rekey(obj)
        self.wanted.rekey(obj)

    def take(self, obj: ResidentObject) -> None:
        super().take(obj)
        self.wanted.take(obj)

    def agents_changed(self, agents) -> None:
        self.wanted.agents_changed(agents)  # the eviction order has no agent part

    def nearest(self, obj: ResidentObject) -> float:
        return self.wanted.nearest(obj)

    def top_wanted(self) -> tuple[ResidentObject, tuple] | None:
        return self.wanted.top_wanted()

    def room_above(self, expected_step: float) -> tuple | None:
        return None


def index_for(policy: Policy, ctx: PolicyContext) -> ObjectIndex:
    """The index a policy needs: one order, or two when its prefetch ranks differently."""
    return ObjectIndex(policy, ctx) if policy.prefetch_order is None else TwoOrderIndex(policy, ctx)
