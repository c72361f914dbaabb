"""KV prefix pages as resident objects: one object per radix node.

On the device the node's pages live in the engine's KV pool. On the host they are one tensor
[layers, 2, tokens, kv_heads, head_dim]; on disk, a self-verifying file of the state directory.
A disk copy, once written, is kept while the node lives (its pages never change), so demoting the
node to disk again is free: the disk tier is inclusive. A demotion to disk made where no file may
be written (the engine thread) stages the pages in memory (`write_pending`) for the transfer
threads to write. A node that is not ready on the device is never matched by the radix cache
until it is brought back.
"""

import hashlib
import itertools
import json
from typing import Protocol

import torch

from scalesim.memory.disk_store import CorruptObjectError, DiskStore
from scalesim.memory.copy_stream import host_copy
from scalesim.memory.resident import ResidentObject

_ids = itertools.count()
MAX_OWNERS_ON_DISK = 16  # a node more agents share is stored without owners (they are found again on use)


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
    resident: "KVNodeObject | None"


class KVTree(Protocol):
    def remove_leaf(self, node: KVNode) -> None: ...


def path_tokens(node: KVNode) -> list[int]:
    """All tokens from the root to the end of this node's edge."""
    parts = []
    while node is not None and node.parent is not None:
        parts.append(node.tokens)
        node = node.parent
    return [t for part in reversed(parts) for t in part]


def page_keys(namespace: str, path: list[int], page: int) -> list[str]:
    """The disk key of every page boundary of `path`, in one pass: key k names the path's first
    k + 1 pages (a hash chain over the namespace and the pages)."""
    digest = hashlib.sha256(json.dumps(namespace).encode()).digest()
    keys = []
    for start in range(0, len(path), page):
        digest = hashlib.sha256(digest + json.dumps(path[start:start + page]).encode()).digest()
        keys.append("kv:" + digest.hex())
    return keys


def file_meta(namespace: str, path: list[int], edge: int, owners) -> dict:
    """The meta a node's file carries: namespace, every token up to the node's end, how many of
    them are its own, and the agents that used it."""
    return {"namespace": namespace, "path": path, "edge": edge, "owners": sorted(owners)}


def owners_named(meta: dict) -> set[str]:
    """The agents a file's meta names as its owners (none if unreadable)."""
    owners = meta.get("owners")
    return {a for a in owners if isinstance(a, str)} if isinstance(owners, list) else set()


def disk_key(namespace: str, path: list[int], page: int) -> str:
    """The stable name of a node's pages on disk: its namespace and every token up to it."""
    keys = page_keys(namespace, path, page)
    return keys[-1] if keys else "kv:root:" + hashlib.sha256(json.dumps(namespace).encode()).hexdigest()


