"""Helpers for memory-layer tests: a plain resident object and a manager over a small pool."""

import torch

from scalesim.distance.tracker import DistanceTracker
from scalesim.engine.block_pool import BlockPool
from scalesim.memory.manager import MemoryManager
from scalesim.memory.policies import POLICIES
from scalesim.memory.resident import ResidentObject
from tests.test_radix_cache import _config

BLOCK = 4


class FakeWeights(ResidentObject):
    """A plain resident object of a given size: the manager never needs to know its kind."""

    kind = "soft_prompt"

    def __init__(self, name: str, nbytes: int, owners=(), tier: str = "host") -> None:
        super().__init__()
        self.name, self._nbytes, self._tier, self.pins = name, nbytes, tier, 0
        self.owners = set(owners)
        self.moves: list[str] = []

    key = property(lambda self: f"fake:{self.name}")
    nbytes = property(lambda self: self._nbytes)
    tier = property(lambda self: self._tier)
    pin_count = property(lambda self: self.pins)

    def move_to(self, tier: str) -> None:
        assert self.pins == 0 or tier == "device"
        self.moves.append(tier)
        self._tier = tier


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def make_manager(blocks: int = 16, host_nbytes: int = 10**9, policy: str = "scalesim", clock=None) -> MemoryManager:
    config = _config()
    block_nbytes = config.kv_bytes_per_token * 4 * BLOCK
    pool = BlockPool(config, blocks * block_nbytes, BLOCK, torch.float32, "cpu")
    tracker = DistanceTracker(clock=clock) if clock is not None else DistanceTracker()
    return MemoryManager(pool, tracker, POLICIES[policy], host_nbytes, store=None)


def add(manager: MemoryManager, obj: ResidentObject, device: bool = False) -> ResidentObject:
    manager.add(obj)
    if device:
        assert manager.promote(obj)
    return obj
