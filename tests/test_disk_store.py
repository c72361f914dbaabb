"""The disk tier's store: atomic, budgeted, self-verifying files under a SQLite index that heals."""

import errno
import logging
import os
import sqlite3

import pytest
import torch

from scalesim.memory import disk_store
from scalesim.memory.disk_store import CorruptObjectError, DiskFullError, DiskStore, StateDirInUseError

KV = {"kv": torch.arange(64, dtype=torch.float32).view(2, 32)}


def _store(tmp_path, budget: int = 10**9, **kwargs) -> DiskStore:
    return DiskStore(tmp_path / "state", budget, identity={"model": "m"}, **kwargs)


def _file_sizes(store: DiskStore) -> int:
    return sum(p.stat().st_size for p in store.objects_dir.iterdir())


def test_what_is_written_is_read_back_and_its_bytes_are_counted_without_a_table_scan(tmp_path):
    store = _store(tmp_path)
    sizes = [store.write(f"k{i}", "kv", {"kv": KV["kv"] * i}, {"i": i}) for i in range(3)]
    assert torch.equal(store.read("k2")["kv"], KV["kv"] * 2)
    assert store.used_nbytes == sum(sizes) == _file_sizes(store)
    store.delete("k0")
    assert store.used_nbytes == sum(sizes[1:]) == _file_sizes(store)
    store.close()


def test_a_write_over_the_budget_fails_and_leaves_nothing_behind(tmp_path):
    store = _store(tmp_path, budget=1000)
    with pytest.raises(DiskFullError):
        store.write("big", "kv", {"kv": torch.zeros(1000)}, {})
    assert store.used_nbytes == 0 and list(store.objects_dir.iterdir()) == [] and not store.contains("big")
    store.close()


def test_a_full_filesystem_fails_the_write_cleanly(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.write("kept", "kv", KV, {})
    used = store.used_nbytes

    def no_space(path, data):
        path.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write_file", no_space)
    with pytest.raises(DiskFullError):
        store.write("new", "kv", KV, {})
    assert store.used_nbytes == used and not store.contains("new")
    assert not list(store.objects_dir.glob("*.tmp"))
    assert torch.equal(store.read("kept")["kv"], KV["kv"])
    store.close()


def test_a_file_swapped_for_another_objects_is_never_served(tmp_path):
    store = _store(tmp_path)
    store.write("alice", "kv", {"kv": torch.ones(8)}, {})
    store.write("bob", "kv", {"kv": torch.zeros(8)}, {})
    a, b = store.path_of("alice"), store.path_of("bob")
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    for key in ("alice", "bob"):
        with pytest.raises(CorruptObjectError):
            store.read(key)
    store.close()


def test_swapping_two_index_rows_is_detected(tmp_path):
    store = _store(tmp_path)
    store.write("alice", "kv", {"kv": torch.ones(8)}, {})
    store.write("bob", "kv", {"kv": torch.zeros(8)}, {})
    rows = dict(store.db.execute("SELECT key, file || '|' || sha256 FROM objects").fetchall())
    for key, other in (("alice", "bob"), ("bob", "alice")):
        file, sha = rows[other].split("|")
        store.db.execute("UPDATE objects SET file = ?, sha256 = ? WHERE key = ?", (file, sha, key))
    store.db.commit()
    for key in ("alice", "bob"):
        with pytest.raises(CorruptObjectError):
            store.read(key)
    store.close()


def test_a_truncated_or_missing_file_is_detected(tmp_path):
    store = _store(tmp_path)
    store.write("a", "kv", KV, {})
    store.write("b", "kv", KV, {})
    path = store.path_of("a")
    path.write_bytes(path.read_bytes()[:-40])
    store.path_of("b").unlink()
    for key in ("a", "b"):
        with pytest.raises(CorruptObjectError):
            store.read(key)
    store.close()


@pytest.mark.parametrize("damage", [b"random bytes, not a database" * 40, b"SQLite format 3\x00" + b"\xff" * 500])
def test_a_corrupted_index_is_moved_aside_and_rebuilt_from_the_files(tmp_path, caplog, damage):
    store = _store(tmp_path)
    for i in range(3):
        store.write(f"k{i}", "kv", {"kv": KV["kv"] + i}, {"i": i})
    used = store.used_nbytes
    store.close()
    (tmp_path / "state" / "index.sqlite").write_bytes(damage)
    for suffix in ("-wal", "-shm"):
        (tmp_path / "state" / f"index.sqlite{suffix}").unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING):
        store = _store(tmp_path)
    assert "unreadable" in caplog.text and list((tmp_path / "state").glob("index.sqlite.corrupt-*"))
    assert sorted(k for k, _, _ in store.entries("kv")) == ["k0", "k1", "k2"]
    assert torch.equal(store.read("k1")["kv"], KV["kv"] + 1) and store.used_nbytes == used
    store.close()


def test_an_index_row_whose_meta_is_not_json_is_dropped(tmp_path):
    store = _store(tmp_path)
    store.write("good", "kv", KV, {})
    store.write("bad", "kv", KV, {})
    store.db.execute("UPDATE objects SET meta = '{not json' WHERE key = 'bad'")
    store.db.commit()
    assert [k for k, _, _ in store.entries("kv")] == ["good"]
    assert not store.contains("bad") and store.used_nbytes == _file_sizes(store)
    store.close()


def test_one_process_per_state_directory_and_stale_temporary_files_are_removed(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(StateDirInUseError):
        _store(tmp_path)
    store.close()
    (tmp_path / "state" / "objects" / "x.tmp").write_bytes(b"half a write")
    store = _store(tmp_path)
    assert not list(store.objects_dir.glob("*.tmp"))
    store.close()


@pytest.mark.parametrize("page_cache", [False, True])
def test_reads_bypass_the_page_cache_unless_asked_to_keep_it(tmp_path, monkeypatch, page_cache):
    advised = []
    monkeypatch.setattr(disk_store.os, "posix_fadvise", lambda fd, off, n, advice: advised.append(advice),
                        raising=False)
    store = _store(tmp_path, page_cache=page_cache)
    store.write("a", "kv", KV, {})
    store.read("a")
    assert advised == ([] if page_cache else [os.POSIX_FADV_DONTNEED] * 2)
    store.close()


def test_objects_of_another_identity_are_not_served(tmp_path):
    store = _store(tmp_path)
    store.write("a", "kv", KV, {})
    store.close()
    other = DiskStore(tmp_path / "state", 10**9, identity={"model": "other"})
    assert other.entries("kv") == [] and other.used_nbytes == 0
    other.close()
    assert sqlite3.connect(str(tmp_path / "state" / "index.sqlite")).execute("SELECT COUNT(*) FROM objects").fetchone()[0] == 0
