"""An agent's KV prefix as files that travel between engines (a planned move across replicas).

- `export_agent_kv`: the file (as the disk tier writes it: safetensors, identity, checksum) of
  every KV node the agent uses, with the nodes on their paths, parents first. Pages on the
  device or the host are copied under the manager's lock; files are encoded, and disk copies
  read, after it is released.
- `import_agent_kv`: verifies and stores the files in this engine's disk tier, attaches them to
  the radix tree as disk-tier nodes (the way a restart does) and makes the agent their owner, so
  that a hint about the agent prefetches them. Nodes the tree has already are skipped.
- `drop_agent_kv`: forgets the nodes only this agent uses, leaves first (the old owner's side
  of a move); nodes in use by a running request are kept and evicted later by policy.
- `agents_with_kv`: which agents own nodes no other agent uses here, how many bytes, how far.
"""

import math
from dataclasses import dataclass

from scalesim.memory.disk_store import CorruptObjectError, DiskStore
from scalesim.memory.kv_objects import KVObjects


class NoDiskTierError(RuntimeError):
    """Moving agents needs a disk tier on both ends (--disk-dir)."""


@dataclass
class ImportResult:
    files: int  # files received
    attached: int  # new disk-tier nodes in the tree
    present: int  # nodes the tree had already
    rejected: int  # files that did not verify or were written for another model, page size or dtype
    nbytes: int  # bytes of the files stored


def _store(kv_objects: KVObjects) -> DiskStore:
    if kv_objects.manager.store is None:
        raise NoDiskTierError("moving an agent's KV needs a disk tier on both replicas (start with --disk-dir)")
    return kv_objects.manager.store


def _kv_objects_of(kv_objects: KVObjects, agent_id: str) -> list:
    return [o for o in kv_objects.manager.index.of_agent(agent_id) if o.kind == "kv"]


def export_agent_kv(kv_objects: KVObjects, agent_id: str) -> list[bytes]:
    """The files of the agent's KV nodes and their ancestors, parents first (empty if none)."""
    store = _store(kv_objects)
    with kv_objects.manager.lock:
        nodes: dict[int, object] = {}
        for obj in _kv_objects_of(kv_objects, agent_id):
            node = obj.node
            while node is not None and node.parent is not None and id(node) not in nodes:
                nodes[id(node)] = node
                node = node.parent
        sources = []
        for node in nodes.values():
            if node.resident is not None:
                source = node.resident.export_source()
                if source is not None:
                    key, meta = node.resident.file_name()
                    sources.append((key, meta, source))
    files = []
    for key, meta, source in sorted(sources, key=lambda s: len(s[1]["path"])):
        try:
            files.append(store.encoded(source) if isinstance(source, str) else
                         store.encode(key, "kv", {"kv": source}, meta))
        except CorruptObjectError:  # dropped since (or bad): its descendants wait at the target
            continue
    return files


def import_agent_kv(kv_objects: KVObjects, agent_id: str, files: list[bytes]) -> ImportResult:
    """Store `files` (from `export_agent_kv` of an engine of the same model and page layout) and
    attach them for `agent_id`. DiskFullError if the disk tier cannot hold them (the files stored
    before stay, attached)."""
    store, manager = _store(kv_objects), kv_objects.manager
    stored, present, rejected, nbytes = [], 0, 0, 0
    try:
        for data in files:
            try:
                key, meta = store.write_encoded(data)
            except CorruptObjectError:
                rejected += 1
                continue
            if not (isinstance(meta, dict) and isinstance(meta.get("namespace"), str)
                    and isinstance(meta.get("path"), list)):
                store.delete(key)
                rejected += 1
                continue
            with manager.lock:
                node = kv_objects.find(meta["namespace"], meta["path"])
                if node is not None:  # the tree has these pages: keep the file only as the node's own copy
                    if node.resident is None or node.resident.disk_key != key:
                        store.delete(key)
                    present += 1
                    continue
            stored.append((key, meta))
            nbytes += len(data)
    finally:
        with manager.lock:
            attached = kv_objects.attach_stored(stored)
            for _, meta in stored:
                _own_path(kv_objects, agent_id, meta)
    return ImportResult(len(files), attached, present, rejected, nbytes)


def _own_path(kv_objects: KVObjects, agent_id: str, meta: dict) -> None:
    node = kv_objects.find(meta["namespace"], meta["path"])
    while node is not None and node.parent is not None:
        if node.resident is not None:
            kv_objects.manager.index.add_owner(node.resident, agent_id)
        node = node.parent


def drop_agent_kv(kv_objects: KVObjects, agent_id: str) -> tuple[int, int]:
    """Forget the KV nodes only `agent_id` uses, in every tier; (nodes dropped, nodes kept
    because a running request holds them)."""
    manager, dropped = kv_objects.manager, 0
    with manager.lock:
        while True:
            mine = [o for o in _kv_objects_of(kv_objects, agent_id) if o.owners == {agent_id}]
            leaves = [o for o in mine if o.droppable()]
            if not leaves:
                return dropped, len(mine)
            for obj in leaves:
                manager.forget(obj)
            dropped += len(leaves)


def agents_with_kv(kv_objects: KVObjects) -> dict[str, dict]:
    """Agent -> {"nbytes": bytes of KV nodes only it uses, "distance": steps until its next
    call (None: unknown)} for every agent that owns such nodes."""
    manager = kv_objects.manager
    with manager.lock:
        out = {}
        for agent, objects in manager.index.by_agent.items():
            nbytes = sum(o.nbytes for o in objects if o.kind == "kv" and len(o.owners) == 1)
            if nbytes:
                distance = manager.tracker.distance(agent)
                out[agent] = {"nbytes": nbytes, "distance": distance if math.isfinite(distance) else None}
        return out
