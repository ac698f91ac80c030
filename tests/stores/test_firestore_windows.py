"""What the Firestore digest store promises beyond the contract suite (tests/stores/test_windows.py
runs that against the emulator too): the closing race settled by commit times, many instances
adding to one route at once, recovery from a crash between steps, `expire_at` for Firestore's TTL
policy, and a bounded wait for an endpoint that does not answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import pytest
from google.cloud.firestore import AsyncClient, AsyncDocumentReference

from app.stores.base import Claim, StoreUnavailable
from app.stores.firestore import (
    OPERATION_SECONDS,
    FirestoreClient,
    FirestoreLocation,
    digest_changes_collection,
    digest_events_collection,
    digest_rates_collection,
    digest_routes_collection,
    digest_windows_collection,
    document_id,
)
from app.stores.firestore_windows import EVENT_KEEP_SECONDS, FirestoreDigestStore
from app.stores.windows import WindowState, change_digest
from tests.servers import free_port
from tests.stores.test_windows import NOW, item

pytest_plugins = ["tests.firestore_emulator"]


class Crash(Exception):
    """The process dies here (nothing after this point of the add runs)."""


class PausingStore(FirestoreDigestStore):
    """Stops its first add at a step until the test lets it go on, or crashes it there."""

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


async def documents(location: FirestoreLocation) -> dict[str, dict[str, Any]]:
    """Every document the stores wrote, by path, read with a client of the test's own."""
    firestore = FirestoreClient(location)
    client = await firestore.get()
    found: dict[str, dict[str, Any]] = {}

    async def walk(parent: AsyncClient | AsyncDocumentReference) -> None:
        async for collection in parent.collections():
            async for snap in collection.stream():
                found[snap.reference.path] = snap.to_dict() or {}
                await walk(snap.reference)

    await walk(client)
    await firestore.aclose()
    return found


def window_path(location: FirestoreLocation, window: str) -> str:
    return f"{digest_windows_collection(location.prefix)}/{document_id(window)}"


def event_path(location: FirestoreLocation, window: str, change_key: str) -> str:
    events = digest_events_collection(location.prefix)
    return f"{window_path(location, window)}/{events}/{change_digest('r', change_key).hex()}"


def test_an_event_landing_after_the_claim_joins_the_next_window(firestore_url: str) -> None:
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        flusher = FirestoreDigestStore(location)
        adder = PausingStore(location, "before join")
        first = await flusher.add("r", 60, 10, item(1), NOW)
        # The adder has read the route (window `first` open) but not yet written its event.
        late = asyncio.create_task(adder.add("r", 60, 10, item(2), NOW + 60.1))
        await adder.reached.wait()
        assert await flusher.claim(first.window_id, "f", 30, NOW + 60) is Claim.CLAIMED
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
        assert await flusher.claim(first.window_id, "f", 30, NOW + 60) is Claim.CLAIMED
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


def test_an_event_left_uncounted_by_a_crash_joins_again_when_redelivered(
    firestore_url: str,
) -> None:
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        flusher = FirestoreDigestStore(location)
        crashing = PausingStore(location, "before join", crash_after=True)
        first = await flusher.add("r", 60, 10, item(1), NOW)
        late = asyncio.create_task(crashing.add("r", 60, 10, item(2), NOW + 60.1))
        await crashing.reached.wait()
        await flusher.claim(first.window_id, "f", 30, NOW + 60)
        crashing.go_on.set()
        with pytest.raises(Crash):  # after its event landed in the closed window, before moving
            await late
        await crashing.aclose()
        left = await documents(location)
        assert event_path(location, first.window_id, item(2).change_key) in left
        # Left behind, but not in the closed window's digest...
        assert (await flusher.read(first.window_id)).summary.items == [item(1)]
        assert [p.events for p in await flusher.pending(NOW + 61)] == [1]
        # ... and not a duplicate: the redelivery joins the route's next window.
        again = await flusher.add("r", 60, 10, item(2), NOW + 70)
        assert (again.duplicate, again.opened) == (False, True)
        assert (await flusher.read(again.window_id)).summary.items == [item(2)]
        assert (await flusher.add("r", 60, 10, item(2), NOW + 71)).duplicate
        await flusher.complete(first.window_id, "f", NOW + 72)
        assert (await flusher.read(first.window_id)).summary.items == [item(1)]
        await flusher.aclose()
        assert event_path(location, first.window_id, item(2).change_key) not in (
            await documents(location)
        )

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


