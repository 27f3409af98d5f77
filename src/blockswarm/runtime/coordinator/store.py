"""The coordinator's state on disk: an embedded SQLite database, so a restarted coordinator loses nothing.

Write-ahead logging without an fsync per write (`synchronous=OFF`): a reservation is one small
row written in microseconds; after a power cut the last writes may be lost, which costs what a
lost heartbeat costs (servers re-register, clients ask again), never a corrupt database. Rows
hold JSON: the coordinator reads them once at start and keeps its working state in memory.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

TABLES = ("meta", "servers", "reservations", "rtts")


def default_state_path(port: int) -> Path:
    """One state file per coordinator port, in the user's cache directory."""
    base = Path(os.environ.get("BLOCKSWARM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME")
                                                        or Path.home() / ".cache") / "blockswarm")
    return base / f"coordinator-{port}.sqlite"


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the coordinator's one thread owns the connection; autocommit: every write is its own transaction
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")
        for table in TABLES:
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def put(self, table: str, key: str, value) -> None:
        self.db.execute(f"INSERT OR REPLACE INTO {table} (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def delete(self, table: str, key: str) -> None:
        self.db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))

    def load(self, table: str) -> dict[str, object]:
        return {key: json.loads(value) for key, value in self.db.execute(f"SELECT key, value FROM {table}")}

    def close(self) -> None:
        self.db.close()
