"""The disk tier: one self-verifying file per object under a state directory, indexed in SQLite.

- A write is atomic (temporary file, fsync, rename) and bounded by the byte budget: a write that
  would exceed it, or that the filesystem refuses (disk full), fails with `DiskFullError` and
  leaves nothing behind.
- A file is the object's tensors in safetensors format (its header names the key, kind, meta and
  identity) followed by a 32-byte SHA-256 of key and body, so a file swapped for another
  object's, truncated or corrupted fails verification and is never served (`CorruptObjectError`).
- Reads cost what the disk costs: after each write and each read the file's pages are dropped
  from the page cache (`posix_fadvise(DONTNEED)`), as agent state at the scale this tier exists
  for is far larger than RAM; `page_cache=True` keeps the OS behaviour.
- The SQLite index is a cache of the file headers: a corrupted index is moved aside with a
  warning and rebuilt from the files; rows that cannot be read are dropped. Used bytes are
  counted in memory, incrementally. One process per state directory (a lock file); temporary
  files of an interrupted write are removed at start.
"""

import errno
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import IO

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

logger = logging.getLogger(__name__)
INDEX_FILE = "index.sqlite"
LOCK_FILE = "lock"
OBJECTS_DIR = "objects"
CHECKSUM_NBYTES = 32
_SCHEMA = ("CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, kind TEXT NOT NULL, file TEXT NOT NULL, "
           "nbytes INTEGER NOT NULL, sha256 TEXT NOT NULL, meta TEXT NOT NULL)")


class CorruptObjectError(Exception):
    """A stored file is missing, truncated, or does not match its key and checksum."""


class DiskFullError(OSError):
    """A write would exceed the disk budget, or the filesystem has no room for it."""


class StateDirInUseError(RuntimeError):
    """Another process holds this state directory."""


def _checksum(key: str, body: bytes) -> bytes:
    return hashlib.sha256(key.encode() + b"\0" + body).digest()


def _drop_page_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _header(body: bytes) -> dict:
    """The safetensors header's metadata (where a file names its key, kind and meta)."""
    (length,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8:8 + length]).get("__metadata__", {})


