"""The disk tier: one file per object under a state directory, written atomically (temporary
file, fsync, rename), each with a SHA-256 checksum, all indexed in SQLite so a restarted server
finds what it wrote. A file whose checksum does not match is never served."""

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes


class CorruptObjectError(Exception):
    """A stored file is missing or does not match its checksum."""


class DiskStore:
    def __init__(self, root: Path, budget_nbytes: int, identity: dict | None = None) -> None:
        """`identity` (model, page size, KV shape, ...) is stored with every object; objects
        written under another identity are never served (see `entries`)."""
        self.identity = identity or {}
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.budget_nbytes = budget_nbytes
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(self.root / "index.sqlite"), check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                        "file TEXT NOT NULL, nbytes INTEGER NOT NULL, sha256 TEXT NOT NULL, meta TEXT NOT NULL)")
        self.db.commit()

    @property
    def used_nbytes(self) -> int:
        with self._lock:
            return self.db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM objects").fetchone()[0]

    def _file(self, key: str) -> Path:
        return self.root / "objects" / (hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    def write(self, key: str, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> int:
        """Store the tensors durably; return the bytes written."""
        data = save_bytes({k: v.contiguous().cpu() for k, v in tensors.items()})
        path = self._file(key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?)",
                            (key, kind, path.name, len(data), hashlib.sha256(data).hexdigest(),
                             json.dumps({**meta, "identity": self.identity})))
            self.db.commit()
        return len(data)

    def read(self, key: str) -> dict[str, torch.Tensor]:
        """The stored tensors; CorruptObjectError if missing or failing the checksum."""
        with self._lock:
            row = self.db.execute("SELECT file, sha256 FROM objects WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise CorruptObjectError(f"{key}: not in the index")
        try:
            data = (self.root / "objects" / row[0]).read_bytes()
        except OSError as exc:
            raise CorruptObjectError(f"{key}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != row[1]:
            raise CorruptObjectError(f"{key}: checksum mismatch")
        return load_bytes(data)

    def delete(self, key: str) -> None:
        with self._lock:
            row = self.db.execute("SELECT file FROM objects WHERE key = ?", (key,)).fetchone()
            self.db.execute("DELETE FROM objects WHERE key = ?", (key,))
            self.db.commit()
        if row is not None:
            (self.root / "objects" / row[0]).unlink(missing_ok=True)

    def entries(self, kind: str) -> list[tuple[str, int, dict]]:
        """(key, nbytes, meta) of every stored object of `kind` written under this identity;
        objects of another identity (another model, page size or dtype) are deleted."""
        with self._lock:
            rows = self.db.execute("SELECT key, nbytes, meta FROM objects WHERE kind = ?", (kind,)).fetchall()
        out = []
        for key, nbytes, raw in rows:
            meta = json.loads(raw)
            if meta.get("identity") == json.loads(json.dumps(self.identity)):
                out.append((key, nbytes, meta))
            else:
                self.delete(key)
        return out

    def path_of(self, key: str) -> Path | None:
        with self._lock:
            row = self.db.execute("SELECT file FROM objects WHERE key = ?", (key,)).fetchone()
        return None if row is None else self.root / "objects" / row[0]
