"""The one interface the memory manager moves: a resident object.

Every piece of agent state — KV prefix pages (one object per radix node), LoRA adapters, private
models, and any new kind — implements `ResidentObject`. The manager never special-cases a kind.

Contract:
- `key` is unique and stable; `owners` are the agents whose requests use the object (a shared
  system-prompt page has many); `nbytes` is its size in any tier.
- `tier` is one of TIERS, or None once dropped. `pin_count > 0` means a running request uses it:
  it is never moved or dropped while pinned.
- `move_to(tier)` is synchronous and leaves the object whole in the target tier or, on error,
  unchanged; the manager calls it on a worker thread to make moves asynchronous. Moving to the
  device requires the manager to have made room first (`device_blocks_needed`).
- `can_drop`: the object may be forgotten instead of demoted (KV can be recomputed; weights keep
  their source files as the truth and are "demoted" to disk by dropping their in-memory copy).
- `reload_seconds(tier)` estimates the time to bring it back to the device from `tier`.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

TIERS = ("device", "host", "disk")
DEFAULT_BANDWIDTH_BYTES_PER_S = {"device": float("inf"), "host": 10e9, "disk": 0.4e9}


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host-memory copy, page-locked when CUDA is present so copies back run asynchronously."""
    host = tensor.to("cpu")
    return host.pin_memory() if torch.cuda.is_available() else host


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
    can_drop: bool = False

    def __init__(self) -> None:
        self.owners: set[str] = set()
        self.last_use_s = 0.0
        self.use_count = 0
        self.loading = False  # a move to the device is in flight

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

    @abstractmethod
    def move_to(self, tier: str) -> None:
        """Put the object in `tier` (see the module contract)."""

    def drop(self) -> None:
        """Forget the object entirely (only when `can_drop`)."""
        raise NotImplementedError(f"{self.kind} objects cannot be dropped")

    def reload_seconds(self, bandwidth: TierBandwidth, tier: str | None = None) -> float:
        """Estimated seconds to bring the object to the device from `tier` (default: its own)."""
        return bandwidth.seconds(self.nbytes, self.tier if tier is None else tier)

    def device_blocks_needed(self, block_nbytes: int) -> int:
        """KV-pool blocks this object occupies on the device (weights reserve blocks too)."""
        return -(-self.nbytes // block_nbytes)
