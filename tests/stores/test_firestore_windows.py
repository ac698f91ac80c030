"""What the Firestore digest store promises beyond the contract suite (tests/stores/test_windows.py
runs that against the emulator too): the closing race settled by commit times and read at the
closing time, many instances adding to one route at once, recovery from a crash between steps,
a rate overflow that joins its digest and marks its keys done in one step or not at all, windows
of any size read without reading their events, windows of the layout before shards, `expire_at`
for Firestore's TTL policy, and a bounded wait for an endpoint that does not answer."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.cloud.firestore import DELETE_FIELD, AsyncClient, AsyncDocumentReference, AsyncQuery
from google.cloud.firestore_v1.async_aggregation import AsyncAggregationQuery

from app.digests.window import DigestItem, DigestSummary
from app.events.models import EventType
from app.stores import firestore_windows
from app.stores.base import Claim, Lease, StoreUnavailable
from app.stores.firestore import (
    OPERATION_SECONDS,
    WINDOW_READ_SECONDS,
    FirestoreClient,
    FirestoreLocation,
    claims_collection,
    digest_changes_collection,
    digest_event_shard_collection,
    digest_rates_collection,
    digest_routes_collection,
    digest_windows_collection,
    document_id,
)
from app.stores.firestore_claims import FirestoreStore
from app.stores.firestore_windows import (
    EVENT_KEEP_SECONDS,
    FirestoreDigestStore,
    event_fields,
    event_shard,
)
from app.stores.memory import MemoryDigestStore
from app.stores.windows import Added, WindowState, change_digest
from tests import factories
from tests.servers import free_port
from tests.stores.test_windows import NOW, T0, item

pytest_plugins = ["tests.firestore_emulator"]
log = logging.getLogger(__name__)


class Crash(Exception):
    """The process dies here (nothing after this point of the add runs)."""


class PausingStore(FirestoreDigestStore):
    """Stops its first add (or overflow) at a step until the test lets it go on, or crashes it
    there."""

    def __init__(self, location: FirestoreLocation, step: str, crash_after: bool = False) -> None:
        super().__init__(location)
        self.step = step
        self.crash_after = crash_after
        self.reached = asyncio.Event()
        self.go_on = asyncio.Event()

    async def _pause(self, step: str) -> None:
        if step == self.step and not self.reached.is_set():
            self.reached.set()
            await self.go_on.wait()

    async def _before_join(self, window: str) -> None:
        await self._pause("before join")

    async def _after_join(self, window: str) -> None:
        if self.crash_after:
            raise Crash(window)
        await self._pause("after join")


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def leased(answer: Lease | Claim) -> Lease:
    assert isinstance(answer, Lease), answer
    return answer


async def documents(location: FirestoreLocation) -> dict[str, dict[str, Any]]:
    """Every document the stores wrote, by path, read with a client of the test's own."""
    firestore = FirestoreClient(location)
    client = await firestore.get()
    found: dict[str, dict[str, Any]] = {}

    async def walk(parent: AsyncClient | AsyncDocumentReference) -> None:
        async for collection in parent.collections():
            async for reference in collection.list_documents():
                snap = await reference.get()
                if snap.exists:
                    found[reference.path] = snap.to_dict() or {}
                await walk(reference)

    await walk(client)
    await firestore.aclose()
    return found


def window_path(location: FirestoreLocation, window: str) -> str:
    return f"{digest_windows_collection(location.prefix)}/{document_id(window)}"


def event_path(location: FirestoreLocation, window: str, change_key: str) -> str:
    key = change_digest("r", change_key).hex()
    events = digest_event_shard_collection(location.prefix, event_shard(key))
    return f"{window_path(location, window)}/{events}/{key}"


def test_an_event_landing_after_the_claim_joins_the_next_window(firestore_url: str) -> None:
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        flusher = FirestoreDigestStore(location)
        adder = PausingStore(location, "before join")
        first = await flusher.add("r", 60, 10, item(1), NOW)
        # The adder has read the route (window `first` open) but not yet written its event.
        late = asyncio.create_task(adder.add("r", 60, 10, item(2), NOW + 60.1))
        await adder.reached.wait()
        leased(await flusher.claim(first.window_id, 30, NOW + 60))
        adder.go_on.set()
        added = await late
        assert added.window_id != first.window_id
        assert (added.opened, added.duplicate) == (True, False)
        assert added.previous_closed_at == pytest.approx(NOW + 60)
        assert (await flusher.read(first.window_id)).summary.items == [item(1)]
        assert (await flusher.read(added.window_id)).summary.items == [item(2)]
        assert [(p.window_id, p.events) for p in await flusher.pending(NOW + 61)] == [
            (first.window_id, 1),
            (added.window_id, 1),
        ]
        assert (await flusher.add("r", 60, 10, item(2), NOW + 62)).duplicate
        await flusher.aclose()
        await adder.aclose()
        # Moved, not copied: no event of it is left behind in the closed window.
        assert event_path(location, first.window_id, item(2).change_key) not in (
            await documents(location)
        )

    run(scenario)


