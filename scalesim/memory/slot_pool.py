"""A fixed pool of device slots for the weights of one kind, outside the KV pages' budget.

This is how SGLang serves LoRA (docs "LoRA Serving"; python/sglang/srt/lora/mem_pool.py): it
reserves `--max-loras-per-batch` slots (default 8) of device memory, each sized for the largest
adapter it serves, so a batch holds at most that many distinct adapters; every adapter it has
loaded stays in host memory (`--max-loaded-loras` is unbounded by default), and an adapter a batch
needs but no slot holds is copied in, replacing the least recently used slot no running request
uses (`--lora-eviction-policy lru`). The slots hold adapters in the layout the kernels read, so
there are no separate per-step stacked buffers.

Contract (the memory layer's view, see tiers.py):
- the slot area, `slots` x the largest member's blocks, is reserved out of the device pool when
  an object of `kind` is first managed (or a larger one arrives), so KV pages, other weights and
  the slots together never exceed the device budget;
- on a device where 8 slots would take more than `MAX_AREA_FRACTION` of it, there are fewer
  (at least one), as an operator would lower `--max-loras-per-batch`: a pool that left the KV
  cache no room for a prompt would serve nothing;
- an object of `kind` on the device holds one slot; `free_slots` is how many are left;
- host copies of `kind` are outside the host budget. Without `held_cap` (SGLang) they are never
  demoted below the host. With it (vLLM's `--max-cpu-loras`, memory/policies.py) at most that
  many objects of `kind` are held at once, in slots and on the host together: past it, the least
  recently used host copies are dropped, and such an object is read from its files again when a
  request needs it.
"""

from dataclasses import dataclass, field

from scalesim.memory.resident import ResidentObject

SGLANG_MAX_LORAS_PER_BATCH = 8
# vLLM's defaults are --max-loras 1 and --max-cpu-loras equal to it; one adapter per batch would
# serialise a population of per-agent adapters, so the `vllm` baseline is deployed as its users
# serving many adapters deploy it: as many device slots as SGLang's default, and the host cache
# no larger (max-cpu-loras left at its default, max-loras).
VLLM_MAX_LORAS = SGLANG_MAX_LORAS_PER_BATCH
VLLM_MAX_CPU_LORAS = VLLM_MAX_LORAS
MAX_AREA_FRACTION = 0.5


@dataclass
class SlotPool:
    kind: str
    slots: int
    slot_blocks: int = 0                         # device blocks per slot (the largest member's size)
    members: dict[str, ResidentObject] = field(default_factory=dict)  # key -> object holding a slot
    held_cap: int | None = None                  # most objects held in slots and on the host together
    known: dict[str, ResidentObject] = field(default_factory=dict)    # key -> every managed object of `kind`

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"a slot pool needs at least one slot, got {self.slots}")
        if self.held_cap is not None and self.held_cap < self.slots:
            raise ValueError(f"the held cap ({self.held_cap}) must be at least the slot count ({self.slots})")

    def holds_kind(self, obj: ResidentObject) -> bool:
        return obj.kind == self.kind

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.members)

    def slots_for(self, obj: ResidentObject, block_nbytes: int, device_blocks: int) -> int:
        """The slot count once `obj` is served too: fewer if the area would pass
        MAX_AREA_FRACTION of the device (never fewer than the slots taken, nor than one)."""
        blocks = max(self.slot_blocks, obj.device_blocks_needed(block_nbytes))
        room = int(MAX_AREA_FRACTION * device_blocks) // max(blocks, 1)
        return max(min(self.slots, room), len(self.members), 1)

    def area_blocks_for(self, obj: ResidentObject, block_nbytes: int, device_blocks: int) -> int:
        """The slot area's size in blocks once `obj` is served (it only grows)."""
        return self.slots_for(obj, block_nbytes, device_blocks) * max(self.slot_blocks, obj.device_blocks_needed(block_nbytes))

    def take(self, obj: ResidentObject) -> bool:
        if obj.key in self.members:
            return True
        if not self.free_slots:
            return False
        self.members[obj.key] = obj
        return True

    def give_back(self, obj: ResidentObject) -> bool:
        """Free the slot `obj` held; False if it held none."""
        return self.members.pop(obj.key, None) is not None

    def held_excess(self, incoming: int = 0) -> int:
        """How many host copies must go for the cap to hold once `incoming` more are held."""
        if self.held_cap is None:
            return 0
        return max(len(self._on_host()) + len(self.members) + incoming - self.held_cap, 0)

    def host_lru(self) -> list[ResidentObject]:
        """Objects of `kind` held on the host only, least recently used first."""
        return sorted(self._on_host(), key=lambda o: o.last_use_s)

    def _on_host(self) -> list[ResidentObject]:
        # one moving up to the device holds its slot already: it is counted there, not twice
        return [o for o in self.known.values() if o.tier == "host" and o.key not in self.members]

    def replaceable(self) -> list[ResidentObject]:
        """Members, least recently used first (the caller skips those in use)."""
        return sorted(self.members.values(), key=lambda obj: obj.last_use_s)
