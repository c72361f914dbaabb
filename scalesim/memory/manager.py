"""The memory manager: one byte budget per tier, shared by every kind of resident object.

Device: the engine's KV pool. KV pages occupy its blocks directly; adapters and private models
reserve blocks for their bytes while on the device, so all kinds compete for the same budget.
Host: a byte budget for demoted objects. Disk: the state directory (KV pages; weights are
"demoted to disk" by dropping their copy, their source files being the truth).

Eviction demotes the unpinned device object with the largest policy key — to the host if it
fits there (displacing host objects with an even larger key), else to disk, else drops it (KV
only). Prefetch (policies that have it) promotes the objects of the agents expected soonest,
displacing only objects with a strictly larger key. All decisions use incrementally updated
heaps; nothing scans every object. Every public method takes `lock`.
"""

import logging
import math
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from scalesim.distance.tracker import DistanceTracker
from scalesim.memory.disk_store import CorruptObjectError, DiskStore
from scalesim.memory.heap import MaxHeap
from scalesim.memory.policies import Policy, PolicyContext
from scalesim.memory.resident import ResidentObject, TierBandwidth

logger = logging.getLogger(__name__)
DEFAULT_PREFETCH_HORIZON_STEPS = 1
DEFAULT_PREFETCH_MARGIN_S = 0.05
DEFAULT_MAX_PREFETCH_BYTES_IN_FLIGHT = 256 * 2**20
DEFAULT_MAX_PREFETCHED_DEVICE_FRACTION = 0.5


@dataclass
class PrefetchSettings:
    horizon_steps: float = DEFAULT_PREFETCH_HORIZON_STEPS
    margin_s: float = DEFAULT_PREFETCH_MARGIN_S
    max_bytes_in_flight: int = DEFAULT_MAX_PREFETCH_BYTES_IN_FLIGHT
    # Prefetched-but-not-yet-used bytes may take at most this share of the device, so that
    # speculation never crowds out the requests that are running or waiting now.
    max_prefetched_device_fraction: float = DEFAULT_MAX_PREFETCHED_DEVICE_FRACTION


