"""A digest is sent once even when a flush is slow, frozen or cut off from its store: the faults of
issue 18, each on every store backend, two flushes on one storage as two instances would have.

The clock is the flushes' own (every store method takes `now` from the caller), so a send that
"takes" twenty seconds, or a flush frozen for a minute, moves the clock instead of the test
waiting, and the other instance's flush runs exactly in the gap the fault opens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path

import pytest

from app.delivery.digests import Digests
from app.events.models import EventType, StorageEvent, StorageObjectData
from app.notify.base import Notification, Receipt
from app.notify.outbox import OutboxNotifier
from app.rules.base import DigestRoute
from app.stores.base import StoreUnavailable
from app.stores.windows import DigestStore, DigestWindow
from tests.delivery.test_digest_flush import NOW, T0, Clock

pytest_plugins = ["tests.firestore_emulator", "tests.store_backends"]

LEASE = 30.0
SEND = 10.0  # the notifier's timeout: a send may take this long
ROUTES = [DigestRoute(f"route-{n}", ("ops@example.com",), 60, 100) for n in range(5)]


def event(n: int, route: int) -> StorageEvent:
    return StorageEvent(
        id=f"event-{route}-{n}",
        source="//storage.googleapis.com/projects/_/buckets/acme",
        type=EventType.FINALIZED,
        time=T0,
        data=StorageObjectData(bucket="acme", name=f"r{route}/file-{n}.csv", generation=n + 1),
    )


class Notifier:
    """The outbox, with a hook that runs inside each send (the moment the provider has the
    request), and a clock that each send moves on by `seconds`."""

    name = "outbox"
    max_recipients: int | None = None
    send_seconds = SEND

    def __init__(self, outbox: Path, clock: Clock, seconds: float = 0.0) -> None:
        self.outbox = OutboxNotifier(outbox)
        self.clock = clock
        self.seconds = seconds
        self.during: Callable[[int], Awaitable[None]] | None = None
        self.sent: list[str] = []

    async def send(self, notification: Notification) -> Receipt:
        self.clock.now += self.seconds
        if self.during is not None:
            await self.during(len(self.sent))
        self.sent.append(notification.key)
        return await self.outbox.send(notification)

    async def aclose(self) -> None:
        await self.outbox.aclose()


def flow(store: DigestStore, notifier: Notifier, clock: Clock) -> Digests:
    return Digests(
        store=store,
        notifier=notifier,
        routes={route.name: route for route in ROUTES},
        sender="notifier@example.com",
        dead_letters=None,
        lease_seconds=LEASE,
        send_seconds=SEND,
        clock=clock,
    )


async def fill(digests: Digests, routes: int = len(ROUTES)) -> None:
    for number in range(routes):
        for n in range(3):
            await digests.join(ROUTES[number].name, event(n, number))


def run(scenario: Callable[[], Coroutine[None, None, None]]) -> None:
    asyncio.run(scenario())


def test_a_flush_slower_than_its_lease_never_shares_a_window(
    open_windows: Callable[[], DigestStore], tmp_path: Path
) -> None:
    """Issue 18's first fault: the flush read the clock once, so the windows it claimed after
    its lease's worth of slow sends were claimed already expired, and another instance's flush
    took them over while the first was still sending: the same digest twice. Each claim's lease
    now runs from its own moment."""
    clock = Clock()
    slow = Notifier(tmp_path / "outbox", clock, seconds=SEND)  # five sends: 50 s > the lease
    quick = Notifier(tmp_path / "outbox", clock)

    async def scenario() -> None:
        one, two = open_windows(), open_windows()
        first, second = flow(one, slow, clock), flow(two, quick, clock)
        try:
            await fill(first)
            clock.now = NOW + 61

            async def other_instance(sent_before: int) -> None:
                if sent_before == len(ROUTES) - 1:  # the last window, claimed 40 s in
                    await second.flush()

            slow.during = other_instance
            result = await first.flush()
            assert result.flushed == len(ROUTES)
            assert quick.sent == []
            clock.now += 2 * LEASE
            assert (await second.flush()).flushed == 0
        finally:
            await one.aclose()
            if two is not one:
                await two.aclose()

    run(scenario)
    assert len(slow.sent) == len(set(slow.sent)) == len(ROUTES)


class Around:
    """A digest store handed through, but for the methods a subclass changes."""

    def __init__(self, store: DigestStore) -> None:
        self.store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


class Frozen(Around):
    """A digest store whose reads freeze the flush that calls them: `then` runs while the flush
    is stopped between its claim and its send, as a Cloud Run instance throttled between
    requests is (its timer's flush stopped mid-way, another instance's flush going on)."""

    then: Callable[[], Awaitable[None]] | None = None

    async def read(self, window_id: str) -> DigestWindow:
        window = await self.store.read(window_id)
        if self.then is not None:
            then, self.then = self.then, None
            await then()
        return window


def test_a_flush_frozen_past_its_lease_never_sends_what_another_flush_sent(
    open_windows: Callable[[], DigestStore], tmp_path: Path
) -> None:
    """Issue 18's third fault: a timer flush frozen between its claim and its send lost its
    lease; Cloud Scheduler's flush on another instance sent the window; the frozen one woke and
    sent it too. It now renews its claim right before sending, and a lost claim sends nothing."""
    clock = Clock()
    frozen_notifier = Notifier(tmp_path / "outbox", clock)
    other_notifier = Notifier(tmp_path / "outbox", clock)

    async def scenario() -> None:
        store = open_windows()
        frozen = Frozen(store)
        other_store = open_windows()
        timer = flow(frozen, frozen_notifier, clock)  # type: ignore[arg-type]
        scheduler = flow(other_store, other_notifier, clock)
        try:
            await fill(timer, routes=1)
            clock.now = NOW + 61

            async def meanwhile() -> None:
                clock.now += LEASE + 30  # frozen for a minute
                assert (await scheduler.flush()).flushed == 1

            frozen.then = meanwhile
            result = await timer.flush()
            assert (result.flushed, result.failed) == (0, 0)
        finally:
            await store.aclose()
            if other_store is not store:
                await other_store.aclose()

    run(scenario)
    assert frozen_notifier.sent == []
    assert len(other_notifier.sent) == 1


class FailingCompletes(Around):
    """A digest store that refuses to mark windows done while `failing`."""

    failing = True
    attempts = 0

    async def complete(self, window_id: str, token: int, now: float) -> bool:
        self.attempts += 1
        if self.failing:
            raise StoreUnavailable("test: the store refuses writes")
        return await self.store.complete(window_id, token, now)


def test_a_sent_digest_whose_done_mark_fails_is_not_sent_again(
    open_windows: Callable[[], DigestStore], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 18's fourth fault, for digests: the email went out, the store refused the done mark.
    The window is not released (its claim keeps other flushes away), the mark is retried until
    it is written, and no flush sends the window again."""
    clock = Clock()
    notifier = Notifier(tmp_path / "outbox", clock)
    other = Notifier(tmp_path / "outbox", clock)

    async def scenario() -> None:
        store = open_windows()
        failing = FailingCompletes(store)
        other_store = open_windows()
        first = flow(failing, notifier, clock)  # type: ignore[arg-type]
        second = flow(other_store, other, clock)
        try:
            await fill(first, routes=1)
            clock.now = NOW + 61
            result = await first.flush()
            assert (result.flushed, result.failed) == (1, 0)
            assert first.confirmations.pending == 1
            clock.now += LEASE / 2
            assert (await second.flush()).flushed == 0  # the claim stands
            failing.failing = False
            for _ in range(100):  # the retry in the background writes the mark
                if not first.confirmations.pending:
                    break
                await asyncio.sleep(0.1)
            assert first.confirmations.pending == 0
            clock.now += 2 * LEASE
            assert (await second.flush()).flushed == 0
            assert await second.store.pending(clock.now) == []
        finally:
            await first.aclose(0)
            await store.aclose()
            if other_store is not store:
                await other_store.aclose()

    run(scenario)
    assert len(notifier.sent) == 1
    assert other.sent == []
    assert "email sent but not marked done" in caplog.text


