"""A digest window goes out as one email, once: real stores, the outbox and the strict fake
SendGrid."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from pydantic import SecretStr

from app.delivery.digests import DigestDeadLetterFolder, Digests, FlushResult
from app.digests.window import DigestItem
from app.events.models import EventType, StorageEvent, StorageObjectData
from app.notify.base import Notifier
from app.notify.outbox import OutboxNotifier
from app.notify.sendgrid import SendGridNotifier
from app.rules.base import DigestRoute, RateLimit
from app.stores.base import Claim, Lease
from app.stores.memory import MemoryDigestStore
from app.stores.sqlite_windows import SqliteDigestStore
from app.stores.windows import Added, DigestStore, DigestWindow, Taken, WindowInfo
from tests.fakes.sendgrid import FakeSendGrid, Reply

NOW = 1_730_000_000.0
WINDOW = 300.0
T0 = datetime(2024, 10, 1, 9, 30, tzinfo=UTC)
RECIPIENTS = ("ops@example.com", "dev@example.com")
ROUTE = DigestRoute("reports", RECIPIENTS, WINDOW, 100)
SENDER = "notifier@example.com"

Opener = Callable[[], DigestStore]


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store; again, another instance on the same storage (the same object for memory,
    another connection for SQLite), as a second process would."""
    if request.param == "memory":
        memory = MemoryDigestStore()
        yield lambda: memory
    else:
        path = str(tmp_path / "state" / "digests.db")
        yield lambda: SqliteDigestStore.open(path)


@pytest.fixture
def fake() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as server:
        yield server


def event(n: int, *, kind: EventType = EventType.FINALIZED, event_id: str = "") -> StorageEvent:
    return StorageEvent(
        id=event_id or f"event-{n}",
        source="//storage.googleapis.com/projects/_/buckets/acme",
        type=kind,
        time=T0 + timedelta(seconds=n),
        data=StorageObjectData(
            bucket="acme", name=f"reports/2024/file-{n:04}.csv", generation=1000 + n, size=10
        ),
    )


def digests(
    store: DigestStore, notifier: Notifier, clock: Clock, dead_letters: Path | None = None
) -> Digests:
    return Digests(
        store=store,
        notifier=notifier,
        routes={ROUTE.name: ROUTE},
        sender=SENDER,
        dead_letters=None if dead_letters is None else DigestDeadLetterFolder(dead_letters),
        lease_seconds=30,
        send_seconds=2.0,
        clock=clock,
    )


def sendgrid(fake: FakeSendGrid) -> SendGridNotifier:
    return SendGridNotifier(api_key=SecretStr(fake.api_key), host=fake.url, timeout=2.0)


def emails(outbox: Path) -> list[EmailMessage]:
    if not outbox.exists():
        return []
    return [
        message_from_bytes(path.read_bytes(), _class=EmailMessage, policy=policy.default)
        for path in sorted(outbox.glob("*.eml"))
    ]


