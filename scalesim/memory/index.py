"""The index of resident objects: by key, by owning agent, and in policy order per tier.

Objects are ranked in groups. For a policy with an agent part (memory/policies.py), the objects
owned by one agent alone form that agent's group; an object shared by several agents (a common
system prompt) is a group of its own, whose agent part is the nearest owner's, kept in a small
lazy heap of its owners. Each group keeps its members per tier in a small heap by member key, and
each tier ranks the groups by their best member's whole key (largest on top; `wanted`, over the
tiers off the device, smallest on top). So:
- an agent whose expected step moves costs one heap push per tier it has objects in (plus its
  shared objects), never one per object: work per step follows change, not population;
- touching or moving an object costs O(log) in its group and its tier;
- a decision reads the top of one heap; nothing scans every object.
All heaps are lazily invalidated (memory/heap.py).
"""

import heapq
import itertools
import math

from scalesim.distance.tracker import DistanceTracker
from scalesim.memory.heap import LazyHeap, negated
from scalesim.memory.policies import Policy, PolicyContext
from scalesim.memory.resident import TIERS, ResidentObject

INF = math.inf
WANTED = "wanted"  # the members of a group that are off the device, smallest key first
_RANKED = (*TIERS, WANTED)
_order = itertools.count()
OWNER_HEAP_MIN_OWNERS = 9  # fewer owners than this: the nearest is remembered, found again by a direct min


class _Members:
    """One group's members in one tier: a heap of (sort key, version, object key)."""

    __slots__ = ("entries", "live")

    def __init__(self) -> None:
        self.entries: list = []
        self.live = 0