def test_an_event_landed_before_the_claim_stays_in_the_claimed_window(firestore_url: str) -> None:
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        flusher = FirestoreDigestStore(location)
        adder = PausingStore(location, "after join")
        first = await flusher.add("r", 60, 10, item(1), NOW)
        # The adder's event is written; it has not yet read its window back.
        joining = asyncio.create_task(adder.add("r", 60, 10, item(2), NOW + 59.9))
        await adder.reached.wait()
        leased(await flusher.claim(first.window_id, 30, NOW + 60))
        sent = await flusher.read(first.window_id)  # what the flush sends
        assert sent.summary.items == [item(1), item(2)]
        adder.go_on.set()
        added = await joining
        assert (added.window_id, added.opened, added.duplicate) == (first.window_id, False, False)
        assert (await flusher.read(first.window_id)).summary == sent.summary
        after = await flusher.add("r", 60, 10, item(3), NOW + 61)
        assert after.opened
        assert (await flusher.read(after.window_id)).summary.items == [item(3)]
        await flusher.aclose()
        await adder.aclose()

    run(scenario)


async def left_behind_by_a_crash(location: FirestoreLocation, flusher: FirestoreDigestStore) -> str:
    """A window holding item(1), closed by a claim, with item(2) landed after the close by an
    adder that crashed before moving it: in the window's events, not in its digest."""
    crashing = PausingStore(location, "before join", crash_after=True)
    first = await flusher.add("r", 60, 10, item(1), NOW)
    late = asyncio.create_task(crashing.add("r", 60, 10, item(2), NOW + 60.1))
    await crashing.reached.wait()
    leased(await flusher.claim(first.window_id, 30, NOW + 60))
    crashing.go_on.set()
    with pytest.raises(Crash):  # after its event landed in the closed window, before moving
        await late
    await crashing.aclose()
    return first.window_id


def test_an_event_left_uncounted_by_a_crash_joins_again_when_redelivered(
    firestore_url: str,
) -> None:
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        flusher = FirestoreDigestStore(location)
        first = await left_behind_by_a_crash(location, flusher)
        assert event_path(location, first, item(2).change_key) in await documents(location)
        # Left behind, but not in the closed window's digest (read at its closing time)...
        assert (await flusher.read(first)).summary.items == [item(1)]
        assert [p.events for p in await flusher.pending(NOW + 61)] == [1]
        # ... and not a duplicate: the redelivery joins the route's next window.
        again = await flusher.add("r", 60, 10, item(2), NOW + 70)
        assert (again.duplicate, again.opened) == (False, True)
        assert (await flusher.read(again.window_id)).summary.items == [item(2)]
        assert (await flusher.add("r", 60, 10, item(2), NOW + 71)).duplicate
        lease = leased(await flusher.claim(first, 30, NOW + 95))
        assert await flusher.complete(first, lease.token, NOW + 96)
        assert (await flusher.read(first)).summary.items == [item(1)]
        await flusher.aclose()
        assert event_path(location, first, item(2).change_key) not in await documents(location)

    run(scenario)


