"""The SQLite claims store's done marks: the token that completed a key lives in the file, so
a retry after a restart is told from a takeover, and an expired mark gives way to the next
holder's."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from app.stores.base import Claim, Lease
from app.stores.sqlite import done_key
from app.stores.sqlite_claims import SqliteStore


def leased(answer: Lease | Claim) -> Lease:
    assert isinstance(answer, Lease), answer
    return answer


def _done_row(path: Path, key: str) -> tuple[float, int | None] | None:
    db = sqlite3.connect(path)
    try:
        row = db.execute(
            "SELECT expires_at, token FROM done WHERE key = ?", (done_key(key),)
        ).fetchone()
        return None if row is None else (row[0], row[1])
    finally:
        db.close()


def test_a_retry_of_a_completion_after_a_restart_is_the_holders(tmp_path: Path) -> None:
    path = tmp_path / "notifier.db"

    async def scenario() -> None:
        store = SqliteStore.open(str(path))
        lease = leased(await store.claim("k", 60))
        assert await store.complete("k", lease.token) is True
        row = _done_row(path, "k")
        assert row is not None
        assert row[1] == lease.token
        await store.aclose()
        restarted = SqliteStore.open(str(path))  # its leases start empty
        assert await restarted.complete("k", lease.token) is True
        assert await restarted.complete("k", lease.token + 1) is False
        await restarted.aclose()

    asyncio.run(scenario())


def test_an_expired_done_mark_is_replaced_by_the_next_holders(tmp_path: Path) -> None:
    path = tmp_path / "notifier.db"

    async def scenario() -> None:
        store = SqliteStore(str(path), retention_seconds=0.2)
        first = leased(await store.claim("k", 60))
        assert await store.complete("k", first.token) is True
        await asyncio.sleep(0.35)
        second = leased(await store.claim("k", 60))
        assert second.token > first.token
        assert await store.complete("k", second.token) is True
        row = _done_row(path, "k")
        assert row is not None
        assert row[1] == second.token
        assert await store.complete("k", first.token) is False  # the live mark is second's
        await store.aclose()

    asyncio.run(scenario())


def test_a_takeover_completes_with_no_token_and_answers_false(tmp_path: Path) -> None:
    path = tmp_path / "notifier.db"

    async def scenario() -> None:
        store = SqliteStore.open(str(path))
        stale = leased(await store.claim("k", 0.1))
        await asyncio.sleep(0.2)
        current = leased(await store.claim("k", 60))
        assert await store.complete("k", stale.token) is False
        row = _done_row(path, "k")
        assert row is not None
        assert row[1] is None  # nobody completed it while holding it
        assert await store.complete("k", current.token) is False
        assert await store.complete("k", stale.token) is False  # its retry, too
        await store.aclose()

    asyncio.run(scenario())
