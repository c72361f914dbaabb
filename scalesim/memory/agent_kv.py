"""An agent's KV prefix as files that travel between engines (a planned move across replicas).

- `export_agent_kv`: the file (as the disk tier writes it: safetensors, identity, checksum) of
  every KV node the agent uses, with the nodes on their paths, parents first. Device pages are
  copied with their nodes locked in the tree and the manager's lock released; host pages and disk
  copies are read the same way.
- `import_agent_kv`: verifies each file against this engine's identity, finds where it fits in
  this engine's tree (a node that runs past the point where the agent's path leaves it is split
  there, on the device or off it; pages the tree holds already are cut off the file), stores it
  in the disk tier and attaches it as a disk-tier node the agent owns, so that a hint about the
  agent prefetches it.
  The result says whether every page arrived (`complete`): only then may the source drop them.
- `adopt_state_dir`: the same for every file a departed engine left in its state folder.
- `drop_agent_kv`: forgets the nodes only this agent uses, leaves first (the old owner's side of
  a move); nodes in use by a running request or loaded for a waiting one are kept.
- `agents_with_kv`: which agents own nodes no other agent uses here, how many bytes, how far.
"""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from scalesim.memory.disk_store import CorruptObjectError, DiskFullError, DiskStore
from scalesim.memory.kv_object import owners_named
from scalesim.memory.kv_objects import KVObjects


MAX_SPLITS_PER_FILE = 8  # nodes off the device one file may cut on its way in (one, unless the tree changes)


class NoDiskTierError(RuntimeError):
    """Moving agents needs a disk tier on both ends (--disk-dir)."""


@dataclass
class ImportResult:
    files: int = 0  # files received
    attached: int = 0  # new disk-tier nodes in the tree
    present: int = 0  # files whose pages the tree held already
    blocked: int = 0  # files that found no place: pages before them missing, or a node off the device in the way
    rejected: int = 0  # files that did not verify or were written for another model, page size or dtype
    nbytes: int = 0  # bytes stored

    @property
    def complete(self) -> bool:
        """Every page the source sent is in this engine's tree now."""
        return self.attached + self.present == self.files

    def add(self, other: "ImportResult") -> None:
        for name, value in dataclasses.asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def _store(kv_objects: KVObjects) -> DiskStore:
    if kv_objects.manager.store is None:
        raise NoDiskTierError("moving an agent's KV needs a disk tier on both replicas (start with --disk-dir)")
    return kv_objects.manager.store


def _kv_objects_of(kv_objects: KVObjects, agent_id: str) -> list:
    return [o for o in kv_objects.manager.index.of_agent(agent_id) if o.kind == "kv"]


def export_agent_kv(kv_objects: KVObjects, agent_id: str) -> list[bytes]:
    """The files of the agent's KV nodes and their ancestors, parents first (empty if none)."""
    store, cache = _store(kv_objects), kv_objects.cache
    with kv_objects.manager.lock:
        nodes: dict[int, object] = {}
        for obj in _kv_objects_of(kv_objects, agent_id):
            node = obj.node
            while node is not None and node.parent is not None and id(node) not in nodes:
                nodes[id(node)] = node
                node = node.parent
        sources, locked = [], []
        for node in nodes.values():
            source = node.resident.export_source() if node.resident is not None else None
            if source is None:
                continue
            if isinstance(source, list):  # device pages: kept in place (never evicted) while copied
                cache.lock(node)
                locked.append(node)
            sources.append((node.resident, *node.resident.file_name(), source))
    files = []
    try:
        for obj, key, meta, source in sorted(sources, key=lambda s: len(s[2]["path"])):
            try:
                if isinstance(source, str):
                    files.append(store.encoded(source))
                else:
                    pages = obj.pages_of(source) if isinstance(source, list) else source
                    files.append(store.encode(key, "kv", {"kv": pages}, meta))
            except CorruptObjectError:  # dropped since (or bad): the nodes after it do not fit at the target
                continue
    finally:
        with kv_objects.manager.lock:
            for node in locked:
                cache.unlock(node)
    return files


def import_agent_kv(kv_objects: KVObjects, agent_id: str, files: list[bytes]) -> ImportResult:
    """Store `files` (from `export_agent_kv` of an engine of the same model and page layout, parents
    first) and attach them for `agent_id`. DiskFullError if the disk tier cannot hold them (the
    files placed before stay)."""
    result = ImportResult(files=len(files))
    for data in files:
        import_kv_file(kv_objects, data, {agent_id}, result)
    return result


