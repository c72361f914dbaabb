"""Victim choice: the eviction cascade device -> host -> disk -> forgotten.

When a tier needs room, its unpinned objects with the largest policy key go first:
- a device victim goes to the host if the host has room or can make it from objects with an even
  larger key; else to disk if that is free (a disk copy exists, or the kind writes no file:
  weights drop their copy); else, on a worker thread, to disk by writing its file; else it is
  forgotten if it may be (KV is recomputed); else it stays and the next victim is tried;
- a host victim goes to disk the same way (the engine thread never writes a file: there a
  demotion that needs one is staged in the bounded write buffer for a transfer thread to write,
  and forgotten if that buffer is full);
- the disk makes room by forgetting its farthest objects;
- weights kept in a slot pool (memory/slot_pool.py) make room only among themselves: the least
  recently used slot nothing holds goes back to the host, where such weights always fit, unless
  the pool caps how many it holds: then the least recently used host copies are dropped (read
  from their files again when needed).
With `unlock` (worker threads) each copy runs with the manager lock released; without it (the
engine thread, which needs the room before it can go on) copies run inline.
"""

from collections.abc import Callable
from contextlib import closing

from scalesim.memory.index import ObjectIndex
from scalesim.memory.mover import Mover
from scalesim.memory.resident import ResidentObject
from scalesim.memory.stats import MemoryStats
from scalesim.memory.tiers import Tiers


def free_to_disk(obj: ResidentObject) -> bool:
    """Demoting to disk writes nothing: a valid copy is there already, or the kind keeps no file."""
    return obj.has_disk_copy or not obj.writes_to_disk


