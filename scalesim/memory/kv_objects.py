"""Glue between the radix cache and the manager: every radix node gets a KV resident object.

Implements the cache's observer (nodes created, split, revived). On start-up it rebuilds the
tree's disk-tier nodes from the state directory's index: every verified object is kept. A node
whose parent pages are not on disk (dropped before the restart) waits as an orphan and is
attached as soon as a request computes that parent again.
"""

import logging

from scalesim.memory.disk_store import CorruptObjectError
from scalesim.memory.kv_object import KVNodeObject, disk_key, file_meta, owners_named, page_keys, path_tokens
from scalesim.memory.manager import MemoryManager

logger = logging.getLogger(__name__)


class KVObjects:
    def __init__(self, manager: MemoryManager, cache) -> None:
        self.manager = manager
        self.cache = cache
        self.orphans: dict[str, list[tuple[str, dict]]] = {}  # disk key of the missing parent -> (key, meta)
        cache.observer = self

    def _new_object(self, node, tier: str = "device") -> KVNodeObject:
        obj = KVNodeObject(node, self.manager.pool, self.manager.store, self.cache, tier=tier)
        node.resident = obj
        return obj

    def node_created(self, node) -> None:
        self.manager.add(self._new_object(node))
        self._attach_orphans(node)

    def node_split(self, upper, lower) -> None:
        with self.manager.lock:
            obj = self._new_object(upper)
            if lower.resident is not None:
                lower.resident.discard_disk_copy()  # its edge is shorter now: the file no longer matches it
            self._add_upper(obj, lower.resident)
            self._attach_orphans(upper, may_split=False)  # the caller holds `upper`: keep its edge

    def _add_upper(self, upper: KVNodeObject, lower: KVNodeObject | None) -> None:
        """Manage the upper part of a split node, used by the same agents as the lower part,
        which is ranked again for its shorter edge."""
        if lower is not None:
            upper.owners, upper.last_use_s = set(lower.owners), lower.last_use_s
        self.manager.add(upper)
        if lower is not None:
            self.manager.index.rekey(lower)

    def splittable(self, node) -> bool:
        """Whether a node off the device may be split now (`split_off_device`): nothing moves,
        loads or stages its pages, and it holds a copy of them."""
        obj = node.resident
        return obj is not None and obj.moving_to is None and node.lock_ref == 0 and not obj.write_pending \
            and not self.manager.loads.is_held(obj.key) and (obj.host_kv is not None or obj.disk_key is not None)

    def split_off_device(self, node, pages: int) -> bool:
        """Cut a node whose pages are on the host or on disk after `pages` pages (an import's
        thread: the engine splits device nodes only). The upper part gets pages of its own: a
        host tensor, and a file if the node had one. The lower part keeps the node's object and its
        disk copy, whose file still holds the upper pages in front (read past: `_read_disk`; its
        index row gets the shorter edge). Files are read and written before the tree changes,
        outside the manager's lock; False, with nothing changed, if the node changed meanwhile or
        a file could not be read or written."""
        store, cut = self.manager.store, pages * self.cache.page
        with self.manager.lock:
            if not self.splittable(node):
                return False
            obj, tokens, host_kv, file_key = node.resident, node.tokens, node.resident.host_kv, node.resident.disk_key
            path = path_tokens(node)
        upper_path = path[: len(path) - len(tokens) + cut]
        upper_key = disk_key(node.namespace, upper_path, self.cache.page)
        try:
            kv = host_kv if host_kv is not None else store.read(file_key)["kv"]
            upper_kv = kv[:, :, kv.shape[2] - len(tokens):][:, :, :cut].clone()
            if file_key is not None:
                store.write(upper_key, "kv", {"kv": upper_kv}, file_meta(node.namespace, upper_path, cut, obj.owners))
        except (CorruptObjectError, OSError) as exc:  # DiskFullError is an OSError
            logger.info("node %s not split off the device: %s", obj.key, exc)
            return False
        with self.manager.lock:
            changed = node.resident is not obj or node.tokens != tokens or obj.disk_key != file_key
            if changed or not self.splittable(node):
                if file_key is not None and (node.resident is None or node.resident.disk_key != upper_key):
                    store.delete(upper_key)
                return False
            upper = self.cache.split(node, pages, notify=False)
            part = self._new_object(upper, tier=obj.tier)
            if host_kv is not None:
                part.host_kv, obj.host_kv = upper_kv, host_kv[:, :, cut:].clone()
            if file_key is not None:
                part.disk_key = upper_key
                store.set_meta(file_key, obj.file_name()[1])
            if obj.tier == "host":  # claimed under the node's whole edge, claimed again by add()
                self.manager.tiers.release_host(self.manager.tiers.host_charge(part))
            self._add_upper(part, obj)
            return True

    def node_revived(self, node, blocks: list[int]) -> None:
        obj = node.resident
        self.manager.revived(obj, obj.adopt(blocks))

    def can_revive(self, node) -> bool:
        """Pages off the device may be replaced by recomputed ones unless they are moving."""
        return node.resident is not None and node.resident.moving_to is None

    # --- restart ---------------------------------------------------------------------------------
    def restore(self) -> int:
        """Re-create the tree's disk-tier nodes from the index; return how many were attached."""
        if self.manager.store is None:
            return 0
        store, attached = self.manager.store, 0
        for key, _, meta in sorted(store.entries("kv"), key=lambda e: len(e[2].get("path", ()))):
            try:
                namespace, path, edge = meta["namespace"], list(meta["path"]), int(meta["edge"])
            except (KeyError, TypeError, ValueError):
                logger.warning("disk object %s has unusable meta; removed", key)
                store.delete(key)
                continue
            parent = self.find(namespace, path[: len(path) - edge])
            if parent is None:
                self.orphans.setdefault(disk_key(namespace, path[: len(path) - edge], self.cache.page),
                                        []).append((key, meta))
                continue
            attached += self._attach(parent, key, meta)
        logger.info("found %d KV objects on disk (%d waiting for their parent pages)", attached,
                    sum(len(v) for v in self.orphans.values()))
        return attached

    def _attach(self, parent, key: str, meta: dict) -> int:
        edge = tuple(meta["path"][len(meta["path"]) - meta["edge"]:])
        if not edge or len(edge) % self.cache.page or edge[: self.cache.page] in parent.children:
            logger.info("disk object %s is superseded by pages in the tree; removed", key)
            self.manager.store.delete(key)
            return 0
        node = self.attach_file(parent, edge, key, owners_named(meta))
        return 1 + self._attach_orphans(node, may_split=False)

    def attach_file(self, parent, tokens: tuple[int, ...], key: str, owners: set[str]):
        """A disk-tier node under `parent` for `tokens`, whose pages are the stored object `key`."""
        node = self.cache.attach_offline(parent, tokens)
        obj = self._new_object(node, tier="disk")
        obj.disk_key = key
        obj.owners = set(owners)
        self.manager.add(obj)
        return node

    def graft_point(self, namespace: str, path: list[int], own_tokens: int) -> tuple[str, object, int]:
        """Where a stored node for `path`, whose last `own_tokens` tokens are its own, fits into
        the tree now (the caller holds the manager's lock):
        - ("present", node, len(path)): the tree holds all its pages (`node` ends at or past them);
        - ("attach", parent, start): the tree holds its pages before `start` (at least those of
          its parent): attach `path[start:]` under `parent`. A node that ran past the point where
          `path` leaves it is split there if it is on the device;
        - ("split", node, pages): `path` leaves `node`, which is off the device, after `pages`
          pages: the caller splits it (`split_off_device`, outside the lock) and asks again;
        - ("blocked", None, 0): pages before its own are missing, or `path` leaves a node off the
          device that cannot be split now."""
        page, node, pos = self.cache.page, self.cache.root(namespace), 0
        while pos < len(path):
            child = node.children.get(tuple(path[pos:pos + page]))
            if child is None:
                break
            common = self.cache.common_pages(child.tokens, tuple(path[pos:])) * page
            if common < len(child.tokens):
                if pos + common == len(path):
                    return "present", child, len(path)
                if not child.on_device:
                    return ("split", child, common // page) if self.splittable(child) else ("blocked", None, 0)
                child = self.cache.split(child, common // page)
            node, pos = child, pos + len(child.tokens)
        if pos == len(path):
            return "present", node, pos
        return ("attach", node, pos) if pos >= len(path) - own_tokens else ("blocked", None, 0)

    def _attach_orphans(self, node, may_split: bool = True) -> int:
        """Attach the orphans whose parent path ends at the end of `node`'s edge, and with
        `may_split` those whose parent ends inside it (the node is split there). Only a new
        node on the device is split: an off-device node's pages cannot be cut, and a node the
        cache is walking must keep its edge. Orphans inside such a node keep waiting."""
        if not self.orphans:
            return 0
        page, path = self.cache.page, path_tokens(node)
        keys = page_keys(node.namespace, path, page)
        first = (len(path) - len(node.tokens)) // page
        for boundary in range(first, len(keys) - 1) if may_split and node.on_device else ():
            if keys[boundary] in self.orphans:
                self.cache.split(node, boundary + 1 - first)  # node_split attaches them to the upper part
                return self._attach_orphans(node)
        waiting = self.orphans.pop(keys[-1], ()) if keys else ()
        return sum(self._attach(node, key, meta) for key, meta in waiting)

    def find(self, namespace: str, path: list[int]):
        """The node whose edge ends exactly at the end of `path`, or None."""
        node, rest = self.cache.root(namespace), tuple(path)
        while rest:
            child = node.children.get(rest[: self.cache.page])
            if child is None or rest[: len(child.tokens)] != child.tokens:
                return None
            node, rest = child, rest[len(child.tokens):]
        return node
