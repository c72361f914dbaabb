"""The agent registry on disk: one SQLite row per registered agent, restored after a restart."""

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REGISTRY_FILE = "agents.sqlite"


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
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL" if state_dir is not None else "PRAGMA journal_mode=MEMORY")
        self._db.execute("CREATE TABLE IF NOT EXISTS agents (agent_id TEXT PRIMARY KEY, adapter_path TEXT, "
                         "model_path TEXT, prefix TEXT, created_s REAL NOT NULL, adapter TEXT, model TEXT)")

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
            return [AgentRecord(*row) for row in self._db.execute("SELECT * FROM agents ORDER BY created_s")]

    def close(self) -> None:
        with self._lock:
            self._db.close()
