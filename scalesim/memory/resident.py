"""The one interface the memory manager moves: a resident object.

Every piece of agent state — KV prefix pages (one object per radix node), LoRA adapters, private
models, and any new kind — implements `ResidentObject`. What differs between kinds is a member
here, never a branch in memory/: a new kind plugs in with one new file.

Contract:
- `key` is unique and stable; `owners` are the agents whose requests use the object (a shared
  system-prompt page has many); `nbytes` is its size in memory (device or host).
- `tier` is one of TIERS, or None once forgotten. `pin_count > 0` means a running request uses
  it: it is never moved or forgotten while pinned.
- A move runs in three phases so that no lock is held while bytes travel:
  `begin_move(tier)` (manager lock held: take the target's resources, e.g. pool pages),
  `transfer()` (no lock: copy, read or write the bytes; may raise), then `commit_move()` (lock
  held: switch tiers, release the source) or, if `transfer` raised or the move is called off,
  `abort_move()` (lock held: release what `begin_move` took; the object is unchanged).
  `moving_to` is the target while a move is in flight; such an object is neither evicted nor
  used. The default implementation does the whole move in `commit_move` through `move_to`, which
  suits objects whose moves are free (tests, the decision benchmark).
- `device_blocks_needed(block_nbytes)`: device room the object takes, in KV-pool blocks.
  `device_reserved_blocks(block_nbytes)`: how many of those the manager reserves for it (weights
  own tensors of their own, so the pool holds back room for them); objects that allocate pool
  pages themselves (KV) reserve none.
- `writes_to_disk`: demoting it to disk writes a file (KV), which only the transfer threads may
  do; otherwise the demotion is free (weights drop their copy: their source files are the truth).
  `has_disk_copy`: a valid copy is already in the disk store, so demoting to disk is free.
  `begin_move("disk", defer_write=True)` (kinds that write) stages the bytes in memory instead;
  `write_pending` is then True until a later move to disk writes the file.
- `droppable()`: it may be forgotten now (KV can be recomputed; a radix node only as an unlocked
  leaf); weights are never forgotten, only demoted. `dependents()`: the objects that cannot be
  reached without this one (a radix node's children), forgotten with it when its copy is bad.
- `reload_seconds(bandwidth, tier)` estimates the time to bring it to the device from `tier`.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass


TIERS = ("device", "host", "disk")
DEFAULT_BANDWIDTH_BYTES_PER_S = {"device": float("inf"), "host": 10e9, "disk": 0.4e9}


@dataclass
class TierBandwidth:
    """Bytes per second from each tier to the device (host: memory copy; disk: file read)."""

    host: float = DEFAULT_BANDWIDTH_BYTES_PER_S["host"]
    disk: float = DEFAULT_BANDWIDTH_BYTES_PER_S["disk"]

    def seconds(self, nbytes: int, tier: str | None) -> float:
        if tier == "device":
            return 0.0
        if tier == "host":
            return nbytes / self.host
        if tier == "disk":
            return nbytes / self.disk
        return float("inf")


class ResidentObject(ABC):
    kind: str = "object"
    writes_to_disk: bool = False

    def __init__(self) -> None:
        self.owners: set[str] = set()
        self.last_use_s = 0.0
        self.use_count = 0
        self.moving_to: str | None = None   # the target tier while a move is in flight
        self.prefetched_nbytes = 0          # > 0 while on the device by prefetch and not used yet
        self.load_error: str | None = None  # why the last load failed (a source file went missing)

    @property
    @abstractmethod
    def key(self) -> str: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @property
    @abstractmethod
    def tier(self) -> str | None: ...

    @property
    @abstractmethod
    def pin_count(self) -> int: ...

    def move_to(self, tier: str) -> None:
        """Synchronous move, for kinds that keep the default three phases."""
        raise NotImplementedError(f"{self.kind} objects implement the three move phases")

    # --- the three phases of a move ------------------------------------------------------
    def begin_move(self, tier: str, defer_write: bool = False) -> None:
        assert self.moving_to is None, f"{self.key} is already moving to {self.moving_to}"
        self.moving_to = tier

    def transfer(self) -> None:
        """Move the bytes (no lock held)."""

    def commit_move(self) -> None:
        target, self.moving_to = self.moving_to, None
        self.move_to(target)

    def abort_move(self) -> None:
        self.moving_to = None

    # --- what differs between kinds -------------------------------------------------------
    @property
    def ready_on_device(self) -> bool:
        """On the device and not leaving it: a request may use it."""
        return self.tier == "device" and self.moving_to is None

    @property
    def has_disk_copy(self) -> bool:
        return self.tier == "disk"

    @property
    def write_pending(self) -> bool:
        return False

    def droppable(self) -> bool:
        return False

    def dependents(self) -> list["ResidentObject"]:
        return []

    def forget(self) -> None:
        """Free the object in every tier (only when `droppable`)."""
        raise NotImplementedError(f"{self.kind} objects cannot be forgotten")

    def reload_seconds(self, bandwidth: TierBandwidth, tier: str | None = None) -> float:
        """Estimated seconds to bring the object to the device from `tier` (default: its own)."""
        return bandwidth.seconds(self.nbytes, self.tier if tier is None else tier)

    def device_blocks_needed(self, block_nbytes: int) -> int:
        return -(-self.nbytes // block_nbytes)

    def device_reserved_blocks(self, block_nbytes: int) -> int:
        return self.device_blocks_needed(block_nbytes)