def test_a_closed_window_read_once_keeps_its_exact_summary_past_the_hour(
    firestore_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Firestore reads at a past time only within the hour: the first read after the close
    stores the summary; without one, past the hour, the window is read as it is now, which
    counts an event that landed late and was not moved, and says so."""
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        flusher = FirestoreDigestStore(location)
        first = await left_behind_by_a_crash(location, flusher)
        sent = await flusher.read(first)  # the flush's read, within the hour: stored
        stored = (await documents(location))[window_path(location, first)]
        assert stored["events"] == 1
        assert isinstance(stored["summary"], bytes)
        monkeypatch.setattr(firestore_windows, "READ_TIME_REACH", timedelta(0))
        assert (await flusher.read(first)).summary == sent.summary
        assert [p.events for p in await flusher.pending(NOW + 61)] == [1]
        # The same window without its stored summary, as after a flush that never read it.
        firestore = FirestoreClient(location)
        client = await firestore.get()
        path = window_path(location, first)
        await client.document(path).update({"summary": DELETE_FIELD, "events": DELETE_FIELD})
        await firestore.aclose()
        with caplog.at_level(logging.WARNING, logger=firestore_windows.__name__):
            late = await flusher.read(first)
        assert late.summary.count == 2
        assert "closed too long ago" in caplog.text
        await flusher.aclose()

    run(scenario)


def test_a_change_whose_event_is_missing_joins_again(firestore_url: str) -> None:
    """The store writes a change and its event in one batch; a change found without its event
    (deleted by hand here) is joined again, not taken for a duplicate and lost."""
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        store = FirestoreDigestStore(location)
        window = (await store.add("r", 60, 10, item(1), NOW)).window_id
        await store.add("r", 60, 10, item(2), NOW + 1)
        firestore = FirestoreClient(location)
        client = await firestore.get()
        await client.document(event_path(location, window, item(2).change_key)).delete()
        await firestore.aclose()
        assert (await store.read(window)).summary.items == [item(1)]
        again = await store.add("r", 60, 10, item(2), NOW + 2)
        assert (again.window_id, again.duplicate) == (window, False)
        assert (await store.read(window)).summary.items == [item(1), item(2)]
        assert (await store.add("r", 60, 10, item(2), NOW + 3)).duplicate
        await store.aclose()

    run(scenario)


def test_two_instances_adding_at_once_share_one_window_and_count_each_change_once(
    firestore_url: str,
) -> None:
    location = FirestoreLocation.parse(firestore_url)
    changes = 200

    async def scenario() -> None:
        one, two = FirestoreDigestStore(location), FirestoreDigestStore(location)
        # Every change delivered twice, once to each instance, all at the same time.
        results = await asyncio.gather(
            *(
                store.add("r", 60, 1000, item(n), NOW + n / 1000)
                for n in range(changes)
                for store in (one, two)
            )
        )
        assert len({added.window_id for added in results}) == 1
        assert [added.opened for added in results].count(True) == 1
        firsts = [results[2 * n].duplicate + results[2 * n + 1].duplicate for n in range(changes)]
        assert firsts == [1] * changes  # of each pair, one joined and one was the duplicate
        window = await one.read(results[0].window_id)
        assert window.info.events == changes
        assert sorted(window.summary.items, key=lambda i: i.name) == sorted(
            (item(n) for n in range(changes)), key=lambda i: i.name
        )
        assert [p.events for p in await two.pending(NOW)] == [changes]
        await one.aclose()
        await two.aclose()

    run(scenario)


def test_adders_racing_a_flush_put_every_change_in_exactly_one_digest(firestore_url: str) -> None:
    """Two instances add 300 changes, many at once, while a third closes the window in the
    middle: each change is in exactly one window's digest, read at that window's closing time."""
    location = FirestoreLocation.parse(firestore_url)
    changes = 300

    async def scenario() -> None:
        adders = [FirestoreDigestStore(location) for _ in range(2)]
        flusher = FirestoreDigestStore(location)
        first = await flusher.add("r", 60, 1000, item(0), NOW)
        done = 0
        halfway = asyncio.Event()
        limit = asyncio.Semaphore(24)

        async def add(n: int) -> Added:
            nonlocal done
            async with limit:
                added = await adders[n % 2].add("r", 60, 1000, item(n), NOW + 1)
            done += 1
            if done == changes // 2:
                halfway.set()
            return added

        async def flush() -> Lease:
            await halfway.wait()
            return leased(await flusher.claim(first.window_id, 30, NOW + 60))

        adding = asyncio.gather(*(add(n) for n in range(1, changes)))
        added, _ = await asyncio.gather(adding, flush())
        windows = {first.window_id} | {a.window_id for a in added}
        assert 2 <= len(windows) <= 3  # the closed one and the next (opened once, or twice)
        seen: list[str] = []
        for window in windows:
            digest = await flusher.read(window)
            assert digest.info.events == digest.summary.count == len(digest.summary.items)
            seen += [i.change_key for i in digest.summary.items]
        assert sorted(seen) == sorted(item(n).change_key for n in range(changes))
        claimed = await flusher.read(first.window_id)
        assert claimed.info.state is WindowState.SENDING
        assert 0 < claimed.summary.count < changes
        by_window = {p.window_id: p.events for p in await flusher.pending(NOW + 61)}
        assert sum(by_window.values()) == changes
        for store in (*adders, flusher):
            await store.aclose()

    run(scenario)


def test_a_change_is_forgotten_after_the_retention(firestore_url: str) -> None:
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        store = FirestoreDigestStore(location, retention_seconds=100)
        first = await store.add("r", 60, 10, item(1), NOW)
        lease = leased(await store.claim(first.window_id, 30, NOW + 60))
        await store.complete(first.window_id, lease.token, NOW + 61)
        assert (await store.add("r", 60, 10, item(1), NOW + 99)).duplicate
        # Firestore's TTL deletes a day late at worst; the store reads `expire_at` itself.
        later = await store.add("r", 60, 10, item(1), NOW + 101)
        assert not later.duplicate
        assert later.window_id != first.window_id
        assert (await store.read(later.window_id)).summary.items == [item(1)]
        await store.aclose()

    run(scenario)


def test_every_document_that_must_go_carries_expire_at(firestore_url: str) -> None:
    location = FirestoreLocation.parse(firestore_url)
    retention = 1000.0

    def at(seconds: float) -> datetime:
        return datetime.fromtimestamp(seconds, UTC)

    async def scenario() -> None:
        store = FirestoreDigestStore(location, retention_seconds=retention)
        sent = await store.add("r", 60, 10, item(1), NOW, leading_after=300)  # leading
        await store.add("r", 60, 10, item(2), NOW + 1, leading_after=300)
        lease = leased(await store.claim(sent.window_id, 30, NOW + 60))
        await store.complete(sent.window_id, lease.token, NOW + 61)
        waiting = await store.add("r", 60, 10, item(3), NOW + 62)
        await store.take("rated", "change", 5, 3600, NOW)
        await store.aclose()
        found = await documents(location)
        prefix = location.prefix
        kinds: dict[str, list[dict[str, Any]]] = {}
        shard_of_events = re.compile(rf"(?<=/{re.escape(prefix)}-digest-events-)\d+(?=/)")
        for path, fields in found.items():
            parts = shard_of_events.sub("N", path).split("/")
            kinds.setdefault("/".join(parts[0:-1:2]), []).append(fields)
        windows, rates = digest_windows_collection(prefix), digest_rates_collection(prefix)
        changes = digest_changes_collection(prefix)
        events = f"{windows}/{prefix}-digest-events-N"  # one collection group per shard
        assert sorted(kinds) == sorted(
            [
                digest_routes_collection(prefix),
                windows,
                events,
                changes,
                rates,
                f"{rates}/{changes}",
            ]
        )
        assert sorted(c["expire_at"] for c in kinds[changes]) == [
            at(NOW + retention),
            at(NOW + 1 + retention),
            at(NOW + 62 + retention),
        ]
        assert len(kinds[events]) == 2  # the leading change is sent alone, not an event
        assert all(isinstance(e["expire_at"], datetime) for e in kinds[events])
        assert min(e["expire_at"] for e in kinds[events]) >= at(
            NOW + 60 + retention + EVENT_KEEP_SECONDS
        )
        done = found[window_path(location, sent.window_id)]
        assert (done["state"], done["expire_at"]) == (WindowState.DONE, at(NOW + 61 + retention))
        assert done["done_by"] == lease.token
        assert "ready_at" not in done  # out of `due`'s index
        open_one = found[window_path(location, waiting.window_id)]
        assert open_one["state"] == WindowState.OPEN
        assert "expire_at" not in open_one  # a pending window never expires
        [rate] = kinds[rates]
        assert rate["expire_at"] == at(NOW + 3600)
        [taker] = kinds[f"{rates}/{changes}"]  # the change that took an email of the period
        assert taker == {"end": NOW + 3600, "expire_at": at(NOW + 3600)}

    run(scenario)


def test_two_flushes_on_two_instances_claim_a_window_once(firestore_url: str) -> None:
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        one, two = FirestoreDigestStore(location), FirestoreDigestStore(location)
        window = (await one.add("r", 60, 10, item(1), NOW)).window_id
        for n in range(2, 7):
            await one.add("r", 60, 10, item(n), NOW + 1)

        async def flush_all(at: float) -> list[Lease | Claim]:
            return await asyncio.gather(
                *((one, two)[n % 2].claim(window, 30, at) for n in range(20))
            )

        claims = await flush_all(NOW + 60)  # closing the open window
        assert sum(isinstance(claim, Lease) for claim in claims) == 1
        assert claims.count(Claim.IN_FLIGHT) == 19
        claims = await flush_all(NOW + 90)  # taking over from a sender whose lease ran out
        assert sum(isinstance(claim, Lease) for claim in claims) == 1
        assert claims.count(Claim.IN_FLIGHT) == 19
        assert (await two.read(window)).info.state is WindowState.SENDING
        assert (await two.add("r", 60, 10, item(9), NOW + 61)).window_id != window
        await one.aclose()
        await two.aclose()

    run(scenario)


def test_a_change_takes_an_email_of_a_period_once(firestore_url: str) -> None:
    """Who took an email is remembered per change, beside the period, not in its document."""
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        one, two = FirestoreDigestStore(location), FirestoreDigestStore(location)
        takes = await asyncio.gather(
            *((one, two)[n % 2].take("r", "same change", 3, 60, NOW) for n in range(10))
        )
        assert sorted(t.again for t in takes) == [False] + [True] * 9
        assert {(t.allowed, t.used) for t in takes} == {(True, 1)}
        assert (await one.take("r", "other", 3, 60, NOW + 1)).used == 2
        await one.aclose()
        await two.aclose()

    run(scenario)


# --- the rate overflow: one step ------------------------------------------------------------


def test_an_overflow_that_fails_writes_neither_the_event_nor_the_done_marks(
    firestore_url: str,
) -> None:
    """A precondition of the overflow's commit fails (the event's document exists already, as
    a writer that got there first would leave it): nothing of it is written, done marks included,
    and the delivery is answered StoreUnavailable to be delivered again."""
    location = FirestoreLocation.parse(firestore_url)
    keys = ["route:r:change-acme-1-f#0", "route:r:change-acme-1-f#1"]

    async def scenario() -> None:
        store = FirestoreDigestStore(location)
        claims = FirestoreStore(location)
        firestore = FirestoreClient(location)
        client = await firestore.get()
        key = change_digest("r", item(1).change_key).hex()
        planted = store.event_reference(client, f"r:{int(NOW * 1000)}", key)
        await planted.create({"planted": True})
        with pytest.raises(StoreUnavailable, match="overflow kept conflicting"):
            await store.overflow("r", 300, 10, item(1), NOW, keys)
        for done_key in keys:
            leased(await claims.claim(done_key, 60))
        found = await documents(location)
        assert set(found) == {planted.path} | {
            f"{claims_collection(location.prefix)}/{document_id(k)}" for k in keys
        }
        assert all(found[path]["state"] == "claimed" for path in found if path != planted.path)
        await firestore.aclose()
        await claims.aclose()
        await store.aclose()

    run(scenario)


def test_an_overflow_racing_a_close_is_in_the_digest_of_the_window_it_joined(
    firestore_url: str,
) -> None:
    """The overflow reads the route in its transaction, so the close cannot commit between that
    read and the join: the event is counted in the window it joined (here the closing window,
    which waits for it), never left uncounted with its keys done."""
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        flusher = FirestoreDigestStore(location)
        overflowing = PausingStore(location, "before join")
        claims = FirestoreStore(location)
        first = await flusher.add("r", 60, 10, item(1), NOW)
        joining = asyncio.create_task(
            overflowing.overflow("r", 60, 10, item(2), NOW + 59.9, ["route:r:2"])
        )
        await overflowing.reached.wait()
        closing = asyncio.create_task(flusher.claim(first.window_id, 30, NOW + 60))
        await asyncio.sleep(0.3)
        overflowing.go_on.set()
        added = await joining
        leased(await closing)
        assert await claims.claim("route:r:2", 60) is Claim.DONE
        digests = {
            window: (await flusher.read(window)).summary.items
            for window in {first.window_id, added.window_id}
        }
        assert sum(item(2) in items for items in digests.values()) == 1
        assert item(2) in digests[added.window_id]
        for store in (flusher, overflowing):
            await store.aclose()
        await claims.aclose()

    run(scenario)


# --- windows of any size ---------------------------------------------------------------------


def bulk_item(n: int) -> DigestItem:
    return factories.bulk_item(n, T0)


async def fill(
    store: FirestoreDigestStore, client: AsyncClient, window: str, items: list[DigestItem]
) -> None:
    """Write events straight into a window's shards with the store's own event documents, 500
    to a batch (an add per event would take minutes)."""
    base = time.time_ns() // 1000
    expire_at = datetime.now(UTC) + timedelta(days=1)
    limit = asyncio.Semaphore(4)

    async def write(start: int) -> None:
        batch = client.batch()
        for n, event in enumerate(items[start : start + 500], start):
            key = change_digest("r", event.change_key).hex()
            batch.set(
                store.event_reference(client, window, key),
                event_fields(event, base + n, expire_at),
            )
        async with limit:
            await batch.commit()

    await asyncio.gather(*(write(start) for start in range(0, len(items), 500)))


def peak_rss_reset() -> bool:
    """Resets the process's peak resident set size (Linux: 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_window_of_60000_events_is_read_exactly_in_bounded_memory(firestore_url: str) -> None:
    """Issue 18: a flush's read of 60,000 events (the claimed window, at its closing time) with
    under 64 MiB more memory (reading every event took about 3 KB each), and its counts, bytes,
    times, prefix, buckets and first items exact. Its time is only held to the read's own bound
    here (a loaded machine may take long); `make bench` measures it against its target, 10 s."""
    location = FirestoreLocation.parse(firestore_url)
    events = 60_000
    items = [bulk_item(n) for n in range(events)]

    async def scenario() -> None:
        started = time.perf_counter()
        store = FirestoreDigestStore(location)
        window = (await store.add("r", 300, 100, items[0], NOW)).window_id
        firestore = FirestoreClient(location)
        await fill(store, await firestore.get(), window, items[1:])
        filled = time.perf_counter()
        expected = DigestSummary.empty(100)
        for event in items:
            expected.add(event)
        # What GET /digests shows before the flush, and the open window read as it is: exact
        # too. (The emulator's JVM compiles its query code during these first queries: seconds
        # that a flush on a running emulator does not pay, kept out of the read measured.)
        assert [(p.window_id, p.events) for p in await store.pending(NOW + 300)] == [
            (window, events)
        ]
        opened = time.perf_counter()
        assert (await store.read(window)).summary == expected
        open_read = time.perf_counter() - opened
        leased(await store.claim(window, 60, NOW + 300))
        rss_reset = peak_rss_reset()
        rss_before = peak_rss_mib()
        tracemalloc.start()
        reading = time.perf_counter()
        digest = await store.read(window)
        read_seconds = time.perf_counter() - reading
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_growth = peak_rss_mib() - rss_before
        measured = {
            "fill_s": round(filled - started, 1),
            "open_read_s": round(open_read, 2),
            "read_s": round(read_seconds, 2),
            "traced_peak_mib": round(peak / 2**20, 1),
            "rss_growth_mib": round(rss_growth, 1) if rss_reset else None,
            "total_s": round(time.perf_counter() - started, 1),
        }
        log.info("60,000-event window: %s", measured, extra=measured)
        assert digest.summary == expected
        assert (digest.summary.count, digest.summary.prefix) == (events, "bulk/")
        assert digest.summary.buckets == ["uploads", "archive"]
        assert read_seconds < WINDOW_READ_SECONDS
        assert peak < 64 * 2**20
        if rss_reset:
            assert rss_growth < 64
        assert [(p.window_id, p.events) for p in await store.pending(NOW + 301)] == [
            (window, events)
        ]
        await firestore.aclose()
        await store.aclose()

    run(scenario)