def try_lock_file(path: Path) -> IO | None:
    """The file at `path` (created if missing), open and locked by this open file (flock, held
    until it is closed or the process ends); None when another holder has it locked."""
    lock_file = open(path, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        return None
    return lock_file


def state_dir_held(root: Path) -> bool:
    """Whether a live process holds the state directory `root` (the lock a DiskStore takes)."""
    root.mkdir(parents=True, exist_ok=True)
    lock_file = try_lock_file(root / LOCK_FILE)
    if lock_file is None:
        return True
    lock_file.close()
    return False


def _parse_file(data: bytes) -> tuple[str, str, dict, dict]:
    """(key, kind, meta, identity) of a file's bytes whose checksum matches the key its header
    names; ValueError if they are not such a file."""
    body, trailer = data[:-CHECKSUM_NBYTES], data[-CHECKSUM_NBYTES:]
    try:
        header = _header(body)
        key, kind = header["key"], header["kind"]
        meta, identity = json.loads(header["meta"]), json.loads(header["identity"])
    except (ValueError, KeyError, struct.error) as exc:
        raise ValueError(f"not an object file: {exc}") from exc
    if len(data) <= CHECKSUM_NBYTES or trailer != _checksum(key, body):
        raise ValueError(f"{key}: checksum mismatch (the file is corrupted or truncated)")
    return key, kind, meta, identity


class DiskStore:
    def __init__(self, root: Path, budget_nbytes: int, identity: dict | None = None,
                 page_cache: bool = False) -> None:
        """`identity` (model, page size, KV shape, ...) is stored with every object; objects
        written under another identity are never served (see `entries`)."""
        self.identity = json.loads(json.dumps(identity or {}))
        self.root = Path(root)
        self.objects_dir = self.root / OBJECTS_DIR
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.budget_nbytes = budget_nbytes
        self.page_cache = page_cache
        self._lock = threading.Lock()
        self._lock_file = try_lock_file(self.root / LOCK_FILE)
        if self._lock_file is None:
            raise StateDirInUseError(f"the state directory {self.root} is in use by another process; "
                                     "give each server its own --disk-dir")
        for stale in self.objects_dir.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        self.db = self._open_index()
        self.used_nbytes = self.db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM objects").fetchone()[0]

    # --- the index ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.root / INDEX_FILE), check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_SCHEMA)
        db.execute("SELECT key, kind, file, nbytes, sha256, meta FROM objects LIMIT 1").fetchall()
        db.execute("PRAGMA quick_check").fetchall()
        db.commit()
        return db

    def _open_index(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.root / f"{INDEX_FILE}.corrupt-{int(time.time())}"
            logger.warning("the disk index %s is unreadable (%s); moved to %s, rebuilding it from the files",
                           self.root / INDEX_FILE, exc, aside.name)
            for suffix in ("", "-wal", "-shm"):
                path = self.root / (INDEX_FILE + suffix)
                if path.exists():
                    os.replace(path, str(aside) + suffix)
            db = self._connect()
            self._rebuild(db)
            return db

    def _rebuild(self, db: sqlite3.Connection) -> None:
        """Index every file whose header names its key and whose name matches that key."""
        found = 0
        for path in sorted(self.objects_dir.glob("*.safetensors")):
            try:
                data = path.read_bytes()
                key, kind, meta, identity = _parse_file(data)
                if path.name != self._file(key).name:
                    raise ValueError("its name does not match its key")
                row_meta = {**meta, "identity": identity}
            except (OSError, ValueError) as exc:
                logger.warning("disk file %s is not usable (%s); removed", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?)",
                       (key, kind, path.name, len(data), data[-CHECKSUM_NBYTES:].hex(), json.dumps(row_meta)))
            found += 1
        db.commit()
        logger.warning("rebuilt the disk index: %d objects", found)

    def _file(self, key: str) -> Path:
        return self.objects_dir / (hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    # --- objects -----------------------------------------------------------------------------
    def encode(self, key: str, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
        """The bytes of the file for an object (body and checksum trailer)."""
        body = save_bytes({k: v.contiguous().cpu() for k, v in tensors.items()},
                          metadata={"key": key, "kind": kind, "meta": json.dumps(meta),
                                    "identity": json.dumps(self.identity)})
        return body + _checksum(key, body)

    def write(self, key: str, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> int:
        """Store the tensors durably; return the bytes written. DiskFullError if over the budget
        or the filesystem is full (nothing is left behind)."""
        return self.store_encoded(key, kind, self.encode(key, kind, tensors, meta), meta)

    def verify_encoded(self, data: bytes) -> tuple[str, str, dict]:
        """(key, kind, meta) of a file made by another store's `encode` (an object moving between
        engines). CorruptObjectError if it does not verify or was written under another identity
        (another model, page size or dtype)."""
        try:
            key, kind, meta, identity = _parse_file(data)
        except ValueError as exc:
            raise CorruptObjectError(str(exc)) from exc
        if identity != self.identity:
            raise CorruptObjectError(f"{key}: written under {identity}, this store holds {self.identity}")
        return key, kind, meta

    @staticmethod
    def decode(data: bytes) -> dict[str, torch.Tensor]:
        """The tensors of a file's bytes (verified by the caller)."""
        try:
            return load_bytes(data[:-CHECKSUM_NBYTES])
        except Exception as exc:  # safetensors raises its own kinds for a malformed body
            raise CorruptObjectError(f"unreadable object file ({exc})") from exc

    def store_encoded(self, key: str, kind: str, data: bytes, meta: dict) -> int:
        """Store an encoded file (`encode`, or one `verify_encoded` accepted) durably; return the
        bytes written; DiskFullError as for `write`."""
        with self._lock:
            old = self.db.execute("SELECT nbytes FROM objects WHERE key = ?", (key,)).fetchone()
            growth = len(data) - (old[0] if old else 0)
            if self.used_nbytes + growth > self.budget_nbytes:
                raise DiskFullError(errno.ENOSPC, f"disk budget of {self.budget_nbytes} bytes is full")
            self.used_nbytes += growth  # claimed now, so concurrent writes cannot overrun the budget
        path = self._file(key)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")  # two threads may write one key
        try:
            self._write_file(tmp, data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self.used_nbytes -= growth
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(exc.errno, f"no room on disk for {key}: {exc}") from exc
            raise
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?)",
                            (key, kind, path.name, len(data), data[-CHECKSUM_NBYTES:].hex(),
                             json.dumps({**meta, "identity": self.identity})))
            self.db.commit()
        return len(data)

    def _write_file(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if not self.page_cache:
                _drop_page_cache(f.fileno())

    def read(self, key: str) -> dict[str, torch.Tensor]:
        """The stored tensors; CorruptObjectError if missing, truncated, swapped or corrupted."""
        try:
            return self.decode(self.encoded(key))
        except CorruptObjectError as exc:
            raise CorruptObjectError(f"{key}: {exc}") from exc

    def encoded(self, key: str) -> bytes:
        """The object's verified file (body and checksum trailer), as `encode` made it."""
        with self._lock:
            row = self.db.execute("SELECT file, sha256 FROM objects WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise CorruptObjectError(f"{key}: not in the index")
        try:
            with open(self.objects_dir / row[0], "rb") as f:
                data = f.read()
                if not self.page_cache:
                    _drop_page_cache(f.fileno())
        except OSError as exc:
            raise CorruptObjectError(f"{key}: {exc}") from exc
        body, trailer = data[:-CHECKSUM_NBYTES], data[-CHECKSUM_NBYTES:]
        if len(data) <= CHECKSUM_NBYTES or trailer != _checksum(key, body) or trailer.hex() != row[1]:
            raise CorruptObjectError(f"{key}: checksum mismatch (the file is corrupted, truncated or another's)")
        return data

    def set_meta(self, key: str, meta: dict) -> None:
        """Replace the indexed meta of `key` (its file is unchanged): a restart reads the index."""
        with self._lock:
            self.db.execute("UPDATE objects SET meta = ? WHERE key = ?",
                            (json.dumps({**meta, "identity": self.identity}), key))
            self.db.commit()

    def delete(self, key: str) -> None:
        with self._lock:
            row = self.db.execute("SELECT file, nbytes FROM objects WHERE key = ?", (key,)).fetchone()
            if row is None:
                return
            self.db.execute("DELETE FROM objects WHERE key = ?", (key,))
            self.db.commit()
            self.used_nbytes -= row[1]
        (self.objects_dir / row[0]).unlink(missing_ok=True)

    def entries(self, kind: str) -> list[tuple[str, int, dict]]:
        """(key, nbytes, meta) of every stored object of `kind` written under this identity.
        Objects of another identity (another model, page size, dtype or quantization: their KV
        would be wrong here), with a warning, rows whose meta cannot be read and rows whose file is
        gone are deleted."""
        with self._lock:
            rows = self.db.execute("SELECT key, nbytes, meta, file FROM objects WHERE kind = ?", (kind,)).fetchall()
        out, foreign = [], 0
        for key, nbytes, raw, file in rows:
            try:
                meta = json.loads(raw)
            except (TypeError, ValueError):
                meta = None
            readable = isinstance(meta, dict)
            ours = readable and meta.get("identity") == self.identity
            if ours and (self.objects_dir / file).is_file():
                out.append((key, nbytes, meta))
                continue
            if not readable:
                logger.warning("disk index row %s has unreadable meta; removed", key)
            foreign += readable and not ours
            self.delete(key)
        if foreign:
            logger.warning("removed %d %s objects written under another identity (model, page size, dtype or "
                           "quantization) than this engine's %s", foreign, kind, self.identity)
        return out

    def contains(self, key: str) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM objects WHERE key = ?", (key,)).fetchone() is not None

    def path_of(self, key: str) -> Path | None:
        with self._lock:
            row = self.db.execute("SELECT file FROM objects WHERE key = ?", (key,)).fetchone()
        return None if row is None else self.objects_dir / row[0]

    def close(self) -> None:
        with self._lock:
            self.db.close()
        self._lock_file.close()  # closing the descriptor releases the lock
