"""On-demand loads: one group per waiting request, and the holds that keep loaded state in place.

A waiting request names the objects it needs on the device (its weights and its off-device
prefix pages); they overtake every prefetch. Groups are served first come first served: a later
group never takes room that an earlier one is waiting for, but loads of several groups may be in
flight at once. What a group has loaded is held (never evicted) until its request is admitted or
leaves, so that requests waiting together cannot evict each other's state (thrashing).

Stall is measured twice: `stall_s` is wall-clock time during which at least one request waited
for a load, `stall_request_s` the sum of every request's own wait.
"""

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from scalesim.memory.resident import ResidentObject
from scalesim.memory.stats import MemoryStats


@dataclass
class LoadGroup:
    objects: list[ResidentObject]
    waiting_since_s: float | None = None   # None once everything it asked for is on the device
    held: set[str] = field(default_factory=set)
    loaded_nbytes: Counter = field(default_factory=Counter)  # (kind, source tier) -> bytes loaded for it


class LoadGroups:
    def __init__(self, stats: MemoryStats) -> None:
        self.stats = stats
        self.groups: OrderedDict[int, LoadGroup] = OrderedDict()
        self.held: Counter[str] = Counter()
        self._waiting = 0
        self._stall_started_s = 0.0

    def is_held(self, key: str) -> bool:
        return key in self.held

    @property
    def waiting(self) -> bool:
        """Some request waits for a load now."""
        return self._waiting > 0

    def request(self, group_id: int, objects: list[ResidentObject]) -> None:
        """(Re)state what a waiting request still needs on the device."""
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = LoadGroup([])
        group.objects = list(objects)
        if objects and group.waiting_since_s is None:
            self._start_waiting(group)

    def credit(self, group_id: int, obj: ResidentObject, source: str) -> None:
        """`obj` was loaded from `source` for this group's request."""
        group = self.groups.get(group_id)
        if group is not None:
            group.loaded_nbytes[(obj.kind, source)] += obj.nbytes

    def hold(self, group_id: int, obj: ResidentObject) -> None:
        group = self.groups[group_id]
        if obj.key not in group.held:
            group.held.add(obj.key)
            self.held[obj.key] += 1

    def done_waiting(self, group_id: int) -> None:
        """Everything the group asked for is on the device (and held)."""
        group = self.groups[group_id]
        group.objects = []
        if group.waiting_since_s is not None:
            self._stop_waiting(group)

    def release(self, group_id: int) -> tuple[list[str], Counter]:
        """The request was admitted (its state is pinned now) or left; return the keys no longer
        held, and the bytes loaded for it by (kind, source tier)."""
        group = self.groups.pop(group_id, None)
        if group is None:
            return [], Counter()
        if group.waiting_since_s is not None:
            self._stop_waiting(group)
        return self._unhold(group.held), group.loaded_nbytes

    def release_all_holds(self) -> list[str]:
        """Nothing can start: let everything held be evicted again (the groups stay queued)."""
        freed = []
        for group in self.groups.values():
            freed += self._unhold(group.held)
            group.held = set()
        return freed

    def _unhold(self, keys: set[str]) -> list[str]:
        freed = []
        for key in keys:
            self.held[key] -= 1
            if self.held[key] <= 0:
                del self.held[key]
                freed.append(key)
        return freed

    def _start_waiting(self, group: LoadGroup) -> None:
        group.waiting_since_s = now = time.perf_counter()
        if self._waiting == 0:
            self._stall_started_s = now
        self._waiting += 1

    def _stop_waiting(self, group: LoadGroup) -> None:
        now = time.perf_counter()
        self.stats.stall_request_s += now - group.waiting_since_s
        group.waiting_since_s = None
        self._waiting -= 1
        if self._waiting == 0:
            self.stats.stall_s += now - self._stall_started_s

    def stall_s_now(self) -> float:
        """Wall-clock stall so far, including a stall still under way."""
        extra = time.perf_counter() - self._stall_started_s if self._waiting else 0.0
        return self.stats.stall_s + extra
