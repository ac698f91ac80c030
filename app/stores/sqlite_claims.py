"""SQLite store: embedded, survives restarts, for one service process (Redis is the store that
several instances share).

Done marks are written to SQLite, where they outlive the process for the retention. Claims of
sends in flight are kept in the process's memory (app.stores.memory.Leases, fenced by tokens):
they mean nothing once the process is gone, so a crash releases them at once instead of making
redeliveries wait out a lease, and a claim costs a read rather than a write. Each statement runs
inline on one connection in WAL mode and takes tens of microseconds, cheaper than a hop through a
thread pool (measured: a thread-pool variant spent more than half its CPU in the pool's threads).
A `complete` is one statement: it writes the done mark unless a live one exists, and only a retry
reads the existing mark's token.

What can take milliseconds runs in a worker thread on a second connection, never on the event
loop: WAL checkpoints (SQLite's automatic ones fsync inside whichever write crosses the
threshold, and stalled that write 15-20 ms here) and the purge of expired records. The purge
finds expired keys as a reader, which never blocks the writer in WAL mode, then deletes them by
primary key in one short transaction.

The `done` table (app.stores.sqlite) is shared with the digest store, whose rate overflow marks
keys done in the same transaction as it joins the digest. A file written before fencing gains
the table's `token` column when it is opened; its done marks stay done.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

from app.stores.base import Claim, Lease, StoreUnavailable
from app.stores.memory import Leases
from app.stores.sqlite import (
    DONE_COLUMNS,
    DONE_SCHEMA,
    add_columns,
    close,
    connect,
    done_key,
    reason,
)
from app.stores.windows import RETENTION_SECONDS

log = logging.getLogger(__name__)

MAINTAIN_EVERY = 500  # done marks written between background checkpoints and purges
PURGE_BATCH = 5000


class SqliteStore:
    @classmethod
    def open(cls, path: str, retention_seconds: float = RETENTION_SECONDS) -> SqliteStore:
        """The store, or StoreUnavailable (answered 503) if the database cannot be opened."""
        try:
            return cls(path, retention_seconds)
        except (OSError, sqlite3.Error) as error:
            raise StoreUnavailable(f"sqlite: {path}: {reason(error)}") from error

    def __init__(self, path: str, retention_seconds: float = RETENTION_SECONDS) -> None:
        self.path = path
        self.retention_seconds = retention_seconds
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = connect(path, cache_kib=1024)
        self._db.execute(DONE_SCHEMA)
        add_columns(self._db, DONE_COLUMNS)
        self._claims = Leases()
        self._maintenance_db: sqlite3.Connection | None = None
        self._maintenance: asyncio.Future[None] | None = None
        self._writes = 0

    async def claim(self, key: str, lease_seconds: float) -> Lease | Claim:
        now = time.time()
        if self._done(key, now):
            return Claim.DONE
        return self._claims.claim(key, now, lease_seconds)

    async def renew(self, key: str, token: int, lease_seconds: float) -> Lease | None:
        # A done mark written by the digest store's overflow leaves this process's lease in
        # place: the table, not the lease, says whether anything is left to send.
        now = time.time()
        if self._done(key, now):
            return None
        return self._claims.renew(key, token, now, lease_seconds)

    async def complete(self, key: str, token: int) -> bool:
        now = time.time()
        held = not self._claims.superseded(key, token)
        digest = done_key(key)
        try:
            # Writes the mark unless a live one exists (an expired one is replaced).
            wrote = self._db.execute(
                "INSERT INTO done (key, expires_at, token) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET"
                " expires_at = excluded.expires_at, token = excluded.token"
                " WHERE done.expires_at <= ?",
                (digest, now + self.retention_seconds, token if held else None, now),
            ).rowcount
            if not wrote:  # done already: a retry of this holder's own mark, or another's
                row = self._db.execute("SELECT token FROM done WHERE key = ?", (digest,)).fetchone()
                return row is not None and bool(row[0] == token)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error
        self._claims.drop(key)
        self._wrote()
        return held

    async def release(self, key: str, token: int) -> None:
        self._claims.drop(key, token)

    async def ping(self) -> None:
        try:
            self._db.execute("SELECT 1 FROM done LIMIT 1").fetchall()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error

    def _done(self, key: str, now: float) -> bool:
        try:
            row = self._db.execute(
                "SELECT 1 FROM done WHERE key = ? AND expires_at > ?", (done_key(key), now)
            ).fetchone()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error
        return row is not None

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