class Evictor:
    def __init__(self, index: ObjectIndex, tiers: Tiers, mover: Mover, stats: MemoryStats,
                 evictable: Callable[[ResidentObject, str], bool], forget: Callable[[ResidentObject], None],
                 on_evicted_unused: Callable[[ResidentObject], None]) -> None:
        self.index = index
        self.tiers = tiers
        self.mover = mover
        self.stats = stats
        self.evictable = evictable
        self.forget = forget
        self.on_evicted_unused = on_evicted_unused

    def _victims(self, tier: str, above: tuple | None):
        """Yield evictable objects of `tier`, largest key first, while the key exceeds `above`
        (a prefix comparison). Objects passed over are ranked again when the caller stops."""
        skipped, tried = [], set()
        try:
            while True:
                found = self.index.top(tier)
                if found is None:
                    return
                obj, key = found
                if above is not None and key[:len(above)] <= above:
                    return
                self.index.take(obj)
                if obj.key in tried or obj.tier != tier or self.tiers.in_slots(obj) or not self.evictable(obj, tier):
                    skipped.append(obj)
                    continue
                tried.add(obj.key)
                yield obj, key
                if obj in self.index and obj.tier == tier:
                    skipped.append(obj)  # it stayed (nowhere to go): rank it again
        finally:
            for obj in skipped:
                self.index.rekey(obj)

    def room_for(self, obj: ResidentObject, above: tuple | None = None, unlock: bool = False) -> bool:
        """Make the device room `obj` needs: a slot of the slot pool, or free blocks."""
        if self.tiers.in_slots(obj):
            return self.slot_room(obj, unlock)
        return self.device_room(obj.device_blocks_needed(self.tiers.block_nbytes), above, unlock)

    def slot_room(self, obj: ResidentObject, unlock: bool = False) -> bool:
        """Free a slot for `obj`: least recently used member first, skipping those in use. Under a
        held cap that has no room for one more, the victim's copy is dropped instead of kept on
        the host (it is read from its files again when needed)."""
        slots = self.tiers.slots
        for victim in slots.replaceable():
            if slots.free_slots or obj.key in slots.members:
                return True
            target = "disk" if slots.held_excess(incoming=0 if obj.tier in ("device", "host") else 1) else "host"
            if self.evictable(victim, "device") and self.mover.fits(victim, target) and self.mover.move(victim, target, unlock):
                self.stats.add("evicted", victim.kind, tier="device")
                if victim.prefetched_nbytes:
                    self.on_evicted_unused(victim)
        return slots.free_slots > 0 or obj.key in slots.members

    def trim_held(self) -> None:
        """Drop host copies past the slot pool's held cap, least recently used first, skipping
        those in use. A drop copies nothing, so it runs with the lock held throughout."""
        slots = self.tiers.slots
        if slots is None or not slots.held_excess():
            return
        for victim in slots.host_lru():
            if not slots.held_excess():
                return
            if self.evictable(victim, "host") and self.mover.move(victim, "disk"):  # `known` holds managed ones only
                self.stats.add("evicted", victim.kind, tier="host")

    def device_room(self, blocks: int, above: tuple | None = None, unlock: bool = False) -> bool:
        """Free device blocks until `blocks` are free; False if impossible. With `above`, only
        objects whose key starts with something strictly larger may be evicted (hysteresis: a
        prefetch passes the expected step, so it never displaces state needed in the same step).
        With `unlock`, blocks freed along the way are held back until all are free, so that the
        engine does not take them while a copy runs with the lock released."""
        if self.tiers.device_free_blocks >= blocks:
            return True
        pool, claimed = self.tiers.pool, 0
        try:
            with closing(self._victims("device", above)) as victims:
                for obj, key in victims:
                    if unlock:  # what is free now stays ours while the lock is released for a copy
                        take = min(pool.num_free, blocks - claimed)
                        pool.reserve(take)
                        claimed += take
                    if self._demote(obj, key, unlock):
                        self.stats.add("evicted", obj.kind, tier="device")
                        if obj.prefetched_nbytes:  # (a forgotten object was counted by `forget`)
                            self.on_evicted_unused(obj)
                    if claimed + self.tiers.device_free_blocks >= blocks:
                        return True
            return False
        finally:
            pool.unreserve(claimed)

    def _demote(self, obj: ResidentObject, key: tuple, unlock: bool) -> bool:
        if self.host_room(obj.nbytes, key, unlock):
            if not self._still_evictable(obj, "device"):
                return False
            if self.mover.fits(obj, "host"):
                return self.mover.move(obj, "host", unlock)
        elif not self._still_evictable(obj, "device"):
            return False
        return self._below_host(obj, key, unlock)

    def _still_evictable(self, obj: ResidentObject, tier: str) -> bool:
        """Making room below released the lock for a copy: a request may have taken `obj` since."""
        return obj in self.index and self.evictable(obj, tier)

    def _below_host(self, obj: ResidentObject, key: tuple, unlock: bool, may_forget: bool = True) -> bool:
        """Put a device or host object on disk, or forget it; False if it must stay."""
        if free_to_disk(obj):
            return self.mover.move(obj, "disk", unlock)
        if unlock and self.tiers.store is not None and self.disk_room(obj.nbytes, key) and self.mover.move(obj, "disk", unlock):
            return True
        if not unlock and self.mover.can_stage(obj) and self.mover.move(obj, "disk", defer_write=True):
            return True
        if may_forget and obj.droppable():
            self.forget(obj)
            return True
        return False

    def host_room(self, nbytes: int, above: tuple | None = None, unlock: bool = False,
                  may_forget: bool = True) -> bool:
        """Demote host objects (keys above `above`) until `nbytes` fit on the host; without
        `may_forget`, only to disk."""
        if self.tiers.host_free_nbytes >= nbytes:
            return True
        if nbytes > self.tiers.host_budget_nbytes:
            return False
        with closing(self._victims("host", above)) as victims:
            for obj, key in victims:
                if self._below_host(obj, key, unlock, may_forget):
                    self.stats.add("evicted", obj.kind, tier="host")
                if self.tiers.host_free_nbytes >= nbytes:
                    return True
        return False

    def disk_room(self, nbytes: int, above: tuple | None = None) -> bool:
        """Forget disk-tier objects (keys above `above`) until `nbytes` fit in the disk budget."""
        if self.tiers.disk_free_nbytes >= nbytes:
            return True
        if self.tiers.store is None or nbytes > self.tiers.store.budget_nbytes:
            return False
        with closing(self._victims("disk", above)) as victims:
            for obj, _ in victims:
                if obj.droppable():
                    self.forget(obj)
                    self.stats.add("evicted", obj.kind, tier="disk")
                if self.tiers.disk_free_nbytes >= nbytes:
                    return True
        return False
