"""The memory manager: the one façade the engine talks to about where agent state lives.

Contract:
- Every public method takes `lock` (an RLock shared with the transfer threads); the engine holds
  it while it schedules and records a step, never during the forward pass.
- `add` / `remove` / `touch` / `add_owner` keep the index of resident objects; `hint`,
  `advance`, `on_request`, `on_finish` and `set_future` feed invocation distance, and re-key
  only the objects of the agents whose expected step changed.
- `make_device_room` (the engine thread: inline copies, never a file write), `request_group` /
  `release_group` (on-demand loads, served by the transfer threads), `reserve_stacks` (a step's
  stacked LoRA buffers), `revived` and `forget` are the engine's verbs.
- `serve_on_demand`, `prefetch_once` and `write_back_once` are the transfer threads' work: each
  move claims room, copies with the lock released, and commits (memory/mover.py).
The parts: tiers.py (budgets and bytes held), index.py (keys and heaps), eviction.py (victims),
loads.py (on-demand groups and holds), prefetch.py (admission), mover.py (three-phase moves),
writeback.py (disk writes off the engine thread).
"""

import itertools
import math
import threading
from collections import Counter, defaultdict

from scalesim.distance.tracker import DistanceTracker
from scalesim.errors import InvalidRequestError
from scalesim.memory.disk_store import DiskStore
from scalesim.memory.eviction import Evictor
from scalesim.memory.loads import LoadGroups
from scalesim.memory.mover import MoveRefused, Mover
from scalesim.memory.policies import Policy, PolicyContext
from scalesim.memory.prefetch import PrefetchSettings, Prefetcher
from scalesim.memory.resident import ResidentObject, TierBandwidth
from scalesim.memory.slot_pool import SlotPool
from scalesim.memory.stats import MemoryStats
from scalesim.memory.tiers import Tiers
from scalesim.memory.two_order_index import index_for
from scalesim.memory.writeback import DiskWriter

HINT_CHUNK_AGENTS = 20_000
DEFAULT_WRITE_BUFFER_NBYTES = 64 * 2**20  # demotions to disk staged for the transfer threads to write

__all__ = ["MemoryManager", "PrefetchSettings"]


