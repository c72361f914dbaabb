"""The interface every per-agent weight object implements, so the memory layer can move it.

A handle owns a set of tensors with a fixed byte size. It lives in one tier at a time:
- "device": tensors on the compute device, ready to run;
- "host":   tensors in host memory (pinned when CUDA is present);
- "disk":   no tensors in memory; the handle's source files (the truth) or a spill file hold them.
Contract: `move_to` is synchronous and leaves the handle whole in the target tier or unchanged
(on error); a handle with pin_count > 0 is in use by a running request and must not be moved
off the device; the engine runs a request only when its handles are on the device.
"""

from abc import abstractmethod
from pathlib import Path

import torch

from scalesim.memory.resident import TIERS, ResidentObject


class WeightHandle(ResidentObject):
    """A resident object whose truth is its source files (see memory/resident.py)."""

    kind: str = "weights"

    def __init__(self, name: str, source: Path, compute_device: str) -> None:
        super().__init__()
        self.name = name
        self.source = Path(source)
        self.compute_device = torch.device(compute_device)
        self._tier = "disk"
        self._pins = 0
        self.version = 0  # bumped whenever the tensors are replaced, so stale copies are noticed

    @property
    def tier(self) -> str:
        return self._tier

    @tier.setter
    def tier(self, value: str) -> None:
        self._tier = value

    @property
    def pin_count(self) -> int:
        return self._pins

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the tensors when resident (the same in every memory tier)."""

    @abstractmethod
    def _load_from_disk(self, device: torch.device) -> None:
        """Read the source (validating it) into memory on `device`."""

    @abstractmethod
    def _move_tensors(self, device: torch.device) -> None:
        """Move the resident tensors to `device`."""

    @abstractmethod
    def _drop_tensors(self) -> None:
        """Forget the resident tensors (the source stays the truth)."""

    def _memory_device(self, tier: str) -> torch.device:
        return self.compute_device if tier == "device" else torch.device("cpu")

    def move_to(self, tier: str) -> None:
        """Put the handle in `tier` ('device', 'host' or 'disk')."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        if tier == self.tier:
            return
        assert not (self.pin_count and self.tier == "device"), f"{self.key} is pinned on the device"
        if tier == "disk":
            self._drop_tensors()
        elif self.tier == "disk":
            self._load_from_disk(self._memory_device(tier))
        else:
            self._move_tensors(self._memory_device(tier))
        self.tier = tier
        self.version += 1

    def pin(self) -> None:
        self._pins += 1

    def unpin(self) -> None:
        assert self._pins > 0, f"unpin of unpinned {self.key}"
        self._pins -= 1

    @property
    def on_device(self) -> bool:
        return self.tier == "device"
