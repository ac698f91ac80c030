"""SQLite plumbing the claims and window stores share: one connection's settings, the `done`
table (the claims store's done marks, which the window store's `overflow` writes too), adding
the columns an older file lacks, and closing a store (its background maintenance, a last
checkpoint, both connections)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)

# One row per key done, until `expires_at` (wall clock). `token`: the claim that completed it
# while holding it, so its retry is told from a takeover; NULL when it was not the holder, or
# the key was marked done by a rate route's overflow. Files from before fencing lack `token`.
DONE_SCHEMA = """
CREATE TABLE IF NOT EXISTS done (
    key BLOB PRIMARY KEY,
    expires_at REAL NOT NULL,
    token INTEGER
) WITHOUT ROWID
"""
DONE_COLUMNS = {"done": {"token": "INTEGER"}}


def connect(path: str, cache_kib: int) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # Bounded page cache: the table gains a row per event for the retention, and SQLite's
    # default 2 MiB per connection would otherwise show up as memory growth. Misses read from
    # the OS cache.
    db.execute(f"PRAGMA cache_size=-{cache_kib}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    db.execute("PRAGMA busy_timeout=5000")  # other processes, and the maintenance connection
    db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run in the worker thread instead
    return db


def done_key(key: str) -> bytes:
    """A claims key as the `done` table stores it."""
    # 16 bytes of SHA-256 name a key as surely as the key itself, and keep the index small:
    # writes measured a third faster than with the full keys (JSON arrays of object names).
    return hashlib.sha256(key.encode()).digest()[:16]


def mark_done(db: sqlite3.Connection, keys: Iterable[str], expires_at: float) -> None:
    """Inside the caller's transaction: `keys` done until `expires_at`, completed by no holder
    (a claim of them answers DONE, and a holder's `complete` answers False)."""
    db.executemany(
        "INSERT OR REPLACE INTO done (key, expires_at, token) VALUES (?, ?, NULL)",
        [(done_key(key), expires_at) for key in keys],
    )


def add_columns(db: sqlite3.Connection, tables: Mapping[str, Mapping[str, str]]) -> None:
    """Bring a file created by an earlier version up to date: add each `{table: {column:
    type}}` its table lacks (`CREATE TABLE IF NOT EXISTS` adds no column to a table that
    exists). In one IMMEDIATE transaction, so two processes opening one old file add each
    column once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for table, columns in tables.items():
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for column, kind in columns.items():
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        db.execute("COMMIT")
    except sqlite3.Error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def reason(error: OSError | sqlite3.Error) -> str:
    return (error.strerror or str(error)) if isinstance(error, OSError) else str(error)


async def close(
    db: sqlite3.Connection,
    maintenance_db: sqlite3.Connection | None,
    maintenance: asyncio.Future[None] | None,
) -> None:
    """Shut a store down: let its background maintenance finish, then checkpoint the WAL into
    the database file (so a restart reads one file) and close both connections."""
    if maintenance is not None:
        await maintenance
    if maintenance_db is not None:
        maintenance_db.close()
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as error:
        log.warning("sqlite checkpoint at shutdown failed", extra={"reason": str(error)})
    db.close()