class KVNodeObject(ResidentObject):
    kind = "kv"
    writes_to_disk = True

    def __init__(self, node: KVNode, pool: KVPool, store: DiskStore | None, tree: KVTree,
                 tier: str = "device") -> None:
        super().__init__()
        self.node = node
        self.pool = pool
        self.store = store
        self.tree = tree
        self._key = f"kv:{next(_ids)}"
        self._tier: str | None = tier
        self.host_kv: torch.Tensor | None = None
        self.disk_key: str | None = None  # set while a valid copy is in the disk store
        self._new_blocks: list[int] = []
        self._staged: torch.Tensor | None = None
        self._staged_disk_key: str | None = None
        self._defer_write = False

    @property
    def key(self) -> str:
        return self._key

    @property
    def num_blocks(self) -> int:
        return len(self.node.tokens) // self.pool.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.pool.block_nbytes

    @property
    def tier(self) -> str | None:
        return self._tier

    @property
    def pin_count(self) -> int:
        return self.node.lock_ref

    @property
    def has_disk_copy(self) -> bool:
        return self.disk_key is not None

    def device_blocks_needed(self, block_nbytes: int) -> int:
        return self.num_blocks

    def device_reserved_blocks(self, block_nbytes: int) -> int:
        return 0  # its pages are pool blocks, allocated by the move itself

    def droppable(self) -> bool:
        return not self.node.children and self.node.lock_ref == 0 and self.moving_to is None

    def dependents(self) -> list[ResidentObject]:
        return [c.resident for c in self.node.children.values() if c.resident is not None]

    # --- moves ---------------------------------------------------------------------------
    def _slots(self, blocks: list[int]) -> torch.Tensor:
        size = self.pool.block_size
        slots = torch.tensor(blocks).unsqueeze(1) * size + torch.arange(size).unsqueeze(0)
        return slots.view(-1).to(self.pool.kv_cache.device)

    def _gather(self) -> torch.Tensor:
        return self.pages_of(self.node.blocks)

    def pages_of(self, blocks: list[int]) -> torch.Tensor:
        """A host copy of the KV in device `blocks`."""
        return host_copy(self.pool.kv_cache.index_select(2, self._slots(blocks)))

    def _read_disk(self) -> torch.Tensor:
        """The node's pages from its disk copy, which may hold pages in front of them (the node
        was split off the device after the file was written: KVObjects.split_off_device)."""
        kv = self.store.read(self.disk_key)["kv"]
        if kv.dim() == 5 and kv.shape[2] > len(self.node.tokens):
            kv = kv[:, :, kv.shape[2] - len(self.node.tokens):]
        expected = self.pool.kv_cache.shape[:2] + (len(self.node.tokens),) + self.pool.kv_cache.shape[3:]
        if tuple(kv.shape) != tuple(expected):
            raise CorruptObjectError(f"{self.key}: stored pages have shape {tuple(kv.shape)}, expected {tuple(expected)}")
        return kv

    def file_name(self) -> tuple[str, dict]:
        """The key and meta of this node's file: its namespace, every token up to it, and the
        agents that used it so far (up to MAX_OWNERS_ON_DISK; a restart restores them, so that
        hints prefetch restored pages and moves find them)."""
        path = path_tokens(self.node)
        owners = self.owners if len(self.owners) <= MAX_OWNERS_ON_DISK else ()
        return (disk_key(self.node.namespace, path, self.pool.block_size),
                file_meta(self.node.namespace, path, len(self.node.tokens), owners))

    def export_source(self) -> list[int] | torch.Tensor | str | None:
        """Where another engine's copy of these pages comes from, taken under the manager's
        lock: the device blocks that hold them (read with `pages_of` while the node is locked in
        the tree), the host tensor, or the key of the disk copy; None if the node holds none."""
        if self._tier == "device":
            return list(self.node.blocks)
        if self.host_kv is not None:
            return self.host_kv
        return self.disk_key

    @property
    def write_pending(self) -> bool:
        return self._tier == "disk" and self.disk_key is None and self.host_kv is not None

    def begin_move(self, tier: str, defer_write: bool = False) -> None:
        assert self.pin_count == 0 or tier == "device", f"{self.key} is pinned"
        super().begin_move(tier)
        self._defer_write = defer_write
        if tier == "device":
            blocks = self.pool.allocate(self.num_blocks)
            assert blocks is not None, "the manager must make room before moving KV to the device"
            self._new_blocks = blocks

    def transfer(self) -> None:
        target, source = self.moving_to, self._tier
        if target == "device":
            kv = self.host_kv if self.host_kv is not None else self._read_disk()
            self.pool.kv_cache.index_copy_(2, self._slots(self._new_blocks),
                                           kv.to(self.pool.kv_cache.device, self.pool.kv_cache.dtype, non_blocking=True))
        elif target == "host":
            self._staged = self._gather() if source == "device" else self._read_disk()
        elif target == "disk" and self.disk_key is None:
            kv = self._gather() if source == "device" else self.host_kv
            if self._defer_write:
                self._staged = kv
                return
            key, meta = self.file_name()
            self.store.write(key, "kv", {"kv": kv}, meta)
            self._staged_disk_key = key

    def commit_move(self) -> None:
        target, source = self.moving_to, self._tier
        self.moving_to = None
        if target == "disk" and self.disk_key is None and not self._defer_write:
            self.disk_key, self._staged_disk_key = self._staged_disk_key, None
        self._leave(source)
        if target == "device":
            self.node.blocks, self._new_blocks = self._new_blocks, []
        elif target == "host" or (target == "disk" and self._defer_write):
            self.host_kv, self._staged = self._staged, None  # on the host, or staged for its write
        self._tier = target

    def abort_move(self) -> None:
        if self._new_blocks:
            self.pool.decref(self._new_blocks)
            self._new_blocks = []
        self._staged = None
        self.moving_to = None

    def _leave(self, tier: str | None) -> None:
        """Release the copy in `tier` (a disk copy is kept: it stays valid; staged pages go)."""
        if tier == "device":
            self.pool.decref(self.node.blocks)
            self.node.blocks = []
        elif tier in ("host", "disk"):
            self.host_kv = None

    def adopt(self, blocks: list[int]) -> str | None:
        """Back on the device with pages a request just recomputed (already referenced for us);
        return the tier it left."""
        old = self._tier
        self._leave(old)
        self.node.blocks = list(blocks)
        self._tier = "device"
        return old

    def discard_disk_copy(self) -> None:
        """The node's edge changed (a split): its file no longer matches it."""
        if self.disk_key is not None and self.store is not None:
            self.store.delete(self.disk_key)
        self.disk_key = None

    def forget(self) -> None:
        """Free the pages in every tier and leave the radix tree (recomputed if needed again)."""
        assert self.droppable(), f"{self.key} is pinned, moving or has children"
        self._leave(self._tier)
        self.discard_disk_copy()
        self._tier = None
        self.tree.remove_leaf(self.node)
        self.node.resident = None
