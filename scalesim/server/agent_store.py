"""The agent registry on disk: one SQLite row per registered agent, restored after a restart.
A registry file that cannot be read is moved aside with a warning and a new one started: the
server always starts (the agents' state on the disk tier is kept by the memory layer)."""

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REGISTRY_FILE = "agents.sqlite"
_SCHEMA = ("CREATE TABLE IF NOT EXISTS agents (agent_id TEXT PRIMARY KEY, adapter_path TEXT, model_path TEXT, "
           "prefix TEXT, created_s REAL NOT NULL, adapter TEXT, model TEXT)")
logger = logging.getLogger(__name__)


@dataclass
class AgentRecord:
    agent_id: str
    adapter_path: str | None = None
    model_path: str | None = None
    prefix: str | None = None
    created_s: float = 0.0
    adapter: str | None = None  # an adapter or private model loaded at start-up, by name
    model: str | None = None


class AgentStore:
    """Agents by id. With `state_dir` None the registry lives in memory and dies with the process."""

    def __init__(self, state_dir: Path | None) -> None:
        if state_dir is not None:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.path = str(Path(state_dir) / REGISTRY_FILE) if state_dir is not None else ":memory:"
        self._lock = threading.Lock()
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            aside = f"{self.path}.corrupt-{int(time.time())}"
            logger.warning("the agent registry %s is unreadable (%s); moved to %s, starting an empty one",
                           self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY")
        db.execute(_SCHEMA)
        db.execute("SELECT * FROM agents LIMIT 1").fetchall()
        db.execute("PRAGMA quick_check").fetchall()
        return db

    def put(self, record: AgentRecord) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO agents VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (record.agent_id, record.adapter_path, record.model_path, record.prefix,
                              record.created_s or time.time(), record.adapter, record.model))

    def get(self, agent_id: str) -> AgentRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        return AgentRecord(*row) if row else None

    def delete(self, agent_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM agents WHERE agent_id = ?", (agent_id,)).rowcount > 0

    def all(self) -> list[AgentRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM agents ORDER BY created_s").fetchall()
        records = []
        for row in rows:
            if all(v is None or isinstance(v, str) for i, v in enumerate(row) if i != 4) and isinstance(row[4], (int, float)):
                records.append(AgentRecord(*row))
            else:
                logger.warning("agent registry row %r is unreadable; skipped", row[0])
        return records

    def close(self) -> None:
        with self._lock:
            self._db.close()
