"""Digest windows in SQLite: embedded, survives restarts and SIGKILL, for one service process
(Redis is the store several instances share).

Every `add`, `overflow`, `take`, `claim` and `complete` is one IMMEDIATE transaction, committed
before it returns, and `renew` and `release` one statement: an event answered 2xx is in the
file (WAL, synchronous=NORMAL: durable across process crashes, as the idempotency store).
Transactions are also what makes two processes on one file claim a window once. Unlike the
idempotency store's in-memory claims, a window's claim is written: the window itself must
outlive the process, and a crashed sender's lease runs out and makes it due again.

Tables: `digest_routes` (the open window per route), `digest_windows` (state, times, the token
of its latest claim and the one that completed it while holding it, the summary as
DigestSummary JSON without its items, and the digest of its leading change if it had one),
`digest_items` (the first `max_items` items, one row each, so an add writes a row instead of
rewriting the list), `digest_changes` (16-byte digests of the change keys that joined, for
deduplication until the retention ends), `digest_rates` (each rate route's current period: one
row per route) and `digest_takers` (the change digests that took an email, with the end of the
period they took it in: a row of an earlier period no longer counts, and is purged once its
period is over, so a new period starts without deleting anything inline). `overflow` also writes
the claims store's `done` table (app.stores.sqlite), in the same transaction as the join.
A file written by an earlier version gains the columns it lacks when it is opened; its `owner`
column is left unused.
Purging expired rows and WAL checkpoints run in a worker thread on a second connection, as in
app.stores.sqlite_claims.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.digests.window import DigestItem, DigestSummary
from app.stores.base import Claim, Lease, StoreUnavailable, next_token
from app.stores.sqlite import (
    DONE_COLUMNS,
    DONE_SCHEMA,
    add_columns,
    close,
    connect,
    mark_done,
    reason,
)
from app.stores.windows import (
    RETENTION_SECONDS,
    Added,
    DigestWindow,
    Taken,
    UnknownWindow,
    WindowInfo,
    WindowState,
    change_digest,
    check_rate,
    leads,
    next_opened_ms,
    window_id,
)

log = logging.getLogger(__name__)

MAINTAIN_EVERY = 500  # writes between background purges and checkpoints
SUMMARY_CACHE = 64  # open windows whose summary `add` keeps in memory (one per busy route)
PURGE_BATCH = 5000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS digest_routes (
    route TEXT PRIMARY KEY,
    open_window TEXT,
    last_opened_ms INTEGER NOT NULL,
    last_closed_at REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS digest_windows (
    id TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    opened_at REAL NOT NULL,
    due_at REAL NOT NULL,
    state TEXT NOT NULL,
    ready_at REAL NOT NULL,  -- when `due` lists it: due_at, lease end or release time
    expires_at REAL,  -- done windows: when they are purged
    events INTEGER NOT NULL,
    summary TEXT NOT NULL,
    leading_key BLOB,  -- digest_changes.key of its leading change
    token INTEGER,  -- its latest claim's
    done_by INTEGER  -- the token that completed it while holding it
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS digest_windows_ready ON digest_windows (ready_at)
    WHERE state != 'done';
CREATE TABLE IF NOT EXISTS digest_items (
    window TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (window, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS digest_changes (
    key BLOB PRIMARY KEY,
    window TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS digest_rates (
    route TEXT PRIMARY KEY,
    period_end REAL NOT NULL,
    used INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS digest_takers (
    key BLOB PRIMARY KEY,  -- change_digest(route, change key): the route is in it
    period_end REAL NOT NULL  -- digest_rates.period_end of the period it took an email in
) WITHOUT ROWID;
"""
# What files of earlier versions lack (`CREATE TABLE IF NOT EXISTS` adds tables, not columns).
_COLUMNS = {
    **DONE_COLUMNS,
    "digest_windows": {"leading_key": "BLOB", "token": "INTEGER", "done_by": "INTEGER"},
}


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class SqliteDigestStore:
    @classmethod
    def open(cls, path: str, retention_seconds: float = RETENTION_SECONDS) -> SqliteDigestStore:
        """The store, or StoreUnavailable if the database cannot be opened."""
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
        self._db.execute(DONE_SCHEMA)  # `overflow` marks keys done in the claims store's table
        self._db.executescript(_SCHEMA)
        add_columns(self._db, _COLUMNS)
        self._maintenance_db: sqlite3.Connection | None = None
        self._maintenance: asyncio.Future[None] | None = None
        self._writes = 0
        self._summaries: dict[str, DigestSummary] = {}

    async def add(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None = None,
    ) -> Added:
        return self._add(route, window_seconds, max_items, item, now, leading_after, ())

    async def overflow(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        done_keys: Sequence[str],
    ) -> Added:
        return self._add(route, window_seconds, max_items, item, now, None, done_keys)

    def _add(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None,
        done_keys: Sequence[str],
    ) -> Added:
        """One transaction: the event joins the route's window, and `done_keys` are marked
        done in the claims store's table (by the wall clock, as that store reads them)."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            added, summary = self._enter(route, window_seconds, max_items, item, now, leading_after)
            if done_keys:
                mark_done(db, done_keys, time.time() + self.retention_seconds)
            db.execute("COMMIT")
        except (sqlite3.Error, ValueError) as error:
            self._summaries.clear()  # one may have been changed by an add that did not commit
            self._rollback()
            raise StoreUnavailable(f"sqlite: {error}") from error
        if summary is not None:
            if len(self._summaries) >= SUMMARY_CACHE:
                self._summaries.clear()
            self._summaries[added.window_id] = summary
        if summary is not None or done_keys:
            self._wrote(now)
        return added

    def _enter(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None,
    ) -> tuple[Added, DigestSummary | None]:
        """Inside `_add`'s transaction: what `add` does with the event, and the summary of the
        window it joined (None when it was a duplicate and nothing was written)."""
        key = change_digest(route, item.change_key)
        db = self._db
        seen = db.execute(
            "SELECT c.window, w.leading_key = c.key FROM digest_changes AS c"
            " LEFT JOIN digest_windows AS w ON w.id = c.window"
            " WHERE c.key = ? AND c.expires_at > ?",
            (key, now),
        ).fetchone()
        row = db.execute(
            "SELECT open_window, last_opened_ms, last_closed_at FROM digest_routes WHERE route = ?",
            (route,),
        ).fetchone()
        open_window, last_opened_ms, closed_at = row if row else (None, None, None)
        if seen is not None:
            return Added(seen[0], True, False, closed_at, bool(seen[1])), None
        leading = False
        if open_window is None:
            opened_ms = next_opened_ms(now, last_opened_ms)
            open_window = window_id(route, opened_ms)
            summary = DigestSummary.empty(max_items)
            due_at = opened_ms / 1000 + window_seconds
            leading = leads(leading_after, closed_at, now)
            db.execute(
                "INSERT INTO digest_windows (id, route, opened_at, due_at, state, ready_at,"
                " events, summary, leading_key) VALUES (?, ?, ?, ?, 'open', ?, 0, ?, ?)",
                (
                    open_window,
                    route,
                    opened_ms / 1000,
                    due_at,
                    due_at,
                    _dumps(summary.to_json()),
                    key if leading else None,
                ),
            )
            db.execute(
                "INSERT INTO digest_routes (route, open_window, last_opened_ms)"
                " VALUES (?, ?, ?) ON CONFLICT (route) DO UPDATE SET"
                " open_window = excluded.open_window, last_opened_ms = excluded.last_opened_ms",
                (route, open_window, opened_ms),
            )
            opened = True
        else:
            summary = self._summary(open_window)
            opened = False
        if not leading:  # a leading change is sent alone, not in the summary
            self._join(open_window, summary, item)
        db.execute(
            "INSERT OR REPLACE INTO digest_changes (key, window, expires_at) VALUES (?, ?, ?)",
            (key, open_window, now + self.retention_seconds),
        )
        return Added(open_window, False, opened, closed_at, leading), summary

    def _summary(self, window: str) -> DigestSummary:
        """Inside `add`'s transaction: the open window's summary (without its items). The one
        this process last wrote is reused while the row's event count still equals its count:
        counts only grow, so an equal count means no other process has added since, and a
        burst into one window does not parse the summary's JSON back on every event."""
        (events,) = self._db.execute(
            "SELECT events FROM digest_windows WHERE id = ?", (window,)
        ).fetchone()
        cached = self._summaries.get(window)
        if cached is not None and cached.count == events:
            return cached
        (text,) = self._db.execute(
            "SELECT summary FROM digest_windows WHERE id = ?", (window,)
        ).fetchone()
        return DigestSummary.from_json(json.loads(text))

    def _join(self, window: str, summary: DigestSummary, item: DigestItem) -> None:
        """Inside `add`'s transaction: the item joins the window's summary (and its listed items
        while there are fewer than `max_items`)."""
        listed = summary.count < summary.max_items
        summary.add(item)
        summary.items = []  # the items live in digest_items
        self._db.execute(
            "UPDATE digest_windows SET summary = ?, events = ? WHERE id = ?",
            (_dumps(summary.to_json()), summary.count, window),
        )
        if listed:
            self._db.execute(
                "INSERT INTO digest_items (window, seq, item) VALUES (?, ?, ?)",
                (window, summary.count - 1, _dumps(item.to_json())),
            )

    async def take(
        self, route: str, change_key: str, limit: int, per_seconds: float, now: float
    ) -> Taken:
        check_rate(limit, per_seconds)
        taker = change_digest(route, change_key)
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT r.period_end, r.used, t.period_end = r.period_end"
                " FROM digest_rates AS r LEFT JOIN digest_takers AS t ON t.key = ?"
                " WHERE r.route = ?",
                (taker, route),
            ).fetchone()
            if row is None or now >= row[0]:
                period_end, used = now + per_seconds, 1
            elif row[2]:  # this change took one of this period before
                db.execute("COMMIT")
                return Taken(True, row[0], row[1], again=True)
            elif row[1] < limit:
                period_end, used = row[0], row[1] + 1
            else:
                db.execute("COMMIT")
                return Taken(False, row[0], row[1])
            db.execute(
                "INSERT INTO digest_rates (route, period_end, used) VALUES (?, ?, ?)"
                " ON CONFLICT (route) DO UPDATE SET"
                " period_end = excluded.period_end, used = excluded.used",
                (route, period_end, used),
            )
            db.execute(
                "INSERT OR REPLACE INTO digest_takers (key, period_end) VALUES (?, ?)",
                (taker, period_end),
            )
            db.execute("COMMIT")
        except sqlite3.Error as error:
            self._rollback()
            raise StoreUnavailable(f"sqlite: {error}") from error
        self._wrote(now)
        return Taken(True, period_end, used)

    async def due(self, now: float, limit: int) -> list[str]:
        rows = self._read(
            "SELECT id FROM digest_windows WHERE state != 'done' AND ready_at <= ?"
            " ORDER BY ready_at LIMIT ?",
            (now, limit),
        )
        return [window for (window,) in rows]

    async def claim(self, window_id: str, lease_seconds: float, now: float) -> Lease | Claim:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT route, state, token, ready_at FROM digest_windows WHERE id = ?",
                (window_id,),
            ).fetchone()
            if row is None or row[1] == WindowState.DONE:
                db.execute("COMMIT")
                return Claim.DONE
            route, state, previous, ready_at = row
            if state == WindowState.SENDING and ready_at > now:
                db.execute("COMMIT")
                return Claim.IN_FLIGHT
            if state == WindowState.OPEN:
                self._close(route, window_id, now)
            lease = Lease(next_token(previous, now), now + lease_seconds)
            db.execute(
                "UPDATE digest_windows SET state = 'sending', token = ?, ready_at = ? WHERE id = ?",
                (lease.token, lease.expires, window_id),
            )
            db.execute("COMMIT")
        except sqlite3.Error as error:
            self._rollback()
            raise StoreUnavailable(f"sqlite: {error}") from error
        self._wrote(now)
        return lease

    async def renew(
        self, window_id: str, token: int, lease_seconds: float, now: float
    ) -> Lease | None:
        lease = Lease(token, now + lease_seconds)
        try:
            renewed = self._db.execute(
                "UPDATE digest_windows SET ready_at = ? WHERE id = ? AND state = 'sending'"
                " AND token = ? AND ready_at > ?",
                (lease.expires, window_id, token, now),
            ).rowcount
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error
        if not renewed:
            return None
        self._wrote(now)
        return lease

    async def read(self, window_id: str) -> DigestWindow:
        rows = self._read(
            "SELECT route, opened_at, due_at, state, events, summary FROM digest_windows"
            " WHERE id = ?",
            (window_id,),
        )
        if not rows:
            raise UnknownWindow(window_id)
        route, opened_at, due_at, state, events, text = rows[0]
        items = self._read(
            "SELECT item FROM digest_items WHERE window = ? ORDER BY seq", (window_id,)
        )
        try:
            summary = DigestSummary.from_json(json.loads(text))
            summary.items = [DigestItem.from_json(json.loads(item)) for (item,) in items]
        except ValueError as error:
            raise StoreUnavailable(f"sqlite: window {window_id!r}: {error}") from error
        info = WindowInfo(window_id, route, opened_at, due_at, events, WindowState(state))
        return DigestWindow(info, summary)

    async def complete(self, window_id: str, token: int, now: float) -> bool:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT route, state, token, done_by FROM digest_windows WHERE id = ?",
                (window_id,),
            ).fetchone()
            if row is None or row[1] == WindowState.DONE:
                db.execute("COMMIT")
                # A retry of this sender's own completion, or another's (or purged).
                return row is not None and bool(row[3] == token)
            route, state, holder, _ = row
            if state == WindowState.OPEN:
                self._close(route, window_id, now)
            held = bool(holder == token)
            db.execute(
                "UPDATE digest_windows SET state = 'done', done_by = ?, expires_at = ?"
                " WHERE id = ?",
                (token if held else None, now + self.retention_seconds, window_id),
            )
            db.execute("COMMIT")
        except sqlite3.Error as error:
            self._rollback()
            raise StoreUnavailable(f"sqlite: {error}") from error
        self._wrote(now)
        return held

    async def release(self, window_id: str, token: int, now: float) -> None:
        try:
            self._db.execute(
                "UPDATE digest_windows SET state = 'released', ready_at = ?"
                " WHERE id = ? AND state = 'sending' AND token = ?",
                (now, window_id, token),
            )
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error
        self._wrote(now)

    async def pending(self, now: float) -> list[WindowInfo]:
        rows = self._read(
            "SELECT id, route, opened_at, due_at, events, state FROM digest_windows"
            " WHERE state != 'done' ORDER BY due_at, id",
            (),
        )
        return [
            WindowInfo(wid, route, opened_at, due_at, events, WindowState(state))
            for wid, route, opened_at, due_at, events, state in rows
        ]

    def _close(self, route: str, window_id: str, now: float) -> None:
        """Inside a transaction: the route's next event opens a new window."""
        self._db.execute(
            "UPDATE digest_routes SET last_closed_at = ?,"
            " open_window = CASE WHEN open_window = ? THEN NULL ELSE open_window END"
            " WHERE route = ?",
            (now, window_id, route),
        )

    def _read(self, statement: str, parameters: tuple[object, ...]) -> list[Any]:
        try:
            return self._db.execute(statement, parameters).fetchall()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("sqlite rollback failed", extra={"path": self.path})

    def _wrote(self, now: float) -> None:
        self._writes += 1
        idle = self._maintenance is None or self._maintenance.done()
        if self._writes % MAINTAIN_EVERY == 0 and idle:
            loop = asyncio.get_running_loop()
            self._maintenance = loop.run_in_executor(None, self.maintain, now)

    def maintain(self, now: float) -> None:
        """Purge expired change keys, takers of periods that are over and done windows, then
        checkpoint the WAL (in a worker thread)."""
        try:
            if self._maintenance_db is None:
                self._maintenance_db = connect(self.path, cache_kib=128)
            db = self._maintenance_db
            changes = db.execute(
                "SELECT key FROM digest_changes WHERE expires_at <= ? LIMIT ?", (now, PURGE_BATCH)
            ).fetchall()
            takers = db.execute(
                "SELECT key FROM digest_takers WHERE period_end <= ? LIMIT ?", (now, PURGE_BATCH)
            ).fetchall()
            windows = db.execute(
                "SELECT id FROM digest_windows WHERE state = 'done' AND expires_at <= ? LIMIT ?",
                (now, PURGE_BATCH),
            ).fetchall()
            if changes or takers or windows:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "DELETE FROM digest_changes WHERE key = ? AND expires_at <= ?",
                    [(key, now) for (key,) in changes],
                )
                db.executemany(
                    "DELETE FROM digest_takers WHERE key = ? AND period_end <= ?",
                    [(key, now) for (key,) in takers],
                )
                db.executemany("DELETE FROM digest_items WHERE window = ?", windows)
                db.executemany("DELETE FROM digest_windows WHERE id = ?", windows)
                db.execute("COMMIT")
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as error:
            # Nothing is lost: the next round tries again, and the WAL only grows meanwhile.
            if self._maintenance_db is not None and self._maintenance_db.in_transaction:
                self._maintenance_db.execute("ROLLBACK")
            log.warning("sqlite digest maintenance failed", extra={"reason": str(error)})

    async def aclose(self) -> None:
        await close(self._db, self._maintenance_db, self._maintenance)
