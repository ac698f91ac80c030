"""The SQLite digest store's file: an older schema opens and works, the idempotency store shares
it, a rate overflow joins the digest and marks done in one transaction or not at all, a SIGKILL
keeps rate periods, takers, leading marks and overflow done marks, two connections take a
period's last email once. And `open_digest_store`, which picks a backend from the store URL."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from app.digests.window import DigestSummary
from app.stores.base import Claim, Lease, StoreUnavailable
from app.stores.factory import open_digest_store
from app.stores.memory import MemoryDigestStore
from app.stores.redis_windows import RedisDigestStore
from app.stores.sqlite import done_key
from app.stores.sqlite_claims import SqliteStore
from app.stores.sqlite_windows import SqliteDigestStore
from app.stores.windows import Taken, UnknownWindow, WindowState
from tests.stores.test_windows import NOW, item

ROOT = Path(__file__).parents[2]

# The schema before leading windows, rate periods and fencing tokens (commit 3b7e8c2), as files
# in use have it, with the idempotency store's done table of that time.
_OLD_SCHEMA = """
CREATE TABLE done (
    key BLOB PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
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


def leased(answer: Lease | Claim) -> Lease:
    assert isinstance(answer, Lease), answer
    return answer


def _columns(path: Path, table: str) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    finally:
        db.close()


def _old_file(path: Path) -> None:
    """A file the previous version wrote: a done mark, and two windows an old flush claimed by
    owner (one lease still running, one run out)."""
    old = sqlite3.connect(path)
    old.executescript(_OLD_SCHEMA)
    old.execute("INSERT INTO done VALUES (?, ?)", (done_key("sent-before"), NOW + 10**9))
    summary = json.dumps(DigestSummary.empty(10).to_json())
    for window, ready_at in (("old:1", NOW + 30), ("old:2", NOW - 30)):
        old.execute(
            "INSERT INTO digest_windows (id, route, opened_at, due_at, state, owner, ready_at,"
            " events, summary) VALUES (?, 'old', ?, ?, 'sending', 'host-1', ?, 0, ?)",
            (window, NOW - 100, NOW - 40, ready_at, summary),
        )
    old.commit()
    old.close()


def _in_threads(count: int, work: Callable[[int], None]) -> None:
    """`work(0)` .. `work(count - 1)` in threads that start together; their errors re-raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def worker(index: int) -> None:
        try:
            start.wait()
            work(index)
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


def test_a_file_with_the_older_schema_opens_and_works(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _old_file(path)
    assert "token" not in _columns(path, "done")
    assert "leading_key" not in _columns(path, "digest_windows")

    # Four stores open the old file at once, as processes would: each column is added once.
    opened: list[SqliteStore | SqliteDigestStore] = []

    def open_one(index: int) -> None:
        kind = SqliteStore if index % 2 else SqliteDigestStore
        opened.append(kind.open(str(path)))

    _in_threads(4, open_one)
    emails = next(store for store in opened if isinstance(store, SqliteStore))
    first, second = (store for store in opened if isinstance(store, SqliteDigestStore))

    async def scenario() -> None:
        # The old done mark stays done; it was completed by no token this version knows.
        assert await emails.claim("sent-before", 30) is Claim.DONE
        assert await emails.complete("sent-before", 1) is False
        lease = leased(await emails.claim("new", 30))
        assert await emails.complete("new", lease.token) is True
        # An old claim is a claim: IN_FLIGHT while its lease runs, taken over once it ran out.
        assert await first.claim("old:1", 30, NOW) is Claim.IN_FLIGHT
        taken_over = leased(await second.claim("old:2", 30, NOW))
        assert await first.complete("old:2", taken_over.token, NOW + 1) is True
        window = (await first.add("r", 60, 10, item(1), NOW)).window_id
        assert (await second.add("r", 60, 10, item(2), NOW + 1)).window_id == window
        lead = await second.add("quiet", 60, 10, item(1), NOW, leading_after=300)
        assert lead.leading
        assert (await first.add("quiet", 60, 10, item(1), NOW + 1, leading_after=300)).leading
        assert await first.take("rated", "c1", 2, 60, NOW) == Taken(True, NOW + 60, 1)
        assert await second.take("rated", "c1", 2, 60, NOW) == Taken(True, NOW + 60, 1, True)
        assert (await first.read(window)).summary == DigestSummary.empty(10).add(item(1)).add(
            item(2)
        )
        for store in opened:
            await store.aclose()

    asyncio.run(scenario())
    assert "token" in _columns(path, "done")
    assert {"leading_key", "token", "done_by"} <= _columns(path, "digest_windows")


def test_the_idempotency_store_and_the_digest_store_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "notifier.db"

    async def scenario() -> None:
        emails = SqliteStore.open(str(path))
        digests = open_digest_store(f"sqlite:///{path}")
        assert isinstance(digests, SqliteDigestStore)
        lease = leased(await emails.claim("change-1", 30))
        window = (await digests.add("r", 60, 10, item(1), NOW)).window_id
        assert await emails.complete("change-1", lease.token)
        assert (await digests.take("rated", "c1", 1, 60, NOW)).allowed
        await digests.overflow("rated", 60, 10, item(9), NOW, ["change-9"])
        await digests.add("r", 60, 10, item(2), NOW + 1)
        await emails.ping()
        await digests.aclose()
        await emails.aclose()

        emails, digests = SqliteStore.open(str(path)), SqliteDigestStore.open(str(path))
        assert await emails.claim("change-1", 30) is Claim.DONE
        assert await emails.complete("change-1", lease.token)  # a retry, after a restart
        assert await emails.claim("change-9", 30) is Claim.DONE
        assert [(p.window_id, p.events) for p in await digests.pending(NOW + 2)] == [
            (window, 2),
            (f"rated:{int(NOW * 1000)}", 1),
        ]
        assert not (await digests.take("rated", "c2", 1, 60, NOW + 2)).allowed
        await digests.aclose()
        await emails.aclose()

    asyncio.run(scenario())


def test_a_failing_overflow_neither_joins_the_digest_nor_marks_anything_done(
    tmp_path: Path,
) -> None:
    """The second done mark fails after the join and the first mark were written in the
    transaction: all of it is rolled back, and nothing of it is left in the summary cache."""
    path = tmp_path / "notifier.db"
    keys = ["route:rated:a#0", "route:rated:a#1"]

    async def scenario() -> None:
        emails, digests = SqliteStore.open(str(path)), SqliteDigestStore.open(str(path))
        window = (await digests.add("rated", 300, 10, item(1), NOW)).window_id
        refuse = sqlite3.connect(path)
        refuse.execute(  # a trigger takes no parameters: the key as a blob literal
            f"CREATE TRIGGER refuse_done BEFORE INSERT ON done"
            f" WHEN NEW.key = X'{done_key(keys[1]).hex()}'"
            " BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )
        refuse.commit()
        with pytest.raises(StoreUnavailable, match="disk says no"):
            await digests.overflow("rated", 300, 10, item(2), NOW + 1, keys)
        with pytest.raises(StoreUnavailable, match="disk says no"):  # and opening a window
            await digests.overflow("other", 300, 10, item(2), NOW + 1, keys)

        for key in keys:
            assert isinstance(await emails.claim(key, 30), Lease)
        assert [(p.window_id, p.events) for p in await digests.pending(NOW + 1)] == [(window, 1)]
        assert (await digests.read(window)).summary.items == [item(1)]
        with pytest.raises(UnknownWindow):
            await digests.read(f"other:{int((NOW + 1) * 1000)}")
        assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM done").fetchone() == (0,)

        # The change was not remembered either: once the store works, it joins.
        refuse.execute("DROP TRIGGER refuse_done")
        refuse.commit()
        refuse.close()
        joined = await digests.overflow("rated", 300, 10, item(2), NOW + 2, keys)
        assert (joined.window_id, joined.duplicate) == (window, False)
        await digests.add("rated", 300, 10, item(3), NOW + 3)
        summary = (await digests.read(window)).summary
        assert summary == DigestSummary.empty(10).add(item(1)).add(item(2)).add(item(3))
        for key in keys:
            assert await emails.claim(key, 30) is Claim.DONE
        await digests.aclose()
        await emails.aclose()

    asyncio.run(scenario())


def test_a_new_period_forgets_its_takers_without_deleting_and_the_purge_removes_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "digests.db"

    async def scenario() -> None:
        store = SqliteDigestStore.open(str(path))
        for n in range(3):
            await store.take("r", f"c{n}", 5, 60, NOW)
        assert await store.take("r", "c0", 5, 60, NOW + 61) == Taken(True, NOW + 121, 1)
        assert await store.take("r", "c1", 5, 60, NOW + 62) == Taken(True, NOW + 121, 2)
        assert await store.take("r", "c1", 5, 60, NOW + 63) == Taken(True, NOW + 121, 2, True)
        store.maintain(NOW + 64)  # c2 took one of the period that ended at NOW + 60 only
        rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM digest_takers")
        assert rows.fetchone() == (2,)
        assert await store.take("r", "c2", 5, 60, NOW + 65) == Taken(True, NOW + 121, 3)
        await store.aclose()

    asyncio.run(scenario())


def test_a_stale_window_sender_survives_a_restart_as_stale(tmp_path: Path) -> None:
    """Tokens and the completing token are in the file: a sender's retry after a restart
    answers as before, and a later claim's token is larger."""
    path = str(tmp_path / "digests.db")

    async def scenario() -> None:
        store = SqliteDigestStore.open(path)
        window = (await store.add("r", 60, 10, item(1), NOW)).window_id
        stale = leased(await store.claim(window, 30, NOW + 60))
        await store.aclose()
        store = SqliteDigestStore.open(path)
        current = leased(await store.claim(window, 30, NOW + 91))
        assert current.token > stale.token
        assert await store.complete(window, current.token, NOW + 92) is True
        await store.aclose()
        store = SqliteDigestStore.open(path)
        assert await store.complete(window, current.token, NOW + 93) is True  # a retry
        assert await store.complete(window, stale.token, NOW + 93) is False
        assert (await store.read(window)).info.state is WindowState.DONE
        await store.aclose()

    asyncio.run(scenario())


_KILLED_TAKER = """
import asyncio, os, signal, sys
from tests.stores.test_windows import NOW, item
from app.stores.sqlite_windows import SqliteDigestStore

async def main() -> None:
    store = SqliteDigestStore.open(sys.argv[1])
    for n in range(3):
        await store.take("rated", f"c{n}", 5, 3600, NOW + n)
    await store.add("r", 300, 10, item(1), NOW, leading_after=600)
    await store.overflow("rated", 300, 10, item(7), NOW + 3, ["route:rated:c7#0"])
    os.kill(os.getpid(), signal.SIGKILL)  # no aclose, no checkpoint, no cleanup

asyncio.run(main())
"""


def test_a_sigkill_keeps_the_rate_period_its_takers_the_leading_mark_and_the_overflow(
    tmp_path: Path,
) -> None:
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
        assert await store.take("rated", "c1", 5, 3600, NOW + 10) == Taken(
            True, NOW + 3600, 3, True
        )
        assert await store.take("rated", "c3", 5, 3600, NOW + 10) == Taken(True, NOW + 3600, 4)
        again = await store.add("r", 300, 10, item(1), NOW + 20, leading_after=600)
        assert (again.duplicate, again.leading) == (True, True)
        joined = await store.add("r", 300, 10, item(2), NOW + 21, leading_after=600)
        assert (joined.window_id, joined.opened, joined.leading) == (again.window_id, False, False)
        assert (await store.read(again.window_id)).summary.items == [item(2)]
        overflowed = await store.overflow("rated", 300, 10, item(7), NOW + 30, [])
        assert overflowed.duplicate
        assert (await store.read(overflowed.window_id)).summary.items == [item(7)]
        emails = SqliteStore.open(path)
        assert await emails.claim("route:rated:c7#0", 30) is Claim.DONE
        await emails.aclose()
        await store.aclose()

    asyncio.run(scenario())


def test_threads_on_separate_connections_take_exactly_the_limit(tmp_path: Path) -> None:
    path = str(tmp_path / "digests.db")
    asyncio.run(SqliteDigestStore.open(path).aclose())  # the file exists before the race
    results: list[Taken] = []

    def takes(thread: int) -> None:
        async def main() -> list[Taken]:
            store = SqliteDigestStore.open(path)
            try:
                return [await store.take("r", f"c{thread}-{n}", 20, 3600, NOW) for n in range(10)]
            finally:
                await store.aclose()

        results.extend(asyncio.run(main()))

    _in_threads(5, takes)
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
