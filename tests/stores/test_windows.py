"""Every digest store keeps the same promises: one open window per route, every change counted
once, a window claimed by one flush, nothing lost across a restart."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.digests.window import DigestItem, DigestSummary
from app.events.models import EventType
from app.stores.base import Claim, Lease
from app.stores.factory import open_digest_store, open_store
from app.stores.firestore import FirestoreLocation
from app.stores.firestore_windows import FirestoreDigestStore
from app.stores.memory import MemoryDigestStore
from app.stores.redis_windows import PREFIX, RedisDigestStore
from app.stores.sqlite_windows import SqliteDigestStore
from app.stores.windows import Added, DigestStore, Taken, UnknownWindow, WindowState
from tests.redis_server import redis_server

pytest_plugins = ["tests.firestore_emulator", "tests.store_backends"]
log = logging.getLogger(__name__)

NOW = 1_730_000_000.0  # fixed clock: every method takes `now`
T0 = datetime(2024, 10, 1, 9, 30, tzinfo=UTC)

Opener = Callable[[], DigestStore]


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis), "firestore"],
)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store; calling it again opens another instance on the same storage (the same
    object for memory, another connection for SQLite, another client for Redis and Firestore)."""
    if request.param == "memory":
        memory = MemoryDigestStore()
        yield lambda: memory
    elif request.param == "sqlite":
        path = str(tmp_path / "state" / "digests.db")
        yield lambda: SqliteDigestStore.open(path)
    elif request.param == "firestore":
        location = FirestoreLocation.parse(request.getfixturevalue("firestore_url"))
        yield lambda: FirestoreDigestStore(location)
    else:
        with redis_server(tmp_path) as url:
            yield lambda: RedisDigestStore(Redis.from_url(url))


def leased(answer: Lease | Claim) -> Lease:
    assert isinstance(answer, Lease), answer
    return answer