def body(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    text: str = part.get_content()
    return text


def run(main: Callable[[], Coroutine[None, None, None]]) -> None:
    asyncio.run(main())


def test_500_events_in_one_window_become_one_email_per_recipient_when_due(
    opener: Opener, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"

    async def main() -> None:
        store, clock = opener(), Clock()
        try:
            flow = digests(store, OutboxNotifier(outbox), clock)
            for n in range(500):
                await flow.join(ROUTE.name, event(n))
            assert await flow.flush(NOW + WINDOW - 1) == FlushResult(0, 1, 0)
            assert emails(outbox) == []
            assert await flow.flush(NOW + WINDOW) == FlushResult(1, 0, 0)
            assert await flow.flush(NOW + WINDOW + 60) == FlushResult(0, 0, 0)
        finally:
            await store.aclose()

    run(main)
    sent = emails(outbox)
    assert sorted(str(message["To"]) for message in sent) == sorted(RECIPIENTS)
    for message in sent:
        assert str(message["Subject"]) == (
            "[gs://acme] 500 changes under reports/2024/ (500 finalized)"
        )
        text = body(message)
        names = [f"reports/2024/file-{n:04}.csv" for n in range(500)]
        assert all(name in text for name in names[:100])
        assert not any(name in text for name in names[100:])
        assert "The first 100 of 500 objects:" in text
        assert "and 400 more" in text
        assert text.rstrip().endswith("Sent by route reports as a digest of 500 changes")


def test_the_same_change_delivered_twice_is_counted_once(opener: Opener, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"

    async def main() -> None:
        store, clock = opener(), Clock()
        try:
            flow = digests(store, OutboxNotifier(outbox), clock)
            first = await flow.join(ROUTE.name, event(1, event_id="message-a"))
            clock.now += 1
            again = await flow.join(ROUTE.name, event(1, event_id="message-b"))  # republished
            await flow.join(ROUTE.name, event(2, kind=EventType.DELETED))
            assert (again.duplicate, again.window_id) == (True, first.window_id)
            assert await flow.flush(NOW + WINDOW) == FlushResult(1, 0, 0)
        finally:
            await store.aclose()

    run(main)
    subjects = {str(message["Subject"]) for message in emails(outbox)}
    assert subjects == {"[gs://acme] 2 changes under reports/2024/ (1 finalized, 1 deleted)"}


def test_sendgrid_failing_leaves_the_window_pending_and_the_next_flush_sends_it_once(
    opener: Opener, fake: FakeSendGrid
) -> None:
    fake.script(Reply.error(500))

    async def main() -> None:
        store, clock, notifier = opener(), Clock(), sendgrid(fake)
        try:
            flow = digests(store, notifier, clock)
            for n in range(3):
                await flow.join(ROUTE.name, event(n))
            assert await flow.flush(NOW + WINDOW) == FlushResult(0, 1, 1)
            (waiting,) = await store.pending(NOW + WINDOW)
            assert waiting.events == 3
            assert await flow.flush(NOW + WINDOW + 10) == FlushResult(1, 0, 0)
            assert await flow.flush(NOW + WINDOW + 20) == FlushResult(0, 0, 0)
        finally:
            await notifier.aclose()
            await store.aclose()

    run(main)
    assert [request.status for request in fake.requests()] == [500, 202]
    (accepted,) = fake.accepted()
    assert accepted["subject"].startswith("[gs://acme] 3 changes")
    assert sorted(fake.delivered_recipients()) == sorted(RECIPIENTS)


def test_a_digest_sendgrid_rejects_is_dead_lettered_and_done(
    opener: Opener, fake: FakeSendGrid, tmp_path: Path
) -> None:
    fake.script(Reply.error(400, "The subject is invalid", field="subject"))
    folder = tmp_path / "dead-letter"

    async def main() -> str:
        store, clock, notifier = opener(), Clock(), sendgrid(fake)
        try:
            flow = digests(store, notifier, clock, dead_letters=folder)
            added = await flow.join(ROUTE.name, event(7))
            assert await flow.flush(NOW + WINDOW) == FlushResult(0, 0, 0, dead_lettered=1)
            assert await flow.flush(NOW + WINDOW + 60) == FlushResult(0, 0, 0)
            return added.window_id
        finally:
            await notifier.aclose()
            await store.aclose()

    window_id = asyncio.run(main())
    assert len(fake.requests()) == 1
    (path,) = folder.glob("*.json")
    kept = json.loads(path.read_text(encoding="utf-8"))
    assert kept["window_id"] == window_id
    assert "subject" in kept["reason"]
    assert kept["summary"]["count"] == 1
    assert kept["summary"]["items"][0]["name"] == "reports/2024/file-0007.csv"


class Yielding:
    """A store that lets other tasks run before each call, as a network round trip would: both
    flushes then see the window due before either claims it."""

    def __init__(self, store: DigestStore) -> None:
        self.store = store

    async def add(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None = None,
    ) -> Added:
        await asyncio.sleep(0)
        return await self.store.add(route, window_seconds, max_items, item, now, leading_after)

    async def overflow(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        done_keys: Sequence[str],
    ) -> Added:
        await asyncio.sleep(0)
        return await self.store.overflow(route, window_seconds, max_items, item, now, done_keys)

    async def take(
        self, route: str, change_key: str, limit: int, per_seconds: float, now: float
    ) -> Taken:
        await asyncio.sleep(0)
        return await self.store.take(route, change_key, limit, per_seconds, now)

    async def due(self, now: float, limit: int) -> list[str]:
        await asyncio.sleep(0)
        return await self.store.due(now, limit)

    async def claim(self, window_id: str, lease_seconds: float, now: float) -> Lease | Claim:
        await asyncio.sleep(0)
        return await self.store.claim(window_id, lease_seconds, now)

    async def renew(
        self, window_id: str, token: int, lease_seconds: float, now: float
    ) -> Lease | None:
        await asyncio.sleep(0)
        return await self.store.renew(window_id, token, lease_seconds, now)

    async def read(self, window_id: str) -> DigestWindow:
        await asyncio.sleep(0)
        return await self.store.read(window_id)

    async def complete(self, window_id: str, token: int, now: float) -> bool:
        await asyncio.sleep(0)
        return await self.store.complete(window_id, token, now)

    async def release(self, window_id: str, token: int, now: float) -> None:
        await asyncio.sleep(0)
        await self.store.release(window_id, token, now)

    async def pending(self, now: float) -> list[WindowInfo]:
        await asyncio.sleep(0)
        return await self.store.pending(now)

    async def aclose(self) -> None:
        await self.store.aclose()


def test_two_flushes_at_once_send_one_email(opener: Opener, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"

    async def main() -> None:
        one, two, clock = Yielding(opener()), Yielding(opener()), Clock()
        try:
            first = digests(one, OutboxNotifier(outbox), clock)
            second = digests(two, OutboxNotifier(outbox), clock)
            for n in range(20):
                await first.join(ROUTE.name, event(n))
            results = await asyncio.gather(first.flush(NOW + WINDOW), second.flush(NOW + WINDOW))
            assert sorted(result.flushed for result in results) == [0, 1]
            assert await first.flush(NOW + WINDOW + 60) == FlushResult(0, 0, 0)
        finally:
            await one.aclose()
            if two.store is not one.store:
                await two.aclose()

    run(main)
    assert sorted(str(message["To"]) for message in emails(outbox)) == sorted(RECIPIENTS)


def test_an_event_arriving_while_its_window_is_sent_joins_the_next_window(
    opener: Opener, fake: FakeSendGrid
) -> None:
    fake.script(Reply.hang(0.5))  # then checked and accepted as normal

    async def main() -> None:
        store, clock, notifier = opener(), Clock(), sendgrid(fake)
        try:
            flow = digests(store, notifier, clock)
            first = await flow.join(ROUTE.name, event(1))
            clock.now = NOW + WINDOW
            sending = asyncio.create_task(flow.flush())
            assert await asyncio.to_thread(fake.wait_for_requests, 1, 5)
            late = await flow.join(ROUTE.name, event(2))
            assert late.window_id != first.window_id
            assert (late.opened, late.duplicate) == (True, False)
            assert await sending == FlushResult(1, 1, 0)
            clock.now += WINDOW
            assert await flow.flush() == FlushResult(1, 0, 0)
        finally:
            await notifier.aclose()
            await store.aclose()

    run(main)
    subjects = [body["subject"] for body in fake.accepted()]
    assert subjects == [
        "[gs://acme] 1 change under reports/2024/ (1 finalized)",
        "[gs://acme] 1 change under reports/2024/ (1 finalized)",
    ]
    names = [json.dumps(body["content"]) for body in fake.accepted()]
    assert "file-0001.csv" in names[0]
    assert "file-0002.csv" not in names[0]
    assert "file-0002.csv" in names[1]


def test_a_route_with_more_recipients_than_one_message_takes_is_refused(
    fake: FakeSendGrid,
) -> None:
    crowd = tuple(f"person{n}@example.com" for n in range(1001))
    with pytest.raises(ValueError, match="1001 recipients"):
        Digests(
            store=MemoryDigestStore(),
            notifier=sendgrid(fake),
            routes={"crowd": DigestRoute("crowd", crowd, WINDOW, 100)},
            sender=SENDER,
            dead_letters=None,
            lease_seconds=30,
            send_seconds=2.0,
        )


LEADING = DigestRoute("uploads", RECIPIENTS, WINDOW, 100, leading=True)
RATED = DigestRoute("invoices", RECIPIENTS, 3600, 100, rate=RateLimit(max=2, per_seconds=3600))


def routed(store: DigestStore, notifier: Notifier, clock: Clock) -> Digests:
    return Digests(
        store=store,
        notifier=notifier,
        routes={route.name: route for route in (LEADING, RATED)},
        sender=SENDER,
        dead_letters=None,
        lease_seconds=30,
        send_seconds=2.0,
        clock=clock,
    )


def test_a_leading_window_nobody_joined_is_done_at_its_due_time_without_an_email(
    opener: Opener, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"

    async def main() -> None:
        store, clock = opener(), Clock()
        try:
            flow = routed(store, OutboxNotifier(outbox), clock)
            first = await flow.join(LEADING.name, event(1))
            assert first.leading
            assert await flow.flush(NOW + WINDOW) == FlushResult(0, 0, 0)
            # A window after that quiet spell leads again; one joined by a second event is sent.
            clock.now = NOW + 2 * WINDOW + 1
            assert (await flow.join(LEADING.name, event(2))).leading
            assert not (await flow.join(LEADING.name, event(3))).leading
            assert await flow.flush(clock.now + WINDOW) == FlushResult(1, 0, 0)
        finally:
            await store.aclose()

    run(main)
    sent = emails(outbox)
    assert len(sent) == len(RECIPIENTS)
    assert all("1 change " in str(message["Subject"]) for message in sent)
    assert all("file-0003.csv" in body(m) and "file-0002" not in body(m) for m in sent)


def test_a_rate_route_past_its_limit_gets_one_digest_when_the_period_ends(
    opener: Opener, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"

    async def main() -> None:
        store, clock = opener(), Clock()
        try:
            flow = routed(store, OutboxNotifier(outbox), clock)
            taken = [await flow.take(RATED.name, event(n)) for n in range(5)]
            assert [t.allowed for t in taken] == [True, True, False, False, False]
            period_end = taken[-1].period_end
            assert period_end == NOW + 3600
            for n in range(2, 5):
                await flow.overflow(RATED.name, event(n), period_end, [f"route:invoices:{n}"])
            assert await flow.flush(period_end - 1) == FlushResult(0, 1, 0)
            assert await flow.flush(period_end) == FlushResult(1, 0, 0)
        finally:
            await store.aclose()

    run(main)
    assert all("3 changes" in str(m["Subject"]) for m in emails(outbox))