class MemoryManager:
    def __init__(self, pool, tracker: DistanceTracker, policy: Policy, host_nbytes: int,
                 store: DiskStore | None, bandwidth: TierBandwidth | None = None,
                 prefetch: PrefetchSettings | None = None,
                 write_buffer_nbytes: int = DEFAULT_WRITE_BUFFER_NBYTES) -> None:
        self.pool = pool
        self.tracker = tracker
        self.policy = policy
        self.store = store
        self.lock = threading.RLock()
        self.stats = MemoryStats()
        self.ctx = PolicyContext(tracker, bandwidth or TierBandwidth())
        self.index = index_for(policy, self.ctx)
        slots = (SlotPool("adapter", policy.adapter_slots, held_cap=policy.adapter_held_cap)
                 if policy.adapter_slots else None)
        self.tiers = Tiers(pool, host_nbytes, store, write_buffer_nbytes, slots)
        self.mover = Mover(self.lock, self.index, self.tiers, self.stats, self.forget_tree)
        self.loads = LoadGroups(self.stats)
        self.prefetcher = Prefetcher(self.index, self.ctx.bandwidth, prefetch or PrefetchSettings())
        self.evictor = Evictor(self.index, self.tiers, self.mover, self.stats, self._evictable, self.forget,
                               self._evicted_unused)
        self.writer = DiskWriter(self.index, self.tiers, self.mover, self.evictor, self.forget_tree)
        self._loading: set[str] = set()   # objects that room is being made for
        self._future_by_step: dict[float, list[str]] = {}
        self.loaded = threading.Event()   # set after an on-demand load commits: the engine re-schedules
        self.wake = threading.Event()     # wakes the transfer threads: a load was requested, a hint arrived

    # --- the index -----------------------------------------------------------------------
    @property
    def objects(self) -> dict[str, ResidentObject]:
        return self.index.objects

    @property
    def prefetch_settings(self) -> PrefetchSettings:
        return self.prefetcher.settings

    @property
    def prefetched_nbytes(self) -> int:
        return self.prefetcher.prefetched_nbytes

    def add(self, obj: ResidentObject) -> None:
        """Start managing `obj` in its current tier (its room there must be free: see `place`)."""
        with self.lock:
            if not self.tiers.grow_slot_area(obj):
                raise InvalidRequestError(f"the device cannot hold {self.tiers.slots.slots} slots for {obj.kind} "
                                          f"weights of {obj.nbytes} bytes; raise the device memory")
            if obj.tier == "device" and not self.tiers.reserve_device(obj):
                raise MoveRefused(f"make room before adding {obj.key} to the device")
            if obj.tier == "host" and not self.tiers.claim_host(self.tiers.host_charge(obj)):
                raise MoveRefused(f"make room before adding {obj.key} to the host")
            self.index.add(obj)
            if self.tiers.in_slots(obj):
                self.tiers.slots.known[obj.key] = obj

    def remove(self, obj: ResidentObject) -> None:
        """Stop managing `obj` (it keeps whatever copy it has; the caller owns it now). A move in
        flight holds room in two tiers: it settles first (else the room it claimed was never
        given back: an adapter removed mid-load kept its device room, or its slot, for good)."""
        with self.lock:
            while obj.moving_to is not None:
                self.mover.finished.wait()
            if obj not in self.index:
                return
            if obj.tier == "device":
                self.tiers.release_device(obj)
            elif obj.tier == "host":
                self.tiers.release_host(self.tiers.host_charge(obj))
            if obj.prefetched_nbytes:
                self.prefetcher.unmark(obj)
            self._unmanage(obj)

    def _unmanage(self, obj: ResidentObject) -> None:
        self.index.remove(obj)
        if self.tiers.slots is not None:
            self.tiers.slots.known.pop(obj.key, None)

    def place(self, obj: ResidentObject) -> None:
        """Manage a new object held in host memory: on the device if room can be made, else on
        the host if it fits, else on disk (weights: their source files)."""
        with self.lock:
            growth = self.tiers.slot_area_growth(obj)
            if growth:
                self.evictor.device_room(growth)  # the slot area grows out of the KV pages' room
            if obj.tier == "host" and self.tiers.host_charge(obj) > self.tiers.host_free_nbytes:
                obj.move_to("disk")
            self.add(obj)
            self.promote(obj)
            self.evictor.trim_held()

    def touch(self, obj: ResidentObject, agent_id: str | None) -> None:
        """A request uses `obj` now."""
        with self.lock:
            obj.last_use_s = self.tracker.clock()
            obj.use_count += 1
            if obj.prefetched_nbytes:
                self.prefetcher.unmark(obj)
                self.stats.add("prefetch_used", obj.kind)
            if agent_id is not None and agent_id not in obj.owners:
                self.index.add_owner(obj, agent_id)
            else:
                self.index.rekey(obj)

    def add_owner(self, obj: ResidentObject, agent_id: str) -> None:
        with self.lock:
            self.index.add_owner(obj, agent_id)

    def objects_of(self, agent_id: str) -> list[ResidentObject]:
        with self.lock:
            return sorted(self.index.of_agent(agent_id), key=lambda o: o.key)

    # --- invocation distance ----------------------------------------------------------------
    def advance(self, step: int) -> int:
        """The simulation reached `step`; return how many agents' expected step moved."""
        with self.lock:
            before, stepped = self.tracker.step, self.tracker.stepped
            changed = self.tracker.advance(step)
            if self._future_by_step:
                changed += [a for s in range(before, self.tracker.step) for a in self._future_by_step.get(float(s), ())]
            if self.tracker.step != before or not stepped:
                self.prefetcher.new_step()
                self._expire_prefetches(self.tracker.now_step() if stepped else math.inf)
            self.index.agents_changed(changed)
        self.wake.set()
        return len(changed)

    def hint(self, distances: dict[str, float]) -> tuple[int, int]:
        """Set distances (steps from now); return (agents changed, agents not tracked). A large
        hint is applied in chunks, so the lock is never held long enough to stall a step."""
        items, changed, untracked = iter(distances.items()), 0, 0
        while True:
            chunk = dict(itertools.islice(items, HINT_CHUNK_AGENTS))
            if not chunk:
                break
            with self.lock:
                agents, strangers = self.tracker.hint(chunk)
                self.index.agents_changed(agents)
                self.stats.add("hinted_unknown_agents", "agents", strangers)
            changed, untracked = changed + len(agents), untracked + strangers
        self.wake.set()
        return changed, untracked

    def on_request(self, agent_id: str) -> None:
        with self.lock:
            self.tracker.on_request(agent_id)
            self.ctx.call_made(agent_id)
            self.index.agents_changed([agent_id, *self.tracker.refresh()])

    def on_finish(self, agent_id: str) -> None:
        with self.lock:
            self.tracker.on_finish(agent_id)
            self.index.agents_changed([agent_id])
        self.wake.set()

    def advance_clock(self) -> None:
        """Without simulation steps the clock is the wall clock: move overdue learned estimates."""
        with self.lock:
            if not self.tracker.stepped:
                self.index.agents_changed(self.tracker.refresh())
                self._expire_prefetches(self.tracker.now_step())

    def _expire_prefetches(self, now_step: float) -> None:
        for obj in self.prefetcher.expired(now_step):
            self.stats.add("prefetch_wasted", obj.kind)

    def set_future(self, calls: dict[str, list[float]]) -> None:
        """For the `oracle` policy: the true steps at which each agent will call."""
        with self.lock:
            self.ctx.future = {a: sorted(steps) for a, steps in calls.items()}
            self.ctx.calls_made = {}
            self._future_by_step = defaultdict(list)
            for agent, steps in self.ctx.future.items():
                for step in steps:
                    self._future_by_step[float(step)].append(agent)
            self.index.agents_changed(list(calls))

    # --- eviction and forgetting --------------------------------------------------------------
    def _evictable(self, obj: ResidentObject, tier: str) -> bool:
        return (obj.tier == tier and obj.moving_to is None and obj.pin_count == 0
                and not self.loads.is_held(obj.key) and obj.key not in self._loading)

    def _evicted_unused(self, obj: ResidentObject) -> None:
        self.prefetcher.wasted(obj)
        self.stats.add("prefetch_wasted", obj.kind)

    def make_device_room(self, blocks: int, only_above: tuple | None = None) -> bool:
        """Free device blocks until `blocks` are free (inline copies); False if impossible."""
        with self.lock:
            return self.evictor.device_room(blocks, only_above)

    def forget(self, obj: ResidentObject) -> None:
        """Free an object in every tier (KV: recomputed if needed again)."""
        with self.lock:
            if obj not in self.index:
                return
            if obj.prefetched_nbytes:
                self._evicted_unused(obj)
            tier = obj.tier
            if tier == "host":
                self.tiers.release_host(self.tiers.host_charge(obj))
            elif tier == "device":
                self.tiers.release_device(obj)
            self.stats.add("dropped", obj.kind, tier=tier)
            self._unmanage(obj)
            obj.forget()
            self.tiers.settle(obj)

    def forget_tree(self, obj: ResidentObject) -> None:
        """A copy of `obj` is bad: forget it and what cannot be reached without it; a weight
        keeps its load error (its requests fail, and a later request tries its files again)."""
        with self.lock:
            for dependent in obj.dependents():
                self.forget_tree(dependent)
            if obj.droppable():
                self.forget(obj)

    def revived(self, obj: ResidentObject, old_tier: str | None) -> None:
        """A request recomputed the pages of an off-device object: it is on the device now."""
        with self.lock:
            if old_tier == "host":
                self.tiers.release_host(self.tiers.host_charge(obj))
            obj.load_error = None  # fresh pages replace a bad copy
            self.tiers.settle(obj)
            if obj.prefetched_nbytes:
                self.prefetcher.unmark(obj)
            self.index.rekey(obj)

    def weight_blocks_needed(self, handles: list[ResidentObject]) -> int:
        """Device blocks a request's weights take beside its KV pages (a slot's are reserved already)."""
        return sum(h.device_blocks_needed(self.pool.block_nbytes) for h in handles if not self.tiers.in_slots(h))

    @property
    def request_room_blocks(self) -> int:
        """The most device blocks one request can ever have: the pool less the slot area."""
        return self.pool.num_blocks - self.tiers.slot_area_blocks

    def reserve_stacks(self, nbytes: int, exact: bool = False) -> bool:
        """Hold device room for the running step's stacked LoRA buffers: at least `nbytes` (evicting
        if needed), or with `exact` exactly `nbytes` (giving back what the step no longer needs)."""
        with self.lock:
            if self.tiers.slots is not None:
                return True  # adapters sit in their slots in the layout the step reads (slot_pool.py)
            blocks = -(-nbytes // self.pool.block_nbytes)
            if blocks <= self.tiers.stack_blocks:
                return self.tiers.set_stack_blocks(blocks) if exact else True
            self.evictor.device_room(blocks - self.tiers.stack_blocks)
            return self.tiers.set_stack_blocks(blocks)

    # --- loads ---------------------------------------------------------------------------
    def promote(self, obj: ResidentObject, prefetch: bool = False, only_above: tuple | None = None,
                unlock: bool = False) -> bool:
        """Bring `obj` to the device now; False if no room can be made or its copy is bad."""
        with self.lock:
            if obj.ready_on_device:
                return True
            if (obj.moving_to is not None or obj not in self.index or obj.key in self._loading
                    or obj.load_error is not None):
                return False  # moving, gone, its copy known bad, or another thread is making room for it
            self._loading.add(obj.key)
            try:
                if not self.evictor.room_for(obj, only_above, unlock):
                    return False
            finally:
                self._loading.discard(obj.key)
            if obj.ready_on_device:
                return True
            if obj.moving_to is not None or obj not in self.index or not self.mover.fits(obj, "device"):
                return False  # another thread moved it, or took the room, while the lock was released
            source = obj.tier
            if not prefetch or self.policy.prefetch_is_use:  # a load for a request is a use (what LRU sees)
                obj.last_use_s = self.tracker.clock()
            if not self.mover.move(obj, "device", unlock):
                return False
            if self.tiers.in_slots(obj):  # only a slot's load can take the pool past its held cap
                self.evictor.trim_held()
            if prefetch:
                self.prefetcher.mark(obj, self.index.nearest(obj))
            self.stats.add("prefetches" if prefetch else "on_demand_loads", obj.kind, tier=source)
            return True

    def request_group(self, group: int, objects: list[ResidentObject]) -> None:
        """A waiting request (`group`) needs `objects` on the device; they overtake prefetches and
        are loaded after the groups queued before it."""
        with self.lock:
            self.loads.request(group, objects)
        self.wake.set()

    def release_group(self, group: int) -> Counter:
        """The group's request was admitted (its state is pinned now) or left; return the bytes
        loaded for it by (kind, source tier)."""
        with self.lock:
            freed, loaded = self.loads.release(group)
            self._rekey_keys(freed)
            return loaded

    def release_all_held(self) -> None:
        """Nothing runs and no waiting request can be admitted: let what waiting requests hold be
        evicted again."""
        with self.lock:
            self._rekey_keys(self.loads.release_all_holds())
        self.wake.set()

    def _rekey_keys(self, keys: list[str]) -> None:
        for key in keys:
            obj = self.index.get(key)
            if obj is not None:
                self.index.rekey(obj)

    @property
    def held(self):
        return self.loads.held

    @property
    def loads_pending(self) -> bool:
        with self.lock:
            return any(g.objects for g in self.loads.groups.values())

    def serve_on_demand(self, unlock: bool = False) -> int:
        """Load the waiting groups' objects in order; stop at the first that room cannot be made
        for (the state of running and earlier requests is never evicted for it). Loads of
        several groups may be in flight at once on several threads. Return how many objects
        this call loaded."""
        served = 0
        with self.lock:
            for group_id in list(self.loads.groups):
                group = self.loads.groups.get(group_id)
                if group is None or not group.objects:
                    continue
                complete = True
                for obj in list(group.objects):
                    if obj not in self.index or obj.tier is None:
                        continue  # forgotten (a bad copy): its request recomputes it
                    if not obj.ready_on_device:
                        if obj.moving_to is not None:
                            complete = False  # in flight on another thread
                            continue
                        source = obj.tier
                        if not self.promote(obj, unlock=unlock):
                            if self.tiers.in_slots(obj) and obj.load_error is None:
                                complete = False  # every slot is in use: later groups may go on, as in SGLang
                                break
                            if obj.load_error is None and obj in self.index and obj.tier is not None:
                                return served  # no room: later groups wait their turn
                            continue
                        served += 1
                        self.loads.credit(group_id, obj, source)
                        self.loaded.set()
                    if group_id in self.loads.groups:
                        self.loads.hold(group_id, obj)
                if complete and group_id in self.loads.groups:
                    self.loads.done_waiting(group_id)
        return served

    # --- prefetch and write-back (transfer threads) ------------------------------------------------
    def prefetch_once(self, unlock: bool = False) -> int:
        """Promote the off-device objects whose owners call soonest (memory/prefetch.py); return
        the bytes moved."""
        if not self.policy.prefetch:
            return 0
        with self.lock:
            return self.prefetcher.run(self.tiers.device_budget_nbytes,
                                       lambda obj, above: self.promote(obj, True, above, unlock))

    def flush_writes_once(self, unlock: bool = False) -> int:
        """Write the pages the engine thread staged for disk; return how many were written."""
        with self.lock:
            return self.writer.flush_staged(unlock)

    def write_back_once(self, unlock: bool = False) -> int:
        """Keep a share of the host free by writing its farthest objects to disk ahead of need."""
        with self.lock:
            return self.writer.keep_host_free(unlock)

    def persist(self) -> int:
        """A clean shutdown: a disk copy of every unpinned KV object, so a restart finds the tree."""
        with self.lock:
            return self.writer.persist()

    # --- reports -------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        with self.lock:
            return self.tiers.usage()

    def snapshot(self) -> dict:
        with self.lock:
            out = self.stats.snapshot()
            out["stall_s"] = round(self.loads.stall_s_now(), 6)
            out.update({f"{tier}_used_nbytes": n for tier, n in self.tiers.usage().items()})
            out["device_budget_nbytes"] = self.tiers.device_budget_nbytes
            out["host_budget_nbytes"] = self.tiers.host_budget_nbytes
            out["disk_budget_nbytes"] = self.store.budget_nbytes if self.store is not None else 0
            if self.tiers.slots is not None:
                out["adapter_slots"] = self.tiers.slots.slots
                out["adapter_slot_area_nbytes"] = self.tiers.slot_area_blocks * self.pool.block_nbytes
            out["objects"] = len(self.index)
            out["tracked_agents"] = len(self.tracker.agents)
            return out