def run(opener: Opener, scenario: Callable[[DigestStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = opener()
        try:
            await scenario(store)
        finally:
            await store.aclose()

    asyncio.run(main())


def item(n: int, *, kind: EventType = EventType.FINALIZED, bucket: str = "acme") -> DigestItem:
    return DigestItem(
        change_key=f"change-{bucket}-{n}-{kind.short}",
        event_type=kind,
        bucket=bucket,
        name=f"reports/2024/{n}.csv",
        size=1000 + n,
        time=T0 + timedelta(seconds=n),
        content_type="text/csv",
    )


def test_first_event_opens_a_window_that_later_events_join(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 300, 10, item(1), NOW)
        second = await store.add("r", 300, 10, item(2), NOW + 5)
        assert first.window_id == f"r:{int(NOW * 1000)}"
        assert (first.opened, first.duplicate, first.previous_closed_at) == (True, False, None)
        assert (second.window_id, second.opened, second.duplicate) == (
            first.window_id,
            False,
            False,
        )
        window = await store.read(first.window_id)
        assert window.info.route == "r"
        assert window.info.opened_at == pytest.approx(NOW)
        assert window.info.due_at == pytest.approx(NOW + 300)
        assert window.info.state is WindowState.OPEN
        assert window.summary == DigestSummary.empty(10).add(item(1)).add(item(2))

    run(opener, scenario)


def test_the_same_change_twice_counts_once_within_and_across_windows(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 60, 10, item(1), NOW)
        again = await store.add("r", 60, 10, item(1), NOW + 1)
        assert (again.duplicate, again.window_id, again.opened) == (True, first.window_id, False)
        lease = leased(await store.claim(first.window_id, 30, NOW + 61))
        await store.complete(first.window_id, lease.token, NOW + 62)
        late = await store.add("r", 60, 10, item(1), NOW + 3600)  # redelivered an hour later
        assert (late.duplicate, late.window_id) == (True, first.window_id)
        assert await store.pending(NOW + 3600) == []
        assert (await store.read(first.window_id)).summary.count == 1

    run(opener, scenario)


def test_a_change_is_deduplicated_per_route(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        one = await store.add("one", 60, 10, item(1), NOW)
        two = await store.add("two", 60, 10, item(1), NOW)
        assert not one.duplicate
        assert not two.duplicate
        assert one.window_id != two.window_id

    run(opener, scenario)


def test_a_change_is_forgotten_after_the_retention(tmp_path: Path) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 60, 10, item(1), NOW)
        lease = leased(await store.claim(first.window_id, 30, NOW + 60))
        await store.complete(first.window_id, lease.token, NOW + 61)
        later = await store.add("r", 60, 10, item(1), NOW + 101)
        assert not later.duplicate
        assert later.window_id != first.window_id

    for store in (MemoryDigestStore(retention_seconds=100), SqliteDigestStore(":memory:", 100)):

        async def main(store: DigestStore = store) -> None:
            await scenario(store)
            await store.aclose()

        asyncio.run(main())


def test_an_event_during_the_send_opens_the_next_window(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 60, 10, item(1), NOW)
        leased(await store.claim(first.window_id, 30, NOW + 60))
        during = await store.add("r", 60, 10, item(2), NOW + 60.5)
        assert during.window_id == f"r:{int((NOW + 60.5) * 1000)}"
        assert during.opened
        assert during.previous_closed_at == pytest.approx(NOW + 60)
        assert (await store.read(first.window_id)).summary.count == 1
        assert (await store.read(during.window_id)).summary.items == [item(2)]

    run(opener, scenario)


def test_windows_opened_in_the_same_millisecond_get_distinct_ids(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 60, 10, item(1), NOW)
        leased(await store.claim(first.window_id, 30, NOW))
        second = await store.add("r", 60, 10, item(2), NOW)
        assert second.opened
        assert second.window_id == f"r:{int(NOW * 1000) + 1}"

    run(opener, scenario)


def test_due_lists_open_windows_once_their_time_has_come(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        early = await store.add("early", 60, 10, item(1), NOW)
        late = await store.add("late", 120, 10, item(1), NOW)
        assert await store.due(NOW + 59, 10) == []
        assert await store.due(NOW + 60, 10) == [early.window_id]
        assert await store.due(NOW + 200, 10) == [early.window_id, late.window_id]
        assert await store.due(NOW + 200, 1) == [early.window_id]

    run(opener, scenario)


def test_claim_complete_cycle(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        window = (await store.add("r", 60, 10, item(1), NOW)).window_id
        lease = leased(await store.claim(window, 30, NOW + 60))
        assert await store.claim(window, 30, NOW + 61) is Claim.IN_FLIGHT
        assert (await store.read(window)).info.state is WindowState.SENDING
        assert await store.due(NOW + 62, 10) == []
        assert await store.complete(window, lease.token, NOW + 62) is True
        assert await store.complete(window, lease.token, NOW + 62) is True  # a retry
        assert await store.claim(window, 30, NOW + 63) is Claim.DONE
        assert await store.renew(window, lease.token, 30, NOW + 63) is None
        assert await store.due(NOW + 10_000, 10) == []
        assert (await store.read(window)).info.state is WindowState.DONE

    run(opener, scenario)


def test_a_released_window_is_due_at_once_and_stays_closed(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        window = (await store.add("r", 60, 10, item(1), NOW)).window_id
        a = leased(await store.claim(window, 30, NOW + 60))
        await store.release(window, a.token, NOW + 61)
        assert await store.due(NOW + 61, 10) == [window]
        assert (await store.read(window)).info.state is WindowState.RELEASED
        next_one = await store.add("r", 60, 10, item(2), NOW + 62)
        assert next_one.window_id != window
        assert next_one.opened
        lease = leased(await store.claim(window, 30, NOW + 63))
        await store.complete(window, lease.token, NOW + 64)
        assert (await store.read(window)).summary.count == 1

    run(opener, scenario)


def test_release_with_another_token_does_nothing(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        window = (await store.add("r", 60, 10, item(1), NOW)).window_id
        lease = leased(await store.claim(window, 30, NOW + 60))
        await store.release(window, lease.token + 1, NOW + 61)
        await store.release(window, lease.token - 1, NOW + 61)
        assert await store.due(NOW + 61, 10) == []
        assert await store.claim(window, 30, NOW + 61) is Claim.IN_FLIGHT

    run(opener, scenario)


def test_completing_an_open_window_closes_it(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        window = (await store.add("r", 60, 10, item(1), NOW)).window_id
        assert await store.complete(window, 1, NOW + 1) is False  # nobody had claimed it
        after = await store.add("r", 60, 10, item(2), NOW + 2)
        assert after.opened
        assert after.window_id != window

    run(opener, scenario)


def test_two_concurrent_claimers_have_one_winner(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        window = (await store.add("r", 60, 10, item(1), NOW)).window_id
        other = opener()  # a second instance on the same storage
        try:
            results = await asyncio.gather(
                *((store if i % 2 else other).claim(window, 30, NOW + 60) for i in range(20))
            )
        finally:
            if other is not store:
                await other.aclose()
        assert sum(isinstance(result, Lease) for result in results) == 1
        assert results.count(Claim.IN_FLIGHT) == 19

    run(opener, scenario)


def test_an_expired_lease_makes_a_sending_window_due_again(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        window = (await store.add("r", 60, 10, item(1), NOW)).window_id
        crashed = leased(await store.claim(window, 30, NOW + 60))
        assert await store.due(NOW + 89, 10) == []
        assert await store.due(NOW + 90, 10) == [window]
        taken_over = leased(await store.claim(window, 30, NOW + 90))
        assert taken_over.token > crashed.token
        assert await store.claim(window, 30, NOW + 91) is Claim.IN_FLIGHT
        assert await store.renew(window, crashed.token, 30, NOW + 91) is None

    run(opener, scenario)


def test_pending_lists_every_window_not_yet_sent(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        sent = (await store.add("sent", 10, 10, item(1), NOW)).window_id
        sending = (await store.add("sending", 20, 10, item(1), NOW)).window_id
        for n in range(3):
            await store.add("open", 30, 10, item(n), NOW + 1)
        lease = leased(await store.claim(sent, 30, NOW + 10))
        await store.complete(sent, lease.token, NOW + 11)
        leased(await store.claim(sending, 30, NOW + 20))
        pending = await store.pending(NOW + 21)
        assert [(p.route, p.events, p.state) for p in pending] == [
            ("sending", 1, WindowState.SENDING),
            ("open", 3, WindowState.OPEN),
        ]
        assert pending[0].window_id == sending
        assert pending[1].opened_at == pytest.approx(NOW + 1)
        assert pending[1].due_at == pytest.approx(NOW + 31)

    run(opener, scenario)


def test_an_unknown_window_is_done_and_cannot_be_read(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        assert await store.claim("r:1", 30, NOW) is Claim.DONE
        with pytest.raises(UnknownWindow):
            await store.read("r:1")

    run(opener, scenario)


def varied_item(n: int) -> DigestItem:
    """Every field the summary folds: types, sizes, missing times, unordered times, more
    buckets than MAX_BUCKETS, and names whose common folder passes through multi-byte
    characters (é and è share their first UTF-8 byte)."""
    kinds = list(EventType)
    folder = ("données/é/", "données/è/", "données/è/x/")[n % 3]
    return DigestItem(
        change_key=f"k{n}",
        event_type=kinds[n % len(kinds)],
        bucket=f"bucket-{n % 25}",
        name=f"{folder}{n}.csv",
        size=None if n % 7 == 0 else 2**40 + n,
        time=None if n % 11 == 0 else T0 + timedelta(microseconds=(n * 7919) % 1_000_003),
        content_type=None,
    )


def test_a_burst_of_20000_events_is_one_window_with_max_items_listed(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        # A Firestore add is three round trips (about 6 ms on the emulator): 20,000 in a row
        # would take two minutes; 2,000 fold every field the same way.
        events = 2_000 if isinstance(store, FirestoreDigestStore) else 20_000
        started = time.perf_counter()
        ids = {
            (await store.add("r", 300, 100, varied_item(n), NOW + n / 1000)).window_id
            for n in range(events)
        }
        elapsed = time.perf_counter() - started
        log.info(
            "digest adds",
            extra={"store": type(store).__name__, "per_add_us": elapsed / events * 1e6},
        )
        assert len(ids) == 1
        window = await store.read(ids.pop())
        expected = DigestSummary.empty(100)
        for n in range(events):
            expected.add(varied_item(n))
        assert window.summary.count == events
        assert len(window.summary.items) == 100
        assert window.summary.prefix == "données/"
        assert window.summary == expected
        assert window.info.events == events

    run(opener, scenario)


@pytest.mark.redis
def test_a_redis_window_is_shared_by_a_new_client(tmp_path: Path) -> None:
    async def scenario(url: str) -> None:
        first = RedisDigestStore(Redis.from_url(url))
        window = (await first.add("r", 60, 10, item(1), NOW)).window_id
        await first.aclose()
        second = RedisDigestStore(Redis.from_url(url))
        joined = await second.add("r", 60, 10, item(2), NOW + 1)
        assert (joined.window_id, joined.opened) == (window, False)
        assert (await second.add("r", 60, 10, item(1), NOW + 2)).duplicate
        assert [p.window_id for p in await second.pending(NOW + 2)] == [window]
        assert (await second.read(window)).summary.items == [item(1), item(2)]
        await second.aclose()

    with redis_server(tmp_path) as url:
        asyncio.run(scenario(url))


_KILLED_WRITER = """
import asyncio, os, signal, sys
from tests.stores.test_windows import NOW, item
from app.stores.sqlite_windows import SqliteDigestStore

async def main() -> None:
    store = SqliteDigestStore.open(sys.argv[1])
    for n in range(50):
        await store.add("r", 300, 10, item(n), NOW + n)
    os.kill(os.getpid(), signal.SIGKILL)  # no aclose, no checkpoint, no cleanup

asyncio.run(main())
"""


def test_a_sqlite_window_survives_sigkill_with_every_event(tmp_path: Path) -> None:
    path = str(tmp_path / "digests.db")
    writer = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, path],
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        capture_output=True,
        check=False,
    )
    assert writer.returncode == -9, writer.stderr.decode()

    async def scenario() -> None:
        store = SqliteDigestStore.open(path)
        pending = await store.pending(NOW + 60)
        assert [(p.window_id, p.events) for p in pending] == [(f"r:{int(NOW * 1000)}", 50)]
        window = await store.read(pending[0].window_id)
        expected = DigestSummary.empty(10)
        for n in range(50):
            expected.add(item(n))
        assert window.summary == expected
        assert await store.due(NOW + 300, 10) == [pending[0].window_id]
        assert (await store.add("r", 300, 10, item(3), NOW + 70)).duplicate
        await store.aclose()

    asyncio.run(scenario())


def test_a_leading_event_opens_the_first_window_empty(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 60, 10, item(1), NOW, leading_after=300)
        assert first == Added(f"r:{int(NOW * 1000)}", False, True, None, leading=True)
        window = await store.read(first.window_id)
        assert window.summary == DigestSummary.empty(10)
        assert (window.info.events, window.info.state) == (0, WindowState.OPEN)
        assert [(p.window_id, p.events) for p in await store.pending(NOW)] == [(first.window_id, 0)]
        # An empty window is flushed like any other: the flush completes it without an email.
        assert await store.due(NOW + 60, 10) == [first.window_id]
        lease = leased(await store.claim(first.window_id, 30, NOW + 60))
        await store.complete(first.window_id, lease.token, NOW + 60)
        assert await store.pending(NOW + 60) == []

    run(opener, scenario)


def test_a_second_event_joins_the_leading_window_alone(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 60, 10, item(1), NOW, leading_after=300)
        second = await store.add("r", 60, 10, item(2), NOW + 1, leading_after=300)
        assert second == Added(first.window_id, False, False, None, leading=False)
        window = await store.read(first.window_id)
        assert window.summary == DigestSummary.empty(10).add(item(2))
        assert window.summary.items == [item(2)]
        assert window.info.events == 1

    run(opener, scenario)


def test_a_duplicate_of_the_leading_change_is_leading(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 60, 10, item(1), NOW, leading_after=300)
        await store.add("r", 60, 10, item(2), NOW + 1, leading_after=300)
        again = await store.add("r", 60, 10, item(1), NOW + 2, leading_after=300)
        assert again == Added(first.window_id, True, False, None, leading=True)
        joined_again = await store.add("r", 60, 10, item(2), NOW + 3, leading_after=300)
        assert (joined_again.duplicate, joined_again.leading) == (True, False)
        assert (await store.read(first.window_id)).summary.count == 1
        lease = leased(await store.claim(first.window_id, 30, NOW + 60))
        await store.complete(first.window_id, lease.token, NOW + 61)
        late = await store.add("r", 60, 10, item(1), NOW + 3600, leading_after=300)
        assert (late.window_id, late.duplicate, late.leading) == (first.window_id, True, True)
        assert await store.pending(NOW + 3600) == []

    run(opener, scenario)


def test_not_leading_while_the_previous_window_closed_recently(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 60, 10, item(1), NOW, leading_after=300)
        leased(await store.claim(first.window_id, 30, NOW + 60))
        busy = await store.add("r", 60, 10, item(2), NOW + 359.5, leading_after=300)
        assert (busy.opened, busy.leading) == (True, False)
        assert busy.previous_closed_at == pytest.approx(NOW + 60)
        assert (await store.read(busy.window_id)).summary.items == [item(2)]

    run(opener, scenario)


def test_leading_again_after_a_quiet_spell(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 60, 10, item(1), NOW, leading_after=300)
        lease = leased(await store.claim(first.window_id, 30, NOW + 60))
        await store.complete(first.window_id, lease.token, NOW + 61)
        quiet = await store.add("r", 60, 10, item(2), NOW + 360, leading_after=300)  # 300 s
        assert (quiet.opened, quiet.leading, quiet.duplicate) == (True, True, False)
        assert quiet.previous_closed_at == pytest.approx(NOW + 60)
        assert quiet.window_id != first.window_id
        assert (await store.read(quiet.window_id)).info.events == 0

    run(opener, scenario)


def test_without_leading_after_an_opening_event_joins_its_window(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        first = await store.add("r", 60, 10, item(1), NOW)
        assert (first.opened, first.leading) == (True, False)
        assert (await store.read(first.window_id)).summary.items == [item(1)]
        assert not (await store.add("r", 60, 10, item(1), NOW + 1)).leading

    run(opener, scenario)


def test_take_allows_the_limit_per_period_then_starts_a_new_one(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        taken = [await store.take("r", f"c{n}", 3, 60, NOW + n) for n in range(4)]
        assert taken == [
            Taken(True, NOW + 60, 1),
            Taken(True, NOW + 60, 2),
            Taken(True, NOW + 60, 3),
            Taken(False, NOW + 60, 3),
        ]
        assert await store.take("r", "c4", 3, 60, NOW + 59.5) == Taken(False, NOW + 60, 3)
        assert await store.take("other", "c1", 3, 60, NOW + 30) == Taken(True, NOW + 90, 1)
        # The first email after the period ended starts the next one, at its own time.
        assert await store.take("r", "c5", 3, 60, NOW + 75) == Taken(True, NOW + 135, 1)
        assert await store.take("r", "c6", 3, 60, NOW + 134) == Taken(True, NOW + 135, 2)

    run(opener, scenario)


def test_take_rejects_a_rate_that_allows_nothing(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        with pytest.raises(ValueError, match="limit"):
            await store.take("r", "change", 0, 60, NOW)
        with pytest.raises(ValueError, match="period"):
            await store.take("r", "change", 1, 0, NOW)
        assert await store.take("r", "change", 1, 60, NOW) == Taken(True, NOW + 60, 1)

    run(opener, scenario)


def test_concurrent_takes_allow_exactly_the_limit(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        other = opener()  # a second instance on the same storage
        try:
            results = await asyncio.gather(
                *((store if i % 2 else other).take("r", f"c{i}", 20, 3600, NOW) for i in range(50))
            )
        finally:
            if other is not store:
                await other.aclose()
        allowed = [t.used for t in results if t.allowed]
        assert sorted(allowed) == list(range(1, 21))
        assert {t.used for t in results if not t.allowed} == {20}
        assert {t.period_end for t in results} == {NOW + 3600}

    run(opener, scenario)


@pytest.mark.redis
def test_a_redis_period_expires_with_its_end(tmp_path: Path) -> None:
    route = "route with spaces/and:colons é"

    async def scenario(url: str) -> None:
        client = Redis.from_url(url)
        store = RedisDigestStore(client)
        await store.take(route, "change", 5, 60, time.time())
        key = f"{PREFIX}rate:{hashlib.sha1(route.encode()).hexdigest()}"
        assert 59_000 < await client.pttl(key) <= 60_000
        # A take within the period keeps its end.
        await store.take(route, "another change", 5, 60, time.time())
        assert 58_000 < await client.pttl(key) <= 60_000
        assert [k async for k in client.scan_iter("*rate*")] == [key.encode()]
        await store.aclose()

    with redis_server(tmp_path) as url:
        asyncio.run(scenario(url))


def test_renew_extends_a_live_lease_and_refuses_an_expired_one(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        window = (await store.add("r", 60, 10, item(1), NOW)).window_id
        lease = leased(await store.claim(window, 30, NOW + 60))
        assert lease.expires == pytest.approx(NOW + 90)
        renewed = await store.renew(window, lease.token, 30, NOW + 80)
        assert renewed is not None
        assert renewed.token == lease.token
        assert renewed.expires == pytest.approx(NOW + 110)
        assert await store.claim(window, 30, NOW + 100) is Claim.IN_FLIGHT  # still held
        assert await store.due(NOW + 100, 10) == []
        # Past the renewed lease nobody took it over yet, but the holder may not send now.
        assert await store.renew(window, lease.token, 30, NOW + 111) is None

    run(opener, scenario)


def test_a_stale_sender_cannot_renew_or_release_and_its_complete_stops_the_new_one(
    opener: Opener,
) -> None:
    async def scenario(store: DigestStore) -> None:
        window = (await store.add("r", 60, 10, item(1), NOW)).window_id
        stale = leased(await store.claim(window, 30, NOW + 60))
        current = leased(await store.claim(window, 30, NOW + 95))  # the first lease ran out
        assert current.token > stale.token
        assert await store.renew(window, stale.token, 30, NOW + 96) is None
        await store.release(window, stale.token, NOW + 96)
        assert await store.claim(window, 30, NOW + 96) is Claim.IN_FLIGHT
        # The stale sender's digest went out after all: done, and the takeover reported.
        assert await store.complete(window, stale.token, NOW + 97) is False
        assert await store.renew(window, current.token, 30, NOW + 97) is None
        assert await store.claim(window, 30, NOW + 98) is Claim.DONE
        assert await store.complete(window, current.token, NOW + 98) is False
        assert await store.complete(window, stale.token, NOW + 98) is False  # a retry

    run(opener, scenario)


def test_a_change_that_took_an_email_takes_it_again_without_counting(opener: Opener) -> None:
    async def scenario(store: DigestStore) -> None:
        assert await store.take("r", "c1", 2, 60, NOW) == Taken(True, NOW + 60, 1)
        # Its first delivery failed after the take: the redelivery is not counted again.
        assert await store.take("r", "c1", 2, 60, NOW + 1) == Taken(True, NOW + 60, 1, True)
        assert await store.take("r", "c2", 2, 60, NOW + 2) == Taken(True, NOW + 60, 2)
        assert await store.take("r", "c2", 2, 60, NOW + 3) == Taken(True, NOW + 60, 2, True)
        assert await store.take("r", "c3", 2, 60, NOW + 4) == Taken(False, NOW + 60, 2)
        assert await store.take("other", "c1", 2, 60, NOW + 5) == Taken(True, NOW + 65, 1)
        # A new period forgets who took what.
        assert await store.take("r", "c1", 2, 60, NOW + 61) == Taken(True, NOW + 121, 1)

    run(opener, scenario)


def test_overflow_joins_the_digest_and_marks_the_email_keys_done_together(store_url: str) -> None:
    async def scenario() -> None:
        claims = open_store(store_url)
        windows = open_digest_store(store_url, claims=claims)
        try:
            keys = ["route:r:change-acme-1-f#0", "route:r:change-acme-1-f#1"]
            held = [leased(await claims.claim(key, 60)) for key in keys]
            added = await windows.overflow("r", 300, 10, item(1), NOW, keys)
            assert (added.opened, added.duplicate, added.leading) == (True, False, False)
            for key, lease in zip(keys, held, strict=True):
                assert await claims.claim(key, 60) is Claim.DONE
                assert await claims.renew(key, lease.token, 60) is None
                await claims.release(key, lease.token)  # no effect on a done key
                assert await claims.claim(key, 60) is Claim.DONE
            window = await windows.read(added.window_id)
            assert window.summary.items == [item(1)]
            # Delivered again: already in the digest, counted once, its keys still done.
            again = await windows.overflow("r", 300, 10, item(1), NOW + 1, keys)
            assert (again.window_id, again.duplicate) == (added.window_id, True)
            assert (await windows.read(added.window_id)).summary.count == 1
            other = await windows.overflow("r", 300, 10, item(2), NOW + 2, ["route:r:2"])
            assert (other.window_id, other.duplicate) == (added.window_id, False)
            assert await claims.claim("route:r:2", 60) is Claim.DONE
        finally:
            await windows.aclose()
            await claims.aclose()

    asyncio.run(scenario())