class ObjectIndex:
    def __init__(self, policy: Policy, ctx: PolicyContext) -> None:
        self.policy = policy
        self.ctx = ctx
        self.tracker: DistanceTracker = ctx.tracker
        ctx.nearest = self.nearest
        self.grouped = policy.agent_key is not None
        self.objects: dict[str, ResidentObject] = {}
        self.by_agent: dict[str, set[ResidentObject]] = {}
        self._shared: dict[str, set[ResidentObject]] = {}   # agent -> its objects that other agents own too
        self._owner_heaps: dict[str, list[tuple[float, str]]] = {}  # many owners: a lazy heap of them
        self._nearest_owner: dict[str, tuple[float, str]] = {}  # few owners: (key, agent) of the nearest
        self._ranks = {tier: LazyHeap() for tier in (*TIERS, WANTED)}  # groups by their best member
        self._members: dict[str, dict] = {tier: {} for tier in (*TIERS, WANTED)}  # tier -> group -> _Members
        self._placed: dict[str, tuple] = {}  # object key -> (version, group, tier) of its live entries

    def __len__(self) -> int:
        return len(self.objects)

    def __contains__(self, obj: ResidentObject) -> bool:
        return self.objects.get(obj.key) is obj

    def get(self, key: str) -> ResidentObject | None:
        return self.objects.get(key)

    def of_agent(self, agent_id: str) -> set[ResidentObject]:
        return self.by_agent.get(agent_id, set())

    # --- membership ----------------------------------------------------------------------
    def add(self, obj: ResidentObject) -> None:
        self.objects[obj.key] = obj
        for agent in obj.owners:
            self.by_agent.setdefault(agent, set()).add(obj)
            self.tracker.track(agent)
        self._note_shared(obj)
        self.rekey(obj)

    def remove(self, obj: ResidentObject) -> None:
        if self.objects.get(obj.key) is not obj:
            return
        self._unplace(obj)
        del self.objects[obj.key]
        self._owner_heaps.pop(obj.key, None)
        self._nearest_owner.pop(obj.key, None)
        for agent in obj.owners:
            for table in (self.by_agent, self._shared):
                owned = table.get(agent)
                if owned is not None:
                    owned.discard(obj)
                    if not owned:
                        del table[agent]

    def add_owner(self, obj: ResidentObject, agent_id: str) -> None:
        if agent_id in obj.owners:
            return
        obj.owners.add(agent_id)
        self.owner_added(obj, agent_id)

    def owner_added(self, obj: ResidentObject, agent_id: str) -> None:
        """`agent_id` was just added to `obj.owners`: rank the object for it."""
        self.tracker.track(agent_id)
        if obj in self:
            self.by_agent.setdefault(agent_id, set()).add(obj)
            self._note_shared(obj)
            heap = self._owner_heaps.get(obj.key)
            if heap is not None:
                heapq.heappush(heap, (self._agent_key(agent_id), agent_id))
            self._nearest_owner.pop(obj.key, None)
            self.rekey(obj)

    def _note_shared(self, obj: ResidentObject) -> None:
        if len(obj.owners) > 1:
            for agent in obj.owners:
                self._shared.setdefault(agent, set()).add(obj)

    # --- keys ----------------------------------------------------------------------------
    def _agent_key(self, agent_id: str) -> float:
        return self.policy.agent_key(agent_id, self.ctx)

    def nearest(self, obj: ResidentObject) -> float:
        """The policy's agent key of the object's nearest owner (inf for none)."""
        owners = obj.owners
        if len(owners) <= 1:
            return self._agent_key(next(iter(owners))) if owners else INF
        if len(owners) < OWNER_HEAP_MIN_OWNERS:
            nearest = min((self._agent_key(a), a) for a in owners)
            self._nearest_owner[obj.key] = nearest
            return nearest[0]
        heap = self._owner_heaps.get(obj.key)
        if heap is None or len(heap) > 2 * len(owners) + 8:
            heap = self._owner_heaps[obj.key] = [(self._agent_key(a), a) for a in owners]
            heapq.heapify(heap)
        while heap:
            value, agent = heap[0]
            if agent in owners and self._agent_key(agent) == value:
                return value
            heapq.heappop(heap)
        del self._owner_heaps[obj.key]
        return self.nearest(obj)

    def key(self, obj: ResidentObject) -> tuple:
        return self.policy.key(obj, self.ctx)

    def _group(self, obj: ResidentObject):
        """An agent's id for an object it owns alone (under a policy with an agent part), else the object."""
        if self.grouped and len(obj.owners) == 1:
            return next(iter(obj.owners))
        return obj

    def _group_value(self, group) -> float:
        return self._agent_key(group) if isinstance(group, str) else self.nearest(group)

    # --- placing entries -----------------------------------------------------------------
    def _push_member(self, tier: str, group, sort_key: tuple, version: int, key: str) -> None:
        members = self._members[tier].get(group)
        if members is None:
            members = self._members[tier][group] = _Members()
        heapq.heappush(members.entries, (sort_key, version, key))
        members.live += 1
        if len(members.entries) > 2 * members.live + 8:
            members.entries = [e for e in members.entries if self._placed.get(e[2], (None,))[0] == e[1]]
            heapq.heapify(members.entries)

    def _refresh(self, tier: str, group, value: float | None = None) -> None:
        """Re-rank `group` in `tier` by its best live member (or take it out); `value` is the
        group's agent key when the caller has it."""
        members = self._members[tier].get(group)
        entries = members.entries if members is not None else []
        placed = self._placed
        while entries and placed.get(entries[0][2], (None,))[0] != entries[0][1]:
            heapq.heappop(entries)
        if not entries:
            self._members[tier].pop(group, None)
            self._ranks[tier].discard(group)
            return
        member = entries[0][0]
        if self.grouped:
            if value is None:
                value = self._group_value(group)
            member = (value, *member) if tier == WANTED else (-value, *member)
        self._ranks[tier].push(group, member)

    def _unplace(self, obj: ResidentObject) -> None:
        placed = self._placed.pop(obj.key, None)
        if placed is None:
            return
        _, group, tier = placed
        for t in (tier, WANTED) if tier != "device" else (tier,):
            members = self._members[t].get(group)
            if members is not None:
                members.live -= 1
            self._refresh(t, group)

    def rekey(self, obj: ResidentObject) -> None:
        """Rank the object under its current key, group and tier."""
        if self.objects.get(obj.key) is not obj:
            return
        tier, group = obj.tier, self._group(obj)
        placed = self._placed.get(obj.key)
        if placed is not None and placed[1:] == (group, tier):  # same place: its new entries supersede the old
            self._members[tier][group].live -= 1
            if tier != "device":
                self._members[WANTED][group].live -= 1
        else:
            self._unplace(obj)
        if tier is None:
            return
        member, version = self.policy.member_key(obj, self.ctx), next(_order)
        self._placed[obj.key] = (version, group, tier)
        self._push_member(tier, group, negated(member), version, obj.key)
        self._refresh(tier, group)
        if tier != "device":
            self._push_member(WANTED, group, member, version, obj.key)
            self._refresh(WANTED, group)

    def take(self, obj: ResidentObject) -> None:
        """Leave the ranking until the next `rekey` (a victim being considered)."""
        self._unplace(obj)

    def agents_changed(self, agents) -> None:
        """The agent key of `agents` changed: re-rank their groups and their shared objects."""
        if not self.grouped:
            return
        for agent in agents:
            value = self._agent_key(agent)
            for tier in _RANKED:
                self._rerank(tier, agent, value)
            shared = self._shared.get(agent)
            if shared:
                for obj in shared:
                    self._owner_moved(obj, agent, value)

    def _rerank(self, tier: str, group, value: float) -> None:
        """A group's agent key is now `value`: re-rank it in `tier` (its best member is unchanged)."""
        ranks = self._ranks[tier]
        ranked = ranks.key_of(group)
        if ranked is not None:
            ranks.push(group, (value, *ranked[1:]) if tier == WANTED else (-value, *ranked[1:]))

    def _owner_moved(self, obj: ResidentObject, agent: str, value: float) -> None:
        """One owner of a shared object has a new agent key: re-rank the object if its nearest
        owner's key changed (for many owners, known without looking at them all: only if this
        owner is now nearer than the nearest, or was the nearest)."""
        heap = self._owner_heaps.get(obj.key)
        if heap is not None:
            nearest_value, nearest_agent = heap[0]
            heapq.heappush(heap, (value, agent))
            if value >= nearest_value and nearest_agent != agent:
                if len(heap) > 2 * len(obj.owners) + 8:
                    self.nearest(obj)  # rebuilds it
                return  # another owner is at least as near, and its entry is current
        else:
            known = self._nearest_owner.get(obj.key)
            if known is not None and value >= known[0] and known[1] != agent:
                return  # another owner is at least as near
        placed = self._placed.get(obj.key)
        if placed is None:
            return
        nearest = self.nearest(obj)
        ranked = self._ranks[placed[2]].key_of(obj)
        if ranked is not None and -ranked[0] == nearest:
            return  # its nearest owner's key did not move
        self._rerank(placed[2], obj, nearest)
        if placed[2] != "device":
            self._rerank(WANTED, obj, nearest)

    # --- reading the order ---------------------------------------------------------------
    def _top(self, tier: str) -> tuple[ResidentObject, tuple] | None:
        ranks = self._ranks[tier]
        while True:
            top = ranks.peek()
            if top is None:
                return None
            group, rank_key = top
            members = self._members[tier].get(group)
            if members is None or not members.entries or \
                    self._placed.get(members.entries[0][2], (None,))[0] != members.entries[0][1]:
                self._refresh(tier, group)  # its best member left: rank it by the next one
                continue
            return self.objects[members.entries[0][2]], rank_key

    def top(self, tier: str) -> tuple[ResidentObject, tuple] | None:
        """The object of `tier` with the largest key, and that key; None if the tier is empty."""
        found = self._top(tier)
        return None if found is None else (found[0], negated(found[1]))

    def top_wanted(self) -> tuple[ResidentObject, tuple] | None:
        """The object off the device with the smallest key (its owners call soonest), and that key."""
        return self._top(WANTED)

    def room_above(self, expected_step: float) -> tuple | None:
        """The key prefix a prefetch for `expected_step` may displace objects above (hysteresis:
        only those whose owners call in a strictly later step); None: any victim."""
        return (expected_step,)