def test_a_change_is_forgotten_after_the_retention(firestore_url: str) -> None:
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        store = FirestoreDigestStore(location, retention_seconds=100)
        first = await store.add("r", 60, 10, item(1), NOW)
        await store.claim(first.window_id, "f", 30, NOW + 60)
        await store.complete(first.window_id, "f", NOW + 61)
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
        await store.claim(sent.window_id, "f", 30, NOW + 60)
        await store.complete(sent.window_id, "f", NOW + 61)
        waiting = await store.add("r", 60, 10, item(3), NOW + 62)
        await store.take("rated", 5, 3600, NOW)
        await store.aclose()
        found = await documents(location)
        prefix = location.prefix
        kinds: dict[str, list[dict[str, Any]]] = {}
        for path, fields in found.items():
            kind = path.split("/")[-2]
            kinds.setdefault(kind, []).append(fields)
        assert sorted(kinds) == sorted(
            [
                digest_routes_collection(prefix),
                digest_windows_collection(prefix),
                digest_events_collection(prefix),
                digest_changes_collection(prefix),
                digest_rates_collection(prefix),
            ]
        )
        assert sorted(c["expire_at"] for c in kinds[digest_changes_collection(prefix)]) == [
            at(NOW + retention),
            at(NOW + 1 + retention),
            at(NOW + 62 + retention),
        ]
        events = kinds[digest_events_collection(prefix)]
        assert len(events) == 2  # the leading change is sent alone, not an event of its window
        assert all(isinstance(e["expire_at"], datetime) for e in events)
        assert min(e["expire_at"] for e in events) >= at(NOW + 60 + retention + EVENT_KEEP_SECONDS)
        done = found[window_path(location, sent.window_id)]
        assert (done["state"], done["expire_at"]) == (WindowState.DONE, at(NOW + 61 + retention))
        assert "ready_at" not in done  # out of `due`'s index
        open_one = found[window_path(location, waiting.window_id)]
        assert open_one["state"] == WindowState.OPEN
        assert "expire_at" not in open_one  # a pending window never expires
        [rate] = kinds[digest_rates_collection(prefix)]
        assert rate["expire_at"] == at(NOW + 3600)

    run(scenario)


def test_two_flushes_on_two_instances_claim_a_window_once(firestore_url: str) -> None:
    location = FirestoreLocation.parse(firestore_url)

    async def scenario() -> None:
        one, two = FirestoreDigestStore(location), FirestoreDigestStore(location)
        window = (await one.add("r", 60, 10, item(1), NOW)).window_id
        for n in range(2, 7):
            await one.add("r", 60, 10, item(n), NOW + 1)

        async def flush_all(at: float) -> list[Claim]:
            return await asyncio.gather(
                *((one, two)[n % 2].claim(window, f"o{at}-{n}", 30, at) for n in range(20))
            )

        claims = await flush_all(NOW + 60)  # closing the open window
        assert claims.count(Claim.CLAIMED) == 1
        assert claims.count(Claim.IN_FLIGHT) == 19
        claims = await flush_all(NOW + 90)  # taking over from a sender whose lease ran out
        assert claims.count(Claim.CLAIMED) == 1
        assert claims.count(Claim.IN_FLIGHT) == 19
        assert (await two.read(window)).info.state is WindowState.SENDING
        assert (await two.add("r", 60, 10, item(9), NOW + 61)).window_id != window
        await one.aclose()
        await two.aclose()

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
            store.claim("r:1", "f", 30, NOW),
            store.take("r", 5, 60, NOW),
            store.due(NOW, 10),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        await store.aclose()
        assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
        assert elapsed < OPERATION_SECONDS + 2

    run(scenario)
