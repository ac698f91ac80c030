"""SQLite store: embedded, survives restarts, for one service process (Redis is the store that
several instances share).

Done marks are written to SQLite, where they outlive the process for 25 hours. Claims of sends in
flight are kept in the process's memory: they mean nothing once the process is gone, so a crash
releases them at once instead of making redeliveries wait out a lease, and a claim costs a read
rather than a write. Each statement runs inline on one connection in WAL mode and takes tens of
microseconds, cheaper than a hop through a thread pool (measured: a thread-pool variant spent
more than half its CPU in the pool's threads).

What can take milliseconds runs in a worker thread on a second connection, never on the event
loop: WAL checkpoints (SQLite's automatic ones fsync inside whichever write crosses the
threshold, and stalled that write 15-20 ms here) and the purge of expired records. The purge
finds expired keys as a reader, which never blocks the writer in WAL mode, then deletes them by
primary key in one short transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from pathlib import Path

from app.stores.base import Claim, StoreUnavailable
from app.stores.memory import Leases
from app.stores.sqlite import close, connect, reason

log = logging.getLogger(__name__)

MAINTAIN_EVERY = 500  # done marks written between background checkpoints and purges
PURGE_BATCH = 5000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS done (
    key BLOB PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID
"""


def _digest(key: str) -> bytes:
    # 16 bytes of SHA-256 name a key as surely as the key itself, and keep the index small:
    # writes measured a third faster than with the full keys (JSON arrays of object names).
    return hashlib.sha256(key.encode()).digest()[:16]


class SqliteStore:
    @classmethod
    def open(cls, path: str) -> SqliteStore:
        """The store, or StoreUnavailable (answered 503) if the database cannot be opened."""
        try:
            return cls(path)
        except (OSError, sqlite3.Error) as error:
            raise StoreUnavailable(f"sqlite: {path}: {reason(error)}") from error

    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = connect(path, cache_kib=1024)
        self._db.execute(_SCHEMA)
        self._claims = Leases()
        self._maintenance_db: sqlite3.Connection | None = None
        self._maintenance: asyncio.Future[None] | None = None
        self._writes = 0

    async def claim(self, key: str, owner: str, lease_seconds: float) -> Claim:
        now = time.time()
        try:
            row = self._db.execute(
                "SELECT 1 FROM done WHERE key = ? AND expires_at > ?", (_digest(key), now)
            ).fetchone()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error
        if row is not None:
            return Claim.DONE
        return self._claims.claim(key, owner, now, lease_seconds)

    async def complete(self, key: str, owner: str, keep_seconds: float) -> None:
        self._write(
            "INSERT OR REPLACE INTO done (key, expires_at) VALUES (?, ?)",
            (_digest(key), time.time() + keep_seconds),
        )
        self._claims.drop(key)

    async def release(self, key: str, owner: str) -> None:
        self._claims.drop(key, owner)

    async def ping(self) -> None:
        try:
            self._db.execute("SELECT 1 FROM done LIMIT 1").fetchall()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error

    def _write(self, statement: str, parameters: tuple[object, ...]) -> None:
        try:
            self._db.execute(statement, parameters)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error
        self._wrote()

    def _wrote(self) -> None:
        self._writes += 1
        idle = self._maintenance is None or self._maintenance.done()
        if self._writes % MAINTAIN_EVERY == 0 and idle:
            loop = asyncio.get_running_loop()
            self._maintenance = loop.run_in_executor(None, self.maintain, time.time())

    def maintain(self, now: float) -> None:
        """Purge expired records and checkpoint the WAL (in a worker thread)."""
        try:
            if self._maintenance_db is None:
                self._maintenance_db = connect(self.path, cache_kib=128)  # scans, no reuse
            db = self._maintenance_db
            expired = db.execute(
                "SELECT key FROM done WHERE expires_at <= ? LIMIT ?", (now, PURGE_BATCH)
            ).fetchall()
            if expired:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "DELETE FROM done WHERE key = ? AND expires_at <= ?",
                    [(key, now) for (key,) in expired],
                )
                db.execute("COMMIT")
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as error:
            # Nothing is lost: the next round tries again, and the WAL only grows meanwhile.
            if self._maintenance_db is not None and self._maintenance_db.in_transaction:
                self._maintenance_db.execute("ROLLBACK")  # never leave the writer locked out
            log.warning("sqlite maintenance failed", extra={"reason": str(error)})

    async def aclose(self) -> None:
        await close(self._db, self._maintenance_db, self._maintenance)
