"""Glue between the radix cache and the manager: every radix node gets a KV resident object.

Implements the cache's observer (nodes created, split, revived) and the manager's hooks for KV
(only unlocked leaves may be dropped; a dropped node leaves the tree). On start-up it rebuilds
the disk-tier nodes that the SQLite index of the state directory lists.
"""

import logging

from scalesim.memory.kv_object import KVNodeObject
from scalesim.memory.manager import MemoryManager
from scalesim.memory.resident import ResidentObject

logger = logging.getLogger(__name__)


class KVObjects:
    def __init__(self, manager: MemoryManager, cache) -> None:
        self.manager = manager
        self.cache = cache
        cache.observer = self
        manager.can_drop = self.can_drop
        manager.on_dropped = self.dropped
        manager.discard = self.drop_subtree

    def node_created(self, node) -> None:
        obj = KVNodeObject(node, self.manager.pool, self.manager.store)
        node.resident = obj
        self.manager.add(obj)

    def node_split(self, upper, lower) -> None:
        obj = KVNodeObject(upper, self.manager.pool, self.manager.store)
        obj.owners = set(lower.resident.owners) if lower.resident is not None else set()
        obj.last_use_s = lower.resident.last_use_s if lower.resident is not None else 0.0
        upper.resident = obj
        self.manager.add(obj)

    def node_revived(self, node, blocks: list[int]) -> None:
        with self.manager.lock:
            obj = node.resident
            if obj.tier == "host":
                self.manager.host_used -= obj.nbytes
            obj.adopt(blocks)
            self.manager._index(obj)

    def can_drop(self, obj: ResidentObject) -> bool:
        if obj.kind != "kv":
            return obj.can_drop
        return not obj.node.children and obj.node.lock_ref == 0

    def dropped(self, obj: ResidentObject) -> None:
        if obj.kind == "kv":
            self.cache.remove_leaf(obj.node)
            obj.node.resident = None

    def drop_subtree(self, obj: ResidentObject) -> None:
        """Drop a node and everything below it (a node off the device is never locked, nor are
        its descendants, as matching stops at it)."""
        if obj.kind != "kv":
            self.manager._drop(obj) if obj.can_drop else self.manager.remove(obj)
            return
        for child in list(obj.node.children.values()):
            if child.resident is not None:
                self.drop_subtree(child.resident)
        self.manager._drop(obj)

    def restore(self) -> int:
        """Re-create the tree's disk-tier nodes from the index; return how many were found."""
        store = self.manager.store
        if store is None:
            return 0
        found = 0
        for key, _, meta in sorted(store.entries("kv"), key=lambda e: len(e[2]["path"])):
            path, edge = meta["path"], meta["edge"]
            parent = self._find(meta["namespace"], path[: len(path) - edge])
            if parent is None or tuple(path[len(path) - edge:])[: self.cache.page] in parent.children:
                store.delete(key)  # its parent pages are gone: it can never be matched
                continue
            node = self.cache.attach_offline(parent, tuple(path[len(path) - edge:]))
            obj = KVNodeObject(node, self.manager.pool, store, tier="disk")
            obj.disk_key = key
            node.resident = obj
            self.manager.add(obj)
            found += 1
        logger.info("found %d KV objects on disk", found)
        return found

    def _find(self, namespace: str, path: list[int]):
        node, rest = self.cache.root(namespace), tuple(path)
        while rest:
            child = node.children.get(rest[: self.cache.page])
            if child is None or rest[: len(child.tokens)] != child.tokens:
                return None
            node, rest = child, rest[len(child.tokens):]
        return node
