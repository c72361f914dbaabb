"""The interface every per-agent weight object implements, so the memory layer can move it.

A handle owns a set of tensors with a fixed byte size. It lives in one tier at a time:
- "device": tensors on the compute device, ready to run;
- "host":   tensors in host memory (pinned when CUDA is present);
- "disk":   no tensors in memory; the handle's source files (the truth) hold them.
Moves follow memory/resident.py's three phases: `transfer` (no lock) reads the source files or
moves the tensors, `commit_move` only records the new tier. Nobody uses a handle while it moves:
a request runs only with handles ready on the device and pinned, and a pinned handle never
moves. Demoting to disk is free (the tensors are dropped; the source files stay the truth).
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

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """The resident tensors (empty on disk), for measuring what a tier really holds."""

    def _memory_device(self, tier: str) -> torch.device:
        return self.compute_device if tier == "device" else torch.device("cpu")

    def begin_move(self, tier: str, defer_write: bool = False) -> None:
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        assert not (self.pin_count and self._tier == "device"), f"{self.key} is pinned on the device"
        super().begin_move(tier)

    def transfer(self) -> None:
        target = self.moving_to
        if target == "disk":
            return  # dropped at commit
        if self._tier == "disk":
            self._load_from_disk(self._memory_device(target))
        else:
            self._move_tensors(self._memory_device(target))

    def commit_move(self) -> None:
        target, self.moving_to = self.moving_to, None
        if target == "disk":
            self._drop_tensors()
        self._tier = target
        self.version += 1

    def abort_move(self) -> None:
        """A failed load leaves no tensors behind; a failed device/host move changed nothing."""
        if self._tier == "disk":
            self._drop_tensors()
        self.moving_to = None

    def move_to(self, tier: str) -> None:
        """Synchronous move (before the handle is managed, and in tests)."""
        if tier == self._tier:
            return
        self.begin_move(tier)
        try:
            self.transfer()
        except BaseException:
            self.abort_move()
            raise
        self.commit_move()

    def pin(self) -> None:
        self._pins += 1

    def unpin(self) -> None:
        assert self._pins > 0, f"unpin of unpinned {self.key}"
        self._pins -= 1

    @property
    def on_device(self) -> bool:
        return self.ready_on_device