def test_a_window_that_fails_does_not_stop_the_flush(
    open_windows: Callable[[], DigestStore], tmp_path: Path
) -> None:
    """One damaged or failing window never holds the others back."""
    clock = Clock()
    notifier = Notifier(tmp_path / "outbox", clock)

    class OneBadRead(Around):
        async def read(self, window_id: str) -> DigestWindow:
            if window_id.startswith(f"{ROUTES[0].name}:"):
                raise StoreUnavailable("test: a damaged window")
            return await self.store.read(window_id)

    async def scenario() -> None:
        store = open_windows()
        digests = flow(OneBadRead(store), notifier, clock)  # type: ignore[arg-type]
        try:
            await fill(digests)
            clock.now = NOW + 61
            result = await digests.flush()
            assert (result.flushed, result.failed) == (len(ROUTES) - 1, 1)
        finally:
            await store.aclose()

    run(scenario)
    assert len(notifier.sent) == len(ROUTES) - 1


def test_a_flush_stops_claiming_when_its_budget_is_spent(
    open_windows: Callable[[], DigestStore], tmp_path: Path
) -> None:
    """Past its time budget a flush claims no more windows and says how many it left."""
    clock = Clock()
    notifier = Notifier(tmp_path / "outbox", clock)

    async def scenario() -> None:
        store = open_windows()
        digests = flow(store, notifier, clock)
        digests.budget_seconds = 0.5

        async def slow(sent_before: int) -> None:
            await asyncio.sleep(0.3)  # each send takes real time: the budget is the loop's

        notifier.during = slow
        try:
            await fill(digests)
            clock.now = NOW + 61
            result = await digests.flush()
            assert 1 <= result.flushed < len(ROUTES)
            assert result.left == result.pending == len(ROUTES) - result.flushed
            rest = await digests.flush()
            assert rest.flushed >= 1
            assert rest.left == result.left - rest.flushed
        finally:
            await store.aclose()

    run(scenario)