@dataclass
class EventReads:
    """What queries on event collections did: the ids of the event documents they streamed
    (aggregations stream none), and how many queries (streamed or aggregated) each shard took."""

    documents: list[str] = field(default_factory=list)
    queries: Counter[str] = field(default_factory=Counter)

    def clear(self) -> None:
        self.documents.clear()
        self.queries.clear()

    def most_queries_in_a_shard(self) -> int:
        return max(self.queries.values(), default=0)


def _of_events(query: Any) -> bool:
    return re.search(r"-digest-events(-\d+)?$", query._parent.id) is not None


@pytest.fixture
def event_reads(monkeypatch: pytest.MonkeyPatch) -> EventReads:
    reads = EventReads()
    stream, aggregate = AsyncQuery.stream, AsyncAggregationQuery.get

    async def streamed(self: AsyncQuery, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        if _of_events(self):
            reads.queries[self._parent.id] += 1
        async for document in stream(self, *args, **kwargs):
            if _of_events(self):
                reads.documents.append(document.id)
            yield document

    async def aggregated(self: AsyncAggregationQuery, *args: Any, **kwargs: Any) -> Any:
        if _of_events(self._nested_query):
            reads.queries[self._nested_query._parent.id] += 1
        return await aggregate(self, *args, **kwargs)

    monkeypatch.setattr(AsyncQuery, "stream", streamed)
    monkeypatch.setattr(AsyncAggregationQuery, "get", aggregated)
    return reads


def test_reading_a_window_and_pending_never_stream_its_events(
    firestore_url: str, event_reads: EventReads
) -> None:
    """A window of 3,000 events of one bucket and folder: pending counts them (one aggregation
    a shard), a read streams its first items and a few single documents, from six queries a
    shard whatever the window's size (module doc), and a second page of the first items from a
    shard that holds more of them than a page."""
    location = FirestoreLocation.parse(firestore_url)
    items = [bulk_item(n) for n in range(3000)]

    async def scenario() -> None:
        store = FirestoreDigestStore(location)
        window = (await store.add("r", 300, 10, items[0], NOW)).window_id
        firestore = FirestoreClient(location)
        await fill(store, await firestore.get(), window, items[1:])
        await firestore.aclose()
        event_reads.clear()
        assert [p.events for p in await store.pending(NOW)] == [3000]
        assert event_reads.documents == []
        assert event_reads.most_queries_in_a_shard() == 1
        event_reads.clear()
        assert (await store.read(window)).summary.count == 3000  # open: as it is now
        # The first 20 by arrival (8 shards' pages of 8) and a few single documents.
        assert len(event_reads.documents) < 120
        # Six a shard, and one shard's second page: it holds 8 of the first 20.
        assert sorted(event_reads.queries.values()) == [6] * 7 + [7]
        event_reads.clear()
        leased(await store.claim(window, 60, NOW + 300))
        assert (await store.read(window)).summary.count == 3000  # closed: at its closing time
        assert len(event_reads.documents) < 120
        assert sorted(event_reads.queries.values()) == [6] * 7 + [7]
        event_reads.clear()
        assert (await store.read(window)).summary.count == 3000  # its stored summary
        assert [p.events for p in await store.pending(NOW + 300)] == [3000]
        assert event_reads.queries == Counter()
        await store.aclose()

    run(scenario)


def varied(n: int, rng: random.Random) -> DigestItem:
    """Events that test the summary's every edge: buckets first seen late and out of name order,
    names leaving the first events' folder at different depths, times earlier than any listed."""
    kinds = list(EventType)
    bucket = (
        "main" if n < 60 else rng.choice(["main", "b", "a", "z-late", *(f"x{i}" for i in range(8))])
    )
    folder = "data/2024/q1/" if n < 60 else rng.choice(["data/2024/q1/", "data/2024/q2/", "data/x"])
    return DigestItem(
        change_key=f"varied-{n}",
        event_type=rng.choice(kinds),
        bucket=bucket,
        name=f"{folder}{rng.randrange(10**6)}",
        size=rng.choice([None, 0, 2**40 + n]),
        time=None if rng.random() < 0.1 else T0 + timedelta(seconds=rng.uniform(-1000, 1000)),
        content_type=None,
    )


@pytest.mark.parametrize("max_items", [0, 5, 150])
def test_summaries_are_the_memory_stores(firestore_url: str, max_items: int) -> None:
    """The same adds into Firestore and the memory store (the reference) give equal summaries,
    open and at the close: buckets in order of first appearance, prefix, times, counts."""
    location = FirestoreLocation.parse(firestore_url)
    rng = random.Random(18)
    items = [varied(n, rng) for n in range(150)]

    async def scenario() -> None:
        store = FirestoreDigestStore(location)
        memory = MemoryDigestStore()
        for n, event in enumerate(items):
            added = await store.add("r", 300, max_items, event, NOW + n / 1000)
            await memory.add("r", 300, max_items, event, NOW + n / 1000)
        expected = (await memory.read(added.window_id)).summary
        assert len(expected.buckets) > 10
        assert (await store.read(added.window_id)).summary == expected
        leased(await store.claim(added.window_id, 60, NOW + 300))
        assert (await store.read(added.window_id)).summary == expected
        await store.aclose()

    run(scenario)


def test_more_than_max_buckets_count_the_others(firestore_url: str) -> None:
    location = FirestoreLocation.parse(firestore_url)
    items = [
        DigestItem(f"c{n}", EventType.FINALIZED, f"bucket-{n % 26:02d}", f"f/{n}", 1, None, None)
        for n in range(80)
    ]

    async def scenario() -> None:
        store = FirestoreDigestStore(location)
        memory = MemoryDigestStore()
        for n, event in enumerate(items):
            added = await store.add("r", 300, 3, event, NOW + n / 1000)
            await memory.add("r", 300, 3, event, NOW + n / 1000)
        expected = (await memory.read(added.window_id)).summary
        # bucket-00 and -01 hold 4 events, the others 3: 18 in the six past the first 20.
        assert expected.other_bucket_events == 18
        assert (await store.read(added.window_id)).summary == expected
        await store.aclose()

    run(scenario)


def late(bucket: str, name: str, n: int) -> DigestItem:
    return DigestItem(f"late-{n}", EventType.DELETED, bucket, name, None, None, None)


# After 25 events of one bucket and folder (more than a summary's first events show), events
# the walk must find: buckets and names at the edges of the ranges it checks.
LATE_EVENTS = {
    "late buckets, a sibling folder": [
        ("main-2", "logs/2024/zz"),
        ("a b", "logs/2024/x"),
        ("b/x", "logs/2024/y"),
        ("mai", "logs/2024/\U0001f600"),
        ("main", "logs/20240.csv"),
        ("main-2", "logs/2024"),
    ],
    "all under the first folder": [
        ("main", "logs/2024/\U0001f600"),
        ("main", "logs/2024/\uffff"),
        ("main", "logs/2024/"),
        ("main", "logs/2024/a/b/c"),
    ],
    "one bucket, a name past the first folder": [
        ("main", "logs/2024/\uffff"),
        ("main", "logs/2025/x"),
    ],
    "one bucket, a name before the first folder": [
        ("main", "logs/2024/\U0001f600"),
        ("main", "logs/2024"),
    ],
    "more buckets than a summary lists": [
        (f"late-{(n * 7) % 26:02d}", f"logs/2024/{n}") for n in range(30)
    ],
}


@pytest.mark.parametrize("late_events", LATE_EVENTS.values(), ids=LATE_EVENTS.keys())
@pytest.mark.parametrize("walk", ["walked", "too many steps"])
def test_buckets_and_folders_the_first_events_do_not_show_are_found(
    firestore_url: str,
    late_events: list[tuple[str, str]],
    walk: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A window of one bucket is summed up from its least and greatest `place`, with no walk;
    the walk of `place` finds every bucket and every name outside the first events' folder,
    however they sort against those (percent-encoded buckets, names past U+F8FF, a name that
    is the folder itself); a walk cut short falls back to the names' least and greatest and
    each shard's buckets, exactly too."""
    location = FirestoreLocation.parse(firestore_url)
    if walk == "too many steps":
        monkeypatch.setattr(firestore_windows, "_MOST_PLACE_STEPS", 1)
    items = [
        *(DigestItem(f"c{n}", EventType.FINALIZED, "main", f"logs/2024/{n:03d}", n, None, None)
          for n in range(25)),
        *(late(bucket, name, n) for n, (bucket, name) in enumerate(late_events)),
    ]  # fmt: skip

    async def scenario() -> None:
        store = FirestoreDigestStore(location)
        memory = MemoryDigestStore()
        for n, event in enumerate(items):
            added = await store.add("r", 300, 2, event, NOW + n / 1000)
            await memory.add("r", 300, 2, event, NOW + n / 1000)
        expected = (await memory.read(added.window_id)).summary
        with caplog.at_level(logging.WARNING, logger=firestore_windows.__name__):
            assert (await store.read(added.window_id)).summary == expected
        walked = len({"main", *(bucket for bucket, _ in late_events)}) > 1
        assert ("more buckets and folders than its summary walks" in caplog.text) == (
            walked and walk == "too many steps"
        )
        await store.aclose()

    run(scenario)


# --- windows written before the shards -----------------------------------------------------


def test_windows_of_the_layout_before_shards_still_read(firestore_url: str) -> None:
    """A window opened by the version before shards keeps its events under itself, its claims
    name an `owner`: it is read, counted, joined, claimed and completed all the same."""
    location = FirestoreLocation.parse(firestore_url)
    window = f"r:{int(NOW * 1000)}"

    async def scenario() -> None:
        firestore = FirestoreClient(location)
        client = await firestore.get()
        prefix = location.prefix
        store = FirestoreDigestStore(location)
        await (
            client.collection(digest_routes_collection(prefix))
            .document(document_id("r"))
            .set(
                {
                    "route": "r",
                    "open": window,
                    "last_opened_ms": int(NOW * 1000),
                    "last_closed_at": None,
                }
            )
        )
        window_ref = client.collection(digest_windows_collection(prefix)).document(
            document_id(window)
        )
        await window_ref.set(
            {"id": window, "route": "r", "opened_at": NOW, "due_at": NOW + 60, "state": "open",
             "ready_at": NOW + 60, "pending": True, "max_items": 10, "leading": None}
        )  # fmt: skip
        for n in (1, 2):
            key = change_digest("r", item(n).change_key).hex()
            expire_at = datetime.now(UTC) + timedelta(days=1)
            await store.event_reference(client, window, key, None).set(
                {"item": item(n).to_json(), "expire_at": expire_at}
            )
            await (
                client.collection(digest_changes_collection(prefix))
                .document(key)
                .set(
                    {
                        "window": window,
                        "route": "r",
                        "expire_at": datetime.fromtimestamp(NOW + 999, UTC),
                    }
                )
            )
        assert (await store.read(window)).summary.items == [item(1), item(2)]
        assert [p.events for p in await store.pending(NOW)] == [2]
        assert (await store.add("r", 60, 10, item(2), NOW + 1)).duplicate
        joined = await store.add("r", 60, 10, item(3), NOW + 2)
        assert (joined.window_id, joined.duplicate) == (window, False)
        assert (await store.read(window)).summary.items == [item(1), item(2), item(3)]
        # A claim of the version before tokens, whose sender died: token 0, taken over.
        await window_ref.update(
            {"state": "sending", "owner": "old", "lease_until": NOW + 30, "ready_at": NOW + 30}
        )
        assert await store.claim(window, 30, NOW + 10) is Claim.IN_FLIGHT
        assert await store.renew(window, 0, 30, NOW + 10) is not None
        lease = leased(await store.claim(window, 30, NOW + 100))
        assert lease.token > 0
        assert (await store.read(window)).summary.count == 3
        assert [p.events for p in await store.pending(NOW + 100)] == [3]
        assert await store.complete(window, lease.token, NOW + 101) is True
        await firestore.aclose()
        await store.aclose()

    run(scenario)


def test_an_endpoint_that_does_not_answer_is_unavailable_within_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nobody listens
    location = FirestoreLocation.parse("firestore://dead-project/gcs-notifier?prefix=test")

    async def scenario() -> None:
        store = FirestoreDigestStore(location)
        started = time.monotonic()
        outcomes = await asyncio.gather(
            store.add("r", 60, 10, item(1), NOW),
            store.overflow("r", 60, 10, item(1), NOW, ["k"]),
            store.claim("r:1", 30, NOW),
            store.take("r", "c", 5, 60, NOW),
            store.due(NOW, 10),
            store.pending(NOW),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        await store.aclose()
        assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
        assert elapsed < OPERATION_SECONDS + 2

    run(scenario)


def test_event_documents_hold_what_the_summary_is_read_from() -> None:
    expire_at = datetime(2030, 1, 1, tzinfo=UTC)
    upload = item(7)
    fields = event_fields(upload, 1_730_000_000_123_456, expire_at)
    assert DigestItem.from_json(json.loads(fields["item"])) == upload
    assert fields == {
        "item": fields["item"],
        "arrived": 1_730_000_000_123_456,
        "time": int((upload.time - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 10**6)
        if upload.time
        else None,
        "name": upload.name,
        "place": f"acme/{upload.name}",
        "bucket": "acme 00001730000000123456",
        "bytes": upload.size,
        "finalized": 1,
        "deleted": 0,
        "archived": 0,
        "expire_at": expire_at,
    }
    deleted = event_fields(item(7, kind=EventType.DELETED), 1, expire_at)
    assert (deleted["bytes"], deleted["finalized"], deleted["deleted"]) == (0, 0, 1)
    untimed = DigestItem("k", EventType.ARCHIVED, "b", "n", None, None, None)
    assert event_fields(untimed, 1, expire_at)["time"] is None