def import_kv_file(kv_objects: KVObjects, data: bytes, owners: set[str] | None, result: ImportResult) -> str:
    """Place one file (see the module docstring), its nodes owned by `owners` (None: the agents
    the file names); count it in `result`; "attached", "present", "blocked" or "rejected"."""
    store, manager = _store(kv_objects), kv_objects.manager
    try:
        key, kind, meta = store.verify_encoded(data)
        namespace, path, edge = meta["namespace"], list(meta["path"]), int(meta["edge"])
        if kind != "kv" or not isinstance(namespace, str) or not 0 < edge <= len(path):
            raise CorruptObjectError(f"{key}: not a KV node")
    except (CorruptObjectError, KeyError, TypeError, ValueError):
        result.rejected += 1
        return "rejected"
    if owners is None:
        owners = owners_named(meta)
    for _ in range(MAX_SPLITS_PER_FILE):
        with manager.lock:
            where, node, start = kv_objects.graft_point(namespace, path, edge)
            if where == "present":
                _own_path(kv_objects, owners, node)
        if where != "split" or not kv_objects.split_off_device(node, start):
            break
    if where == "split":  # the node in the way could not be split
        where = "blocked"
    if where == "attach":
        cut = start - (len(path) - edge)  # pages the tree holds already come off the file's front
        if cut:
            kv = store.decode(data)["kv"][:, :, cut:]
            meta = {**meta, "edge": len(path) - start}
            data = store.encode(key, "kv", {"kv": kv}, meta)
        store.store_encoded(key, "kv", data, meta)
        with manager.lock:
            again, parent, start_now = kv_objects.graft_point(namespace, path, edge)
            if (again, parent, start_now) == ("attach", node, start):
                _own_path(kv_objects, owners, kv_objects.attach_file(node, tuple(path[start:]), key, owners))
                result.attached += 1
                result.nbytes += len(data)
                return "attached"
            # the tree changed while the file was written: a request computed these pages, or took the parent away
            resident = parent.resident if again == "present" and parent is not None else None
            if resident is None or (resident.disk_key != key and resident.moving_to is None):
                store.delete(key)  # not the copy of a node that holds it, or is writing it now
            if again == "present":
                _own_path(kv_objects, owners, parent)
            where = "present" if again == "present" else "blocked"
    result.present += where == "present"
    result.blocked += where == "blocked"
    return where


def adopt_state_dir(kv_objects: KVObjects, folder: Path) -> ImportResult:
    """Take in the KV a departed engine left in its state folder (a replica removed by a
    scale-down persists its tiers there as it stops): each file, parents first, placed as an
    import is, owned by the agents it names, and deleted from the folder once placed here (a
    file that found no place stays). StateDirInUseError while a live engine holds the folder."""
    store = _store(kv_objects)
    departed = DiskStore(folder, budget_nbytes=store.budget_nbytes, identity=store.identity)
    try:
        entries = sorted(departed.entries("kv"), key=lambda e: len(e[2].get("path", ())))
        result = ImportResult(files=len(entries))
        for done, (key, _, _) in enumerate(entries):
            try:
                data = departed.encoded(key)
            except CorruptObjectError:
                result.rejected += 1
                data = None
            try:
                if data is None or import_kv_file(kv_objects, data, None, result) != "blocked":
                    departed.delete(key)
            except DiskFullError:  # the rest stays in the folder, for the next replica that claims it
                result.blocked += len(entries) - done
                break
        return result
    finally:
        departed.close()


def _own_path(kv_objects: KVObjects, owners: set[str], node) -> None:
    while node is not None and node.parent is not None:
        if node.resident is not None:
            for agent_id in owners:
                kv_objects.manager.add_owner(node.resident, agent_id)
        node = node.parent


def drop_agent_kv(kv_objects: KVObjects, agent_id: str) -> tuple[int, int]:
    """Forget the KV nodes only `agent_id` uses, in every tier; (nodes dropped, nodes kept
    because a running request holds them or a waiting one has them loaded)."""
    manager, dropped = kv_objects.manager, 0
    with manager.lock:
        while True:
            mine = [o for o in _kv_objects_of(kv_objects, agent_id) if o.owners == {agent_id}]
            leaves = [o for o in mine if o.droppable() and not manager.loads.is_held(o.key)]
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
