"""Disk writes, all on the transfer threads (or at shutdown), never on the engine thread:
- staged writes: pages the engine thread demoted to disk, held in the write buffer until written
  (room on disk is made from objects farther than it; one that still cannot be written is
  forgotten, with the pages that depend on it, so the buffer does not clog);
- write-back: keeping a share of the host free by moving its farthest objects to disk ahead of
  need, so that demotions from the device find room on the host;
- persist: on a clean shutdown, a disk copy of every unpinned KV object, for the next start.
"""

import logging
import math
from collections.abc import Callable

from scalesim.memory.eviction import Evictor
from scalesim.memory.index import ObjectIndex
from scalesim.memory.mover import Mover
from scalesim.memory.resident import ResidentObject
from scalesim.memory.tiers import Tiers

logger = logging.getLogger(__name__)
HOST_FREE_FRACTION_TARGET = 0.1  # write-back keeps this share of the host free


class DiskWriter:
    def __init__(self, index: ObjectIndex, tiers: Tiers, mover: Mover, evictor: Evictor,
                 forget: Callable[[ResidentObject], None]) -> None:
        """`forget` frees an object and those that depend on it."""
        self.index = index
        self.tiers = tiers
        self.mover = mover
        self.evictor = evictor
        self.forget = forget

    def flush_staged(self, unlock: bool) -> int:
        """Write the staged pages (lock held); return how many were written."""
        written = 0
        for key in list(self.tiers.staged):
            obj = self.index.get(key)
            if obj is None or not obj.write_pending or obj.moving_to is not None:
                continue
            if not self.mover.fits(obj, "disk"):
                self.evictor.disk_room(obj.nbytes, self.index.key(obj))
            if self.mover.fits(obj, "disk") and self.mover.move(obj, "disk", unlock=unlock):
                written += 1
            elif obj.write_pending and obj.moving_to is None:
                self.forget(obj)  # the object and what depends on it (KV: recomputed if needed)
        return written

    def keep_host_free(self, unlock: bool) -> int:
        """Demote the host's farthest objects to disk while less than the target share is free
        (lock held); return the host bytes freed."""
        if self.tiers.store is None:
            return 0
        target = math.ceil(self.tiers.host_budget_nbytes * HOST_FREE_FRACTION_TARGET)
        before = self.tiers.host_free_nbytes
        if before < target:
            self.evictor.host_room(target, unlock=unlock, may_forget=False)
        return max(0, self.tiers.host_free_nbytes - before)

    def persist(self) -> int:
        """Write every unpinned KV object that has no disk copy yet (lock held once; released
        during each write); return how many were written."""
        if self.tiers.store is None:
            return 0
        written = 0
        for obj in list(self.index.objects.values()):
            if (obj.writes_to_disk and not obj.has_disk_copy and (obj.tier in ("device", "host") or obj.write_pending)
                    and obj.pin_count == 0 and obj.moving_to is None and self.mover.fits(obj, "disk")):
                written += self.mover.move(obj, "disk", unlock=True)
        logger.info("persisted %d KV objects to %s", written, self.tiers.store.root)
        return written
