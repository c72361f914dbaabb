"""Tier accounting: one byte budget per tier, and the bytes each tier really holds.

- device: the engine's KV pool. KV pages are pool blocks; weights on the device and the stacked
  LoRA buffers of the running step hold back (reserve) a count of blocks for their own tensors,
  so KV pages, weights and stacks together never exceed the device budget.
- host: bytes of the objects whose copy is in host memory, plus those claimed by moves under way.
- disk: the disk store's own count of the bytes of its files (incremental, not a table scan).
- write buffer: pages demoted to disk on the engine thread, staged in memory until a transfer
  thread writes them (bounded; with no room there, such a victim is forgotten instead).
- slots (optional, memory/slot_pool.py): a fixed device area for the weights of one kind, reserved
  out of the device pool; such weights hold a slot on the device, and their host copies are
  outside the host budget.
A move claims its target's room when it begins and releases its source's when it commits, so a
tier never holds more than its budget, even while copies are in flight.
"""

from scalesim.memory.disk_store import DiskStore
from scalesim.memory.resident import ResidentObject
from scalesim.memory.slot_pool import SlotPool


class Tiers:
    def __init__(self, pool, host_budget_nbytes: int, store: DiskStore | None,
                 write_buffer_nbytes: int = 0, slots: SlotPool | None = None) -> None:
        self.pool = pool
        self.slots = slots
        self.slot_area_blocks = 0           # reserved for the slot pool
        self.write_buffer_nbytes = write_buffer_nbytes if store is not None else 0
        self.staged: dict[str, int] = {}  # object key -> bytes staged for its disk write
        self.host_budget_nbytes = host_budget_nbytes
        self.host_used_nbytes = 0
        self.store = store
        self.reserved: dict[str, int] = {}  # object key -> device blocks reserved for its tensors
        self.stack_blocks = 0               # reserved for the running step's stacked LoRA buffers

    @property
    def block_nbytes(self) -> int:
        return self.pool.block_nbytes

    # --- device ---------------------------------------------------------------------------
    @property
    def device_budget_nbytes(self) -> int:
        return self.pool.num_blocks * self.pool.block_nbytes

    @property
    def device_used_nbytes(self) -> int:
        return (self.pool.num_kv_blocks + self.pool.reserved_blocks) * self.pool.block_nbytes

    @property
    def device_free_blocks(self) -> int:
        return self.pool.num_free

    def in_slots(self, obj: ResidentObject) -> bool:
        """`obj` lives in the slot pool on the device (and outside the host budget off it)."""
        return self.slots is not None and self.slots.holds_kind(obj)

    def slot_area_growth(self, obj: ResidentObject) -> int:
        """Blocks the slot area must grow by before `obj` can be served (0 for other kinds)."""
        if not self.in_slots(obj) or obj.device_blocks_needed(self.pool.block_nbytes) <= self.slots.slot_blocks:
            return 0
        return self.slots.area_blocks_for(obj, self.pool.block_nbytes, self.pool.num_blocks) - self.slot_area_blocks

    def grow_slot_area(self, obj: ResidentObject) -> bool:
        """Reserve the slot area `obj` needs; False if the device has not that many free blocks."""
        growth = self.slot_area_growth(obj)
        if growth <= 0:
            return True
        if not self.pool.reserve(growth):
            return False
        self.slots.slots = self.slots.slots_for(obj, self.pool.block_nbytes, self.pool.num_blocks)
        self.slot_area_blocks += growth
        self.slots.slot_blocks = self.slot_area_blocks // self.slots.slots
        return True

    def device_fits(self, obj: ResidentObject) -> bool:
        if self.in_slots(obj):
            return self.slots.free_slots > 0 or obj.key in self.slots.members
        return self.device_free_blocks >= obj.device_blocks_needed(self.block_nbytes)

    def host_charge(self, obj: ResidentObject) -> int:
        """Bytes a host copy of `obj` counts against the host budget."""
        return 0 if self.in_slots(obj) else obj.nbytes

    def reserve_device(self, obj: ResidentObject) -> bool:
        """Hold back the device room of an object that owns tensors of its own (before its move)."""
        if self.in_slots(obj):
            return self.slots.take(obj)
        count = obj.device_reserved_blocks(self.pool.block_nbytes)
        if count and not self.pool.reserve(count):
            return False
        if count:
            self.reserved[obj.key] = count
        return True

    def release_device(self, obj: ResidentObject) -> None:
        if self.slots is not None and self.slots.give_back(obj):
            return
        self.pool.unreserve(self.reserved.pop(obj.key, 0))

    def set_stack_blocks(self, blocks: int) -> bool:
        """Reserve exactly `blocks` for the step's stacked LoRA buffers; False if that does not fit."""
        delta = blocks - self.stack_blocks
        if delta > 0 and not self.pool.reserve(delta):
            return False
        if delta < 0:
            self.pool.unreserve(-delta)
        self.stack_blocks = blocks
        return True

    # --- host -----------------------------------------------------------------------------
    @property
    def host_free_nbytes(self) -> int:
        return self.host_budget_nbytes - self.host_used_nbytes

    def claim_host(self, nbytes: int) -> bool:
        if nbytes > self.host_free_nbytes:
            return False
        self.host_used_nbytes += nbytes
        return True

    def release_host(self, nbytes: int) -> None:
        self.host_used_nbytes -= nbytes
        assert self.host_used_nbytes >= 0, "host accounting went negative"

    # --- write buffer ---------------------------------------------------------------------
    def stage(self, obj: ResidentObject) -> bool:
        if sum(self.staged.values()) + obj.nbytes > self.write_buffer_nbytes:
            return False
        self.staged[obj.key] = obj.nbytes
        return True

    def settle(self, obj: ResidentObject) -> None:
        """The object's staged write is done or moot (written, loaded back, forgotten)."""
        if not obj.write_pending:
            self.staged.pop(obj.key, None)

    @property
    def staged_nbytes(self) -> int:
        return sum(self.staged.values())

    # --- disk -----------------------------------------------------------------------------
    @property
    def disk_used_nbytes(self) -> int:
        return self.store.used_nbytes if self.store is not None else 0

    @property
    def disk_free_nbytes(self) -> int:
        return self.store.budget_nbytes - self.store.used_nbytes if self.store is not None else 0

    def usage(self) -> dict[str, int]:
        return {"device": self.device_used_nbytes, "host": self.host_used_nbytes, "disk": self.disk_used_nbytes,
                "write_buffer": self.staged_nbytes}
