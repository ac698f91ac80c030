"""The SQLite digest store's file: an older schema opens and works, the idempotency store shares
it, a SIGKILL keeps rate periods and leading marks, two connections take a period's last email
once. And `open_digest_store`, which picks a backend from the store URL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.digests.window import DigestSummary
from app.stores.base import Claim, StoreUnavailable
from app.stores.factory import open_digest_store
from app.stores.memory import MemoryDigestStore
from app.stores.redis_windows import RedisDigestStore
from app.stores.sqlite_claims import SqliteStore
from app.stores.sqlite_windows import SqliteDigestStore
from app.stores.windows import Taken
from tests.stores.test_windows import NOW, item

ROOT = Path(__file__).parents[2]

# The schema before leading windows and rate periods (commit 3b7e8c2), as files in use have it.
_OLD_SCHEMA = """
CREATE TABLE digest_routes (
    route TEXT PRIMARY KEY,
    open_window TEXT,
    last_opened_ms INTEGER NOT NULL,
    last_closed_at REAL
) WITHOUT ROWID;
CREATE TABLE digest_windows (
    id TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    opened_at REAL NOT NULL,
    due_at REAL NOT NULL,
    state TEXT NOT NULL,
    owner TEXT,
    ready_at REAL NOT NULL,
    expires_at REAL,
    events INTEGER NOT NULL,
    summary TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX digest_windows_ready ON digest_windows (ready_at) WHERE state != 'done';
CREATE TABLE digest_items (
    window TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (window, seq)
) WITHOUT ROWID;
CREATE TABLE digest_changes (
    key BLOB PRIMARY KEY,
    window TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
"""


def _columns(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {row[1] for row in db.execute("PRAGMA table_info(digest_windows)")}
    finally:
        db.close()


def test_a_file_with_the_older_schema_opens_and_works(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(_OLD_SCHEMA)
    old.close()
    assert "leading_key" not in _columns(path)

    async def scenario() -> None:
        # Two stores open the old file at once, as two processes would: one adds the column.
        first, second = SqliteDigestStore.open(str(path)), SqliteDigestStore.open(str(path))
        window = (await first.add("r", 60, 10, item(1), NOW)).window_id
        assert (await second.add("r", 60, 10, item(2), NOW + 1)).window_id == window
        lead = await second.add("quiet", 60, 10, item(1), NOW, leading_after=300)
        assert lead.leading
        assert (await first.add("quiet", 60, 10, item(1), NOW + 1, leading_after=300)).leading
        assert await first.take("rated", 2, 60, NOW) == Taken(True, NOW + 60, 1)
        assert (await first.read(window)).summary == DigestSummary.empty(10).add(item(1)).add(
            item(2)
        )
        await first.aclose()
        await second.aclose()

    asyncio.run(scenario())
    assert "leading_key" in _columns(path)


def test_the_idempotency_store_and_the_digest_store_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "notifier.db"

    async def scenario() -> None:
        emails = SqliteStore.open(str(path))
        digests = open_digest_store(f"sqlite:///{path}")
        assert isinstance(digests, SqliteDigestStore)
        assert await emails.claim("change-1", "a", 30) is Claim.CLAIMED
        window = (await digests.add("r", 60, 10, item(1), NOW)).window_id
        await emails.complete("change-1", "a", 3600)
        assert (await digests.take("rated", 1, 60, NOW)).allowed
        await digests.add("r", 60, 10, item(2), NOW + 1)
        await emails.ping()
        await digests.aclose()
        await emails.aclose()

        emails, digests = SqliteStore.open(str(path)), SqliteDigestStore.open(str(path))
        assert await emails.claim("change-1", "b", 30) is Claim.DONE
        assert [(p.window_id, p.events) for p in await digests.pending(NOW + 2)] == [(window, 2)]
        assert not (await digests.take("rated", 1, 60, NOW + 2)).allowed
        await digests.aclose()
        await emails.aclose()

    asyncio.run(scenario())


_KILLED_TAKER = """
import asyncio, os, signal, sys
from tests.stores.test_windows import NOW, item
from app.stores.sqlite_windows import SqliteDigestStore

async def main() -> None:
    store = SqliteDigestStore.open(sys.argv[1])
    for n in range(3):
        await store.take("rated", 5, 3600, NOW + n)
    await store.add("r", 300, 10, item(1), NOW, leading_after=600)
    os.kill(os.getpid(), signal.SIGKILL)  # no aclose, no checkpoint, no cleanup

asyncio.run(main())
"""


def test_a_sigkill_keeps_the_rate_period_and_the_leading_mark(tmp_path: Path) -> None:
    path = str(tmp_path / "digests.db")
    taker = subprocess.run(
        [sys.executable, "-c", _KILLED_TAKER, path],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        check=False,
    )
    assert taker.returncode == -9, taker.stderr.decode()

    async def scenario() -> None:
        store = SqliteDigestStore.open(path)
        assert await store.take("rated", 5, 3600, NOW + 10) == Taken(True, NOW + 3600, 4)
        again = await store.add("r", 300, 10, item(1), NOW + 20, leading_after=600)
        assert (again.duplicate, again.leading) == (True, True)
        joined = await store.add("r", 300, 10, item(2), NOW + 21, leading_after=600)
        assert (joined.window_id, joined.opened, joined.leading) == (again.window_id, False, False)
        assert (await store.read(again.window_id)).summary.items == [item(2)]
        await store.aclose()

    asyncio.run(scenario())


def test_threads_on_separate_connections_take_exactly_the_limit(tmp_path: Path) -> None:
    path = str(tmp_path / "digests.db")
    asyncio.run(SqliteDigestStore.open(path).aclose())  # the file exists before the race
    results: list[Taken] = []
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def worker() -> None:
        async def takes() -> list[Taken]:
            store = SqliteDigestStore.open(path)
            try:
                start.wait()
                return [await store.take("r", 20, 3600, NOW) for _ in range(10)]
            finally:
                await store.aclose()

        try:
            results.extend(asyncio.run(takes()))
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(t.used for t in results if t.allowed) == list(range(1, 21))
    assert len(results) == 50


def test_open_digest_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    async def scenario() -> None:
        memory = open_digest_store("memory")
        assert isinstance(memory, MemoryDigestStore)
        sqlite = open_digest_store(f"sqlite:///{tmp_path / 'd' / 'digests.db'}")
        assert isinstance(sqlite, SqliteDigestStore)
        assert (await sqlite.add("r", 60, 10, item(1), NOW)).opened
        for url in ("redis://127.0.0.1:1/0", "rediss://redis.example:6380/0"):
            redis = open_digest_store(url)  # connects on first use
            assert isinstance(redis, RedisDigestStore)
            await redis.aclose()
        await memory.aclose()
        await sqlite.aclose()

    asyncio.run(scenario())
    assert (tmp_path / "d" / "digests.db").exists()


@pytest.mark.parametrize("url", ["postgres://db/x", "sqlite://relative.db", "", "Memory"])
def test_open_digest_store_refuses_another_url(url: str) -> None:
    with pytest.raises(ValueError, match="unknown digest store URL scheme"):
        open_digest_store(url)


def test_open_digest_store_reports_a_file_it_cannot_open(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable, match="sqlite: "):
        open_digest_store(f"sqlite:///{blocker / 'digests.db'}")
    with pytest.raises(StoreUnavailable, match="sqlite: "):
        open_digest_store(f"sqlite:///{tmp_path}")  # a directory, not a database


def test_backends_are_imported_only_when_used() -> None:
    probe = (
        "import sys, app.stores.factory; "
        "print(sorted(m for m in sys.modules if m.startswith(('app.stores.', 'redis', 'google'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    assert "app.stores.factory" in loaded
    for backend in ("memory", "sqlite", "redis_windows", "redis_claims", "firestore_windows"):
        assert f"app.stores.{backend}'" not in loaded
    assert "'redis" not in loaded
    assert "'google" not in loaded
