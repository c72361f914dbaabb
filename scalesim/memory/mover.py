"""Moves between tiers, in three phases: claim under the lock, copy with no lock, commit.

`begin` (lock held) claims the target tier's room and marks the object moving; `transfer` copies
or reads or writes the bytes — on a worker thread with the manager lock released, so the engine
keeps scheduling meanwhile, and on CUDA on that thread's side stream (memory/copy_stream.py) — and `finish` (lock held) commits the move and releases the source
tier's room, or on failure gives the claimed room back. A copy that fails its checksum, or a
source that cannot be read, is handed to `on_bad_copy` (KV is forgotten and recomputed; a
weight records its load error), so nothing is ever served from a bad copy.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from scalesim.memory.copy_stream import CopyStreams
from scalesim.memory.disk_store import CorruptObjectError, DiskFullError
from scalesim.memory.index import ObjectIndex
from scalesim.memory.resident import ResidentObject
from scalesim.memory.stats import MemoryStats
from scalesim.memory.tiers import Tiers

logger = logging.getLogger(__name__)


class MoveRefused(RuntimeError):
    """A move was asked for that its object or its target tier cannot take now (a caller's bug:
    callers check `fits`/`can_stage` and the object's state under the same lock hold)."""


@dataclass
class Move:
    obj: ResidentObject
    source: str
    target: str
    host_claimed: int = 0


class Mover:
    def __init__(self, lock: threading.RLock, index: ObjectIndex, tiers: Tiers, stats: MemoryStats,
                 on_bad_copy: Callable[[ResidentObject], None]) -> None:
        self.lock = lock
        self.copies = CopyStreams(tiers.pool.device)
        self.finished = threading.Condition(lock)  # notified when a move commits or is undone
        self.index = index
        self.tiers = tiers
        self.stats = stats
        self.on_bad_copy = on_bad_copy
        self.in_flight_nbytes = 0

    def fits(self, obj: ResidentObject, target: str) -> bool:
        """The target tier has room for `obj` now (device: free blocks; host: budget; disk: budget)."""
        if target == "device":
            return self.tiers.device_fits(obj)
        if target == "host":
            return self.tiers.host_charge(obj) <= self.tiers.host_free_nbytes
        return obj.has_disk_copy or not obj.writes_to_disk or obj.nbytes <= self.tiers.disk_free_nbytes

    def can_stage(self, obj: ResidentObject) -> bool:
        """A demotion to disk may be staged in the write buffer (for a transfer thread to write)."""
        tiers = self.tiers
        return (tiers.store is not None and obj.writes_to_disk and not obj.has_disk_copy
                and obj.nbytes <= tiers.disk_free_nbytes - tiers.staged_nbytes
                and tiers.staged_nbytes + obj.nbytes <= tiers.write_buffer_nbytes)

    def begin(self, obj: ResidentObject, target: str, defer_write: bool = False) -> Move:
        """Claim `target`'s room and mark the object moving (lock held; the caller checked `fits`,
        or `can_stage` for a deferred write). Raises `MoveRefused`, with nothing claimed, if the
        object is moving or pinned away from the device, or the room is gone."""
        if obj.moving_to is not None or (obj.pin_count and target != "device"):
            raise MoveRefused(f"{obj.key} is {'moving' if obj.moving_to else 'pinned'}")
        move = Move(obj, obj.tier, target)
        if target == "device":
            claimed = self.tiers.reserve_device(obj)
        elif target == "host":
            charge = self.tiers.host_charge(obj)
            claimed = self.tiers.claim_host(charge)
            move.host_claimed = charge if claimed else 0
        else:
            claimed = not defer_write or self.tiers.stage(obj)
        if not claimed:
            raise MoveRefused(f"no {target} room for {obj.key}")
        obj.begin_move(target, defer_write=defer_write)
        self.in_flight_nbytes += obj.nbytes
        return move

    def transfer(self, move: Move, unlock: bool) -> BaseException | None:
        """Run the copy; with `unlock`, release the manager lock (all its levels) while it runs."""
        started = time.perf_counter()
        error = None
        saved = self.lock._release_save() if unlock else None  # every level of the RLock, as Condition does
        try:
            with self.copies.moving():
                move.obj.transfer()
        except Exception as exc:  # reported to finish(), which undoes the move
            error = exc
        finally:
            if unlock:
                self.lock._acquire_restore(saved)
        self.stats.add("transfer_s", move.obj.kind, time.perf_counter() - started,
                       tier=f"{move.source}_to_{move.target}")
        return error

    def finish(self, move: Move, error: BaseException | None) -> bool:
        """Commit the move, or undo it after `error` (lock held); True if it committed."""
        obj, tiers = move.obj, self.tiers
        self.in_flight_nbytes -= obj.nbytes
        self.finished.notify_all()  # heard once the caller releases the lock, after the move settled
        if error is None:
            obj.commit_move()
            tiers.settle(obj)
            if move.source == "device":
                tiers.release_device(obj)
            elif move.source == "host":
                tiers.release_host(tiers.host_charge(obj))
            direction = "bytes_in" if move.target == "device" else "bytes_out"
            self.stats.add(direction, obj.kind, obj.nbytes, tier=f"{move.source}_to_{move.target}")
            self.index.rekey(obj)
            return True
        obj.abort_move()
        tiers.settle(obj)
        if move.target == "device":
            tiers.release_device(obj)
        tiers.release_host(move.host_claimed)
        self.index.rekey(obj)
        if isinstance(error, DiskFullError):
            logger.warning("disk full, %s stays in %s: %s", obj.key, move.source, error)
            self.stats.add("disk_full", obj.kind)
        elif isinstance(error, CorruptObjectError):
            logger.warning("discarding %s: %s", obj.key, error)
            self.stats.add("corrupt", obj.kind)
            obj.load_error = str(error)  # no load retries it (a request recomputes its pages)
            self.on_bad_copy(obj)
        else:
            logger.warning("cannot move %s to %s: %s", obj.key, move.target, error)
            self.stats.add("load_failed" if move.target == "device" else "move_failed", obj.kind)
            obj.load_error = str(error)
            self.on_bad_copy(obj)
        return False

    def move(self, obj: ResidentObject, target: str, unlock: bool = False, defer_write: bool = False) -> bool:
        """All three phases (lock held by the caller; released during the copy with `unlock`)."""
        move = self.begin(obj, target, defer_write)
        return self.finish(move, self.transfer(move, unlock))
