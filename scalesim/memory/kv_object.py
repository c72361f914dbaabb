"""KV prefix pages as resident objects: one object per radix node.

On the device the node's pages live in the engine's KV pool. Demoted to the host, they are one
tensor [layers, 2, tokens, kv_heads, head_dim]; demoted to disk, a checksummed file in the state
directory. Brought back, they are copied into freshly allocated pool pages. A node that is not on
the device is never matched by the radix cache until it is brought back.
"""

import hashlib
import itertools
import json
from typing import Protocol

import torch

from scalesim.memory.disk_store import CorruptObjectError, DiskStore
from scalesim.memory.resident import ResidentObject, to_host

_ids = itertools.count()


class KVPool(Protocol):
    kv_cache: torch.Tensor
    block_size: int
    block_nbytes: int

    def allocate(self, count: int) -> list[int] | None: ...
    def decref(self, blocks: list[int]) -> None: ...


class KVNode(Protocol):
    namespace: str
    tokens: tuple[int, ...]
    blocks: list[int]
    lock_ref: int
    children: dict
    parent: "KVNode | None"


def path_tokens(node: KVNode) -> list[int]:
    """All tokens from the root to the end of this node's edge."""
    parts = []
    while node is not None and node.parent is not None:
        parts.append(node.tokens)
        node = node.parent
    return [t for part in reversed(parts) for t in part]


def disk_key(namespace: str, path: list[int]) -> str:
    """The stable name of a node's pages on disk: its namespace and every token up to it."""
    return "kv:" + hashlib.sha256(json.dumps([namespace, path]).encode()).hexdigest()


class KVNodeObject(ResidentObject):
    kind = "kv"
    can_drop = True

    def __init__(self, node: KVNode, pool: KVPool, store: DiskStore | None, tier: str = "device") -> None:
        super().__init__()
        self.node = node
        self.pool = pool
        self.store = store
        self._key = f"kv:{next(_ids)}"
        self._tier: str | None = tier
        self.host_kv: torch.Tensor | None = None
        self.disk_key: str | None = None

    @property
    def key(self) -> str:
        return self._key

    @property
    def nbytes(self) -> int:
        return len(self.node.tokens) // self.pool.block_size * self.pool.block_nbytes

    @property
    def num_blocks(self) -> int:
        return len(self.node.tokens) // self.pool.block_size

    @property
    def tier(self) -> str | None:
        return self._tier

    @property
    def pin_count(self) -> int:
        return self.node.lock_ref

    def device_blocks_needed(self, block_nbytes: int) -> int:
        return self.num_blocks

    def _slots(self, blocks: list[int]) -> torch.Tensor:
        size = self.pool.block_size
        slots = torch.tensor(blocks).unsqueeze(1) * size + torch.arange(size).unsqueeze(0)
        return slots.view(-1).to(self.pool.kv_cache.device)

    def _gather(self) -> torch.Tensor:
        return to_host(self.pool.kv_cache.index_select(2, self._slots(self.node.blocks)))

    def _read_disk(self) -> torch.Tensor:
        return self.store.read(self.disk_key)["kv"]

    def move_to(self, tier: str) -> None:
        if tier == self._tier:
            return
        assert self.pin_count == 0 or tier == "device", f"{self.key} is pinned"
        if tier == "device":
            kv = self.host_kv if self._tier == "host" else self._read_disk()
            expected = self.pool.kv_cache.shape[:2] + (len(self.node.tokens),) + self.pool.kv_cache.shape[3:]
            if tuple(kv.shape) != tuple(expected):
                raise CorruptObjectError(f"{self.key}: stored pages have shape {tuple(kv.shape)}, expected {expected}")
            blocks = self.pool.allocate(self.num_blocks)
            assert blocks is not None, "the manager must make room before moving KV to the device"
            try:
                self.pool.kv_cache.index_copy_(2, self._slots(blocks), kv.to(self.pool.kv_cache.device,
                                                                              self.pool.kv_cache.dtype))
            except BaseException:
                self.pool.decref(blocks)
                raise
            self.node.blocks = blocks
        elif tier == "host":
            self.host_kv = self._gather() if self._tier == "device" else self._read_disk()
        elif tier == "disk":
            kv = self._gather() if self._tier == "device" else self.host_kv
            self.disk_key = self.disk_key or disk_key(self.node.namespace, path_tokens(self.node))
            self.store.write(self.disk_key, "kv", {"kv": kv}, {
                "namespace": self.node.namespace, "path": path_tokens(self.node), "edge": len(self.node.tokens)})
        self._leave(self._tier, tier)
        self._tier = tier

    def _leave(self, old: str | None, new: str) -> None:
        if old == "device":
            self.pool.decref(self.node.blocks)
            self.node.blocks = []
        elif old == "host":
            self.host_kv = None
        elif old == "disk" and new != "disk" and self.store is not None and self.disk_key is not None:
            self.store.delete(self.disk_key)
            self.disk_key = None

    def adopt(self, blocks: list[int]) -> None:
        """Back on the device with pages a request just recomputed (already referenced for us)."""
        self._leave(self._tier, "device")
        self.node.blocks = list(blocks)
        self._tier = "device"

    def drop(self) -> None:
        """Forget the pages in every tier (they will be recomputed if needed)."""
        assert self.pin_count == 0, f"{self.key} is pinned"
        if self._tier == "device":
            self.pool.decref(self.node.blocks)
            self.node.blocks = []
        self.host_kv = None
        if self.disk_key is not None and self.store is not None:
            self.store.delete(self.disk_key)
            self.disk_key = None
        self._tier = None
