"""SQLite plumbing the claims and window stores share: one connection's settings, and closing a
store (its background maintenance, a last checkpoint, both connections)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

log = logging.getLogger(__name__)


def connect(path: str, cache_kib: int) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # Bounded page cache: the table gains a row per event for 25 h, and SQLite's default 2 MiB
    # per connection would otherwise show up as memory growth. Misses read from the OS cache.
    db.execute(f"PRAGMA cache_size=-{cache_kib}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    db.execute("PRAGMA busy_timeout=5000")  # other processes, and the maintenance connection
    db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run in the worker thread instead
    return db


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