class MemoryManager:
    def __init__(self, pool, tracker: DistanceTracker, policy: Policy, host_nbytes: int,
                 store: DiskStore | None, bandwidth: TierBandwidth | None = None,
                 prefetch: PrefetchSettings | None = None) -> None:
        from scalesim.memory.stats import MemoryStats

        self.pool = pool
        self.tracker = tracker
        self.policy = policy
        self.host_nbytes = host_nbytes
        self.store = store
        self.ctx = PolicyContext(tracker, bandwidth or TierBandwidth())
        self.prefetch_settings = prefetch or PrefetchSettings()
        self.lock = threading.RLock()
        self.objects: dict[str, ResidentObject] = {}
        self.reserved: dict[str, list[int]] = {}
        self.heaps = {"device": MaxHeap(), "host": MaxHeap()}
        self.wanted = MaxHeap()  # objects off the device, nearest next call on top (negated keys)
        self.by_agent: dict[str, set[str]] = defaultdict(set)
        self.host_used = 0
        self.stats = MemoryStats()
        # On-demand loads, one group per waiting request, served first come first served. What a
        # group has loaded is held (never evicted) until its request is admitted or gone, so that
        # requests waiting together cannot evict each other's state (thrashing).
        self.groups: OrderedDict[int, list[ResidentObject]] = OrderedDict()
        self.group_held: dict[int, set[str]] = {}
        self.group_requested_s: dict[int, float] = {}  # when each group first asked: its wait is stall
        self.held: Counter[str] = Counter()
        self.loaded = threading.Event()  # set by the worker after serving on-demand loads
        self.wake = threading.Event()  # wakes the worker: a load was requested, a hint arrived
        self.prefetched_nbytes = 0  # on the device by prefetch and not used yet
        self.wasted_at_step: dict[str, int] = {}  # a prefetch evicted unused: not again in that step
        self._host_skipped: list[ResidentObject] = []
        self.can_drop: Callable[[ResidentObject], bool] = lambda obj: obj.can_drop
        self.on_dropped: Callable[[ResidentObject], None] = lambda obj: None
        self.discard: Callable[[ResidentObject], None] | None = None  # kind-aware removal of a bad copy

    # --- bookkeeping -----------------------------------------------------------------------
    def _key(self, obj: ResidentObject) -> tuple:
        return self.policy.key(obj, self.ctx)

    def _index(self, obj: ResidentObject) -> None:
        key = self._key(obj)
        for tier, heap in self.heaps.items():
            if tier == obj.tier:
                heap.push(obj.key, key)
            else:
                heap.discard(obj.key)
        if obj.tier == "device" or obj.tier is None:
            self.wanted.discard(obj.key)
        else:
            self.wanted.push(obj.key, tuple(-x for x in key))

    def add(self, obj: ResidentObject) -> None:
        """Start managing `obj` in its current tier (device objects other than KV reserve blocks)."""
        with self.lock:
            self.objects[obj.key] = obj
            if obj.tier == "device" and obj.kind != "kv":
                blocks = self.pool.allocate(obj.device_blocks_needed(self.pool.block_nbytes))
                assert blocks is not None, "make room before adding a device object"
                self.reserved[obj.key] = blocks
            if obj.tier == "host":
                self.host_used += obj.nbytes
            for agent in obj.owners:
                self.by_agent[agent].add(obj.key)
            self._index(obj)

    def remove(self, obj: ResidentObject) -> None:
        with self.lock:
            if self.objects.pop(obj.key, None) is None:
                return
            if obj.key in self.reserved:
                self.pool.decref(self.reserved.pop(obj.key))
            if obj.tier == "host":
                self.host_used -= obj.nbytes
            if getattr(obj, "prefetched", False):
                self._unmark_prefetched(obj)
            for heap in (*self.heaps.values(), self.wanted):
                heap.discard(obj.key)
            self.wasted_at_step.pop(obj.key, None)
            for agent in obj.owners:
                self.by_agent[agent].discard(obj.key)

    def touch(self, obj: ResidentObject, agent_id: str | None) -> None:
        """A request uses `obj` now (counts a hit or a miss by the tier it was found in)."""
        with self.lock:
            obj.last_use_s = time.monotonic()
            obj.use_count += 1
            if getattr(obj, "prefetched", False):
                self._unmark_prefetched(obj)
                self.stats.add("prefetch_used", obj.kind)
            if agent_id is not None and agent_id not in obj.owners:
                obj.owners.add(agent_id)
                self.by_agent[agent_id].add(obj.key)
            if obj.key in self.objects:
                self._index(obj)

    def add_owner(self, obj: ResidentObject, agent_id: str) -> None:
        with self.lock:
            obj.owners.add(agent_id)
            self.by_agent[agent_id].add(obj.key)
            if obj.key in self.objects:
                self._index(obj)

    def agents_changed(self, agents: list[str]) -> None:
        """Distances of `agents` changed: re-key their objects (O(objects of those agents))."""
        with self.lock:
            for agent in agents:
                for key in self.by_agent.get(agent, ()):
                    if key in self.objects:
                        self._index(self.objects[key])

    # --- usage ---------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        with self.lock:
            device = (self.pool.num_blocks - self.pool.num_free) * self.pool.block_nbytes
            return {"device": device, "host": self.host_used, "disk": self.store.used_nbytes if self.store else 0}

    # --- moves ---------------------------------------------------------------------------
    def _move(self, obj: ResidentObject, tier: str) -> None:
        old = obj.tier
        if tier == "device" and obj.kind != "kv":
            blocks = self.pool.allocate(obj.device_blocks_needed(self.pool.block_nbytes))
            assert blocks is not None, "room must be made before a move to the device"
            self.reserved[obj.key] = blocks
        try:
            obj.move_to(tier)
        except BaseException:
            if tier == "device" and obj.key in self.reserved:
                self.pool.decref(self.reserved.pop(obj.key))
            raise
        if old == "device" and obj.key in self.reserved:
            self.pool.decref(self.reserved.pop(obj.key))
        if old == "host":
            self.host_used -= obj.nbytes
        if tier == "host":
            self.host_used += obj.nbytes
        direction = "bytes_in" if tier == "device" else "bytes_out"
        self.stats.add(direction, obj.kind, obj.nbytes, tier=f"{old}_to_{tier}")
        self._index(obj)

    def _discard(self, obj: ResidentObject) -> None:
        """Forget an object whose copy cannot be loaded: KV is recomputed, weights reload later."""
        if self.discard is not None:
            self.discard(obj)
        elif obj.can_drop:
            self._drop(obj)
        else:
            self.remove(obj)

    def _unmark_prefetched(self, obj: ResidentObject) -> None:
        obj.prefetched = False
        self.prefetched_nbytes -= obj.prefetched_mark_nbytes  # its size may have changed since (a split)

    def _drop(self, obj: ResidentObject) -> None:
        if getattr(obj, "prefetched", False):
            self._unmark_prefetched(obj)
            self.stats.add("prefetch_wasted", obj.kind)
        if obj.tier == "host":
            self.host_used -= obj.nbytes
        self.stats.add("dropped", obj.kind)
        obj.drop()
        self.remove(obj)
        self.on_dropped(obj)

    def _evictable(self, obj: ResidentObject | None, tier: str) -> bool:
        return (obj is not None and obj.tier == tier and obj.pin_count == 0 and not obj.loading
                and obj.key not in self.held)

    def _unhold(self, keys: set[str]) -> None:
        for key in keys:
            self.held[key] -= 1
            if self.held[key] <= 0:
                del self.held[key]
                if key in self.objects:
                    self._index(self.objects[key])

    def release_group(self, group: int) -> None:
        """The group's request was admitted (its state is pinned now) or left: stop holding its objects."""
        with self.lock:
            self.groups.pop(group, None)
            self.group_requested_s.pop(group, None)
            self._unhold(self.group_held.pop(group, set()))

    def _demote_from_host(self, above: tuple | None) -> bool:
        """Push the host object with the largest key (if larger than `above`) to disk or drop it."""
        entry = self.heaps["host"].peek()
        if entry is None or (above is not None and entry[1] <= above):
            return False
        self.heaps["host"].pop()
        obj = self.objects.get(entry[0])
        if not self._evictable(obj, "host"):
            if obj is not None and obj.tier == "host":
                self._host_skipped.append(obj)
            return True  # pinned or loading: skip it, the caller tries the next one
        if obj.kind != "kv" or (self.store is not None and
                                self.store.used_nbytes + obj.nbytes <= self.store.budget_nbytes):
            self._move(obj, "disk")
        elif self.can_drop(obj):
            self._drop(obj)
        else:
            self._host_skipped.append(obj)  # an inner node with nowhere to go: it stays
        return True

    def _place_below_device(self, obj: ResidentObject, key: tuple) -> bool:
        """Demote a device object: host if it fits (displacing larger keys), else disk, else drop."""
        self._host_skipped = []
        try:
            while self.host_used + obj.nbytes > self.host_nbytes:
                if not self._demote_from_host(above=key):
                    break
        finally:
            for skipped in self._host_skipped:
                if skipped.key in self.objects and skipped.tier == "host":
                    self._index(skipped)
        if self.host_used + obj.nbytes <= self.host_nbytes:
            self._move(obj, "host")
        elif obj.kind != "kv":
            self._move(obj, "disk")
        elif self.store is not None and self.store.used_nbytes + obj.nbytes <= self.store.budget_nbytes:
            self._move(obj, "disk")
        elif self.can_drop(obj):
            self._drop(obj)
        else:
            return False
        self.stats.add("evicted", obj.kind, tier="device")
        return True

    def make_device_room(self, blocks: int, only_above: tuple | None = None) -> bool:
        """Free device blocks until `blocks` are free, evicting by policy; False if impossible.

        With `only_above`, only objects whose key starts with something strictly larger may be
        evicted (hysteresis; a prefetch passes just the expected step, so it never displaces an
        object needed in the same step, however the tie-breakers fall).
        """
        with self.lock:
            skipped = []
            try:
                while self.pool.num_free < blocks:
                    entry = self.heaps["device"].pop()
                    if entry is None:
                        return False
                    name, key = entry
                    obj = self.objects.get(name)
                    if not self._evictable(obj, "device"):
                        if obj is not None and obj.tier == "device":
                            skipped.append(obj)
                        continue
                    if only_above is not None and key[:len(only_above)] <= only_above:
                        skipped.append(obj)
                        return False
                    if getattr(obj, "prefetched", False):
                        self._unmark_prefetched(obj)
                        self.stats.add("prefetch_wasted", obj.kind)
                        self.wasted_at_step[obj.key] = self.tracker.step
                    if not self._place_below_device(obj, key):
                        skipped.append(obj)
                return True
            finally:
                for obj in skipped:
                    if obj.key in self.objects and obj.tier == "device":
                        self._index(obj)

    def promote(self, obj: ResidentObject, prefetch: bool = False, only_above: tuple | None = None) -> bool:
        """Bring `obj` to the device now; False if no room can be made (the caller waits) or if
        its disk copy failed its checksum (it is dropped and will be recomputed/reloaded)."""
        with self.lock:
            if obj.tier == "device":
                return True
            started = time.perf_counter()
            source = obj.tier
            obj.loading = True  # so that making room never evicts the object being loaded
            try:
                if not self.make_device_room(obj.device_blocks_needed(self.pool.block_nbytes), only_above):
                    return False
                if not prefetch:
                    obj.last_use_s = time.monotonic()  # a load for a request is a use (what LRU sees)
                self._move(obj, "device")
            except CorruptObjectError as exc:
                logger.warning("discarding %s: %s", obj.key, exc)
                self.stats.add("corrupt", obj.kind)
                self._discard(obj)
                return False
            except Exception as exc:  # a missing or unreadable source: never retry it forever
                logger.warning("cannot load %s: %s", obj.key, exc)
                self.stats.add("load_failed", obj.kind)
                obj.load_error = str(exc)
                if obj.kind == "kv":
                    self._discard(obj)
                return False
            finally:
                obj.loading = False
                if obj.key in self.objects and obj.tier is not None:
                    self._index(obj)
            if prefetch:
                obj.prefetched, obj.prefetched_mark_nbytes = True, obj.nbytes
                self.prefetched_nbytes += obj.nbytes
            self.stats.add("prefetches" if prefetch else "on_demand_loads", obj.kind, tier=source)
            self.stats.add("load_s", obj.kind, time.perf_counter() - started)
            return True

    def release_all_held(self) -> None:
        """Nothing runs and no waiting request can be admitted: the room is held by requests
        waiting behind it. Let it all be evicted again (the groups stay queued)."""
        with self.lock:
            for keys in self.group_held.values():
                self._unhold(keys)
                keys.clear()
            self.wake.set()

    # --- on-demand loads ------------------------------------------------------------------
    def request_group(self, group: int, objects: list[ResidentObject]) -> None:
        """A waiting request (`group`) needs `objects` on the device; they overtake prefetches and
        are loaded after the groups queued before it."""
        with self.lock:
            if group not in self.groups:
                self.group_held[group] = set()
                self.group_requested_s[group] = time.perf_counter()
            self.groups[group] = list(objects)
            self.wake.set()

    def serve_on_demand(self) -> int:
        """Load the queued groups in order, each wholly before the next; stop at the first that
        room cannot be made for (the state of running and earlier requests is never evicted for
        it). Return how many objects were loaded."""
        served = 0
        with self.lock:
            for group, objects in list(self.groups.items()):
                for obj in objects:
                    if obj.key not in self.objects or obj.tier is None:
                        continue
                    if obj.tier != "device":
                        if not self.promote(obj):
                            if served:
                                self.loaded.set()
                            return served
                        served += 1
                    if obj.key not in self.group_held[group]:
                        self.group_held[group].add(obj.key)
                        self.held[obj.key] += 1
                if objects:
                    self.stats.stall_s += time.perf_counter() - self.group_requested_s[group]
                    self.groups[group] = []
                self.group_requested_s[group] = time.perf_counter()  # a later ask waits from then on
        if served:
            self.loaded.set()
        return served

    @property
    def loads_pending(self) -> bool:
        return any(self.groups.values())

    # --- prefetch ------------------------------------------------------------------------
    def prefetch_once(self) -> int:
        """Promote the off-device objects whose owners call soonest, while their call is within
        the horizon (or nearer than their load time plus a margin) and room can be made from
        objects with a strictly larger key; return the bytes moved."""
        if not self.policy.prefetch:
            return 0
        moved, settings = 0, self.prefetch_settings
        with self.lock:
            if self.loads_pending:
                return 0  # requests are waiting for loads now: speculation would only compete with them
            cap = settings.max_prefetched_device_fraction * self.pool.num_blocks * self.pool.block_nbytes
            while moved < settings.max_bytes_in_flight:
                entry = self.wanted.peek()
                if entry is None:
                    return moved
                obj = self.objects.get(entry[0])
                if obj is None or obj.tier == "device":
                    self.wanted.discard(entry[0])
                    continue
                key = tuple(-x for x in entry[1])
                distance_steps = key[0] - self.tracker.step
                deadline_s = distance_steps * self.tracker.seconds_per_step
                if not math.isfinite(distance_steps) or (
                        distance_steps > settings.horizon_steps
                        and deadline_s > obj.reload_seconds(self.ctx.bandwidth) + settings.margin_s):
                    return moved
                if self.prefetched_nbytes + obj.nbytes > cap:
                    return moved
                if self.wasted_at_step.get(obj.key) == self.tracker.step:
                    return moved  # it was prefetched and pushed out again this step: stop the ping-pong
                if obj.loading or not self.promote(obj, prefetch=True, only_above=key[:1]):
                    return moved
                moved += obj.nbytes
        return moved

    def snapshot(self) -> dict:
        with self.lock:
            out = self.stats.snapshot()
            usage = self.usage()
            out.update({f"{tier}_used_nbytes": n for tier, n in usage.items()})
            out["device_budget_nbytes"] = self.pool.num_blocks * self.pool.block_nbytes
            out["host_budget_nbytes"] = self.host_nbytes
            out["objects"] = len(self.objects)
            return out
