"""Digest windows in Firestore, shared by every Cloud Run instance (issue 13): no VPC, nothing
running between events. Not wired into the service yet (issue 11).

Firestore sustains about one write per second on one document, and a burst of 5,000 uploads must
not write one window document 5,000 times. So an event is a document of its own, and nothing
that every event touches is ever written:
- `{prefix}-digest-routes/<sha256(route)>`: the route's OPEN window (`open`), the start of its
  latest window (`last_opened_ms`) and when its previous window closed (`last_closed_at`);
  written when a window opens or closes, never per event.
- `{prefix}-digest-windows/<sha256(window id)>`: state, owner, lease, times, `max_items`, the
  leading change (`leading`); `ready_at` (when `due` lists it) only while not done, so `due` is
  one range query on one field (Firestore's automatic single-field index: no composite index),
  `pending` (true until done) for `pending`.
- `.../<window>/{prefix}-digest-events/<change digest>`: one per event, the DigestItem JSON.
- `{prefix}-digest-changes/<change digest>`: the window a change joined (deduplication).
- `{prefix}-digest-rates/<sha256(route)>`: a rate route's current period.

Writes are batches (atomic across documents) with `create()` and `last_update_time`
preconditions, never transactions: contended transactions queue up and time out (on the
emulator too), while a batch whose precondition failed is simply read again and retried.
- Opening a window is one batch: create the window, point the route at it (precondition: the
  route as read), create the change and event documents. Of two instances opening at once, one
  batch fails whole and its add joins the winner's window.
- Joining is one batch: create the change document (AlreadyExists: a duplicate) and the event.
- Closing (a claim or completion of an OPEN window) is one batch: the window's new state
  (precondition) and the route without an open window (precondition).

The closing race: an add read the route (window W open), then a flush claimed W, then the add's
event landed in W. Commit times decide, as Firestore orders them: W's closing time `closed_us`
is the commit time of the write that closed it (until a later write copies it into the field,
the window's own update time), rounded up to the microsecond, and W's digest holds exactly its
events created at or before it. After joining, an add reads W back: still open, or closed after
its event -> the event is in W's digest. Closed before it -> the add moves the event to the
route's next window (one batch: delete it from W, re-point the change, join the next window),
so every event is in exactly one digest. A change whose event is missing from its window, or
sits there uncounted (a crash between joining and moving), is joined again when the change is
delivered again, not taken for a duplicate.

Deletion is Firestore's TTL policy on `expire_at` (Terraform creates one per collection group):
changes after the retention, done windows after the retention, a rate period at its end, and
events EVENT_KEEP_SECONDS after their window was due plus the retention (set when the event is
written, because rewriting thousands of events when their window is sent would cost as many
writes as the events did). Route documents are one per digest route and stay.

Every operation is bounded in time (app.stores.firestore.operation) and Firestore's failures are
StoreUnavailable: the event is answered 503 and delivered again.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.api_core.exceptions import AlreadyExists, FailedPrecondition, NotFound
from google.cloud.firestore import (
    DELETE_FIELD,
    AsyncClient,
    AsyncDocumentReference,
    AsyncWriteBatch,
    DocumentSnapshot,
)
from google.cloud.firestore_v1.base_query import FieldFilter

from app.digests.window import DigestItem, DigestSummary
from app.stores.base import Claim, StoreUnavailable
from app.stores.firestore import (
    WINDOW_READ_SECONDS,
    FirestoreClient,
    FirestoreLocation,
    call_options,
    digest_changes_collection,
    digest_events_collection,
    digest_rates_collection,
    digest_routes_collection,
    digest_windows_collection,
    document_id,
    operation,
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

Snapshot = DocumentSnapshot[AsyncDocumentReference]

# An event document outlives its window's due time by the retention and this much: a window
# still unsent this long after it was due (its digest failing for a month) loses its events.
EVENT_KEEP_SECONDS = 30 * 24 * 3600.0
# Each retry follows another writer's success (a window opened, a state changed), so a few
# suffice; `take` under many concurrent emails of one route needs more, spaced out.
_ATTEMPTS = 8
T = TypeVar("T")
_TAKE_ATTEMPTS = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class FirestoreDigestStore:
    def __init__(
        self, location: FirestoreLocation, retention_seconds: float = RETENTION_SECONDS
    ) -> None:
        self.location = location
        self.retention_seconds = retention_seconds
        self._firestore = FirestoreClient(location)
        prefix = location.prefix
        self._routes = digest_routes_collection(prefix)
        self._windows = digest_windows_collection(prefix)
        self._events = digest_events_collection(prefix)
        self._changes = digest_changes_collection(prefix)
        self._rates = digest_rates_collection(prefix)

    @classmethod
    def from_url(cls, url: str) -> FirestoreDigestStore:
        """ValueError for a bad URL; the client is made on the first call."""
        return cls(FirestoreLocation.parse(url))

    # --- references ---------------------------------------------------------------------

    def _route(self, client: AsyncClient, route: str) -> AsyncDocumentReference:
        return client.collection(self._routes).document(document_id(route))

    def _window(self, client: AsyncClient, window: str) -> AsyncDocumentReference:
        return client.collection(self._windows).document(document_id(window))

    def _event(self, client: AsyncClient, window: str, key: str) -> AsyncDocumentReference:
        event: AsyncDocumentReference = (
            self._window(client, window).collection(self._events).document(key)
        )
        return event

    def _change(self, client: AsyncClient, key: str) -> AsyncDocumentReference:
        return client.collection(self._changes).document(key)

    # --- add ------------------------------------------------------------------------------

    async def add(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None = None,
    ) -> Added:
        key = change_digest(route, item.change_key).hex()  # already a hash: the document id
        async with operation():
            client = await self._firestore.get()
            for _ in range(_ATTEMPTS):
                added = await self._try_add(
                    client, route, window_seconds, max_items, item, key, now, leading_after
                )
                if added is not None:
                    return added
        raise StoreUnavailable(f"firestore: digest add kept conflicting ({_ATTEMPTS} attempts)")

    async def _try_add(
        self,
        client: AsyncClient,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        key: str,
        now: float,
        leading_after: float | None,
    ) -> Added | None:
        """One attempt: the result, or None when another writer got in between (read again)."""
        route_ref, change_ref = self._route(client, route), self._change(client, key)
        route_snap, change_snap = await _get_all(client, [route_ref, change_ref])
        state = route_snap.to_dict() or {}
        previous: float | None = state.get("last_closed_at")
        batch = client.batch()
        change = change_snap.to_dict()
        if change is not None and change["expire_at"] > _timestamp(now):
            joined: str = change["window"]
            window_snap, event_snap = await _get_all(
                client, [self._window(client, joined), self._event(client, joined, key)]
            )
            window = window_snap.to_dict()
            if window is None:  # done and purged: it was sent
                return Added(joined, True, False, previous, False)
            if window.get("leading") == key:
                return Added(joined, True, False, previous, True)
            if event_snap.create_time is not None:
                if _counted(window_snap, event_snap.create_time):
                    return Added(joined, True, False, previous, False)
                batch.delete(event_snap.reference)  # it landed after its window closed
            # else: the change was written but its event was not: join again

        def join(target: str) -> None:
            fields = {"window": target, "route": route, "expire_at": _timestamp(now + keep)}
            if change_snap.exists:
                option = client.write_option(last_update_time=change_snap.update_time)
                batch.update(change_ref, fields, option=option)
            else:
                batch.create(change_ref, fields)

        keep = self.retention_seconds
        open_window: str | None = state.get("open")
        if open_window is None:
            opened_ms = next_opened_ms(now, state.get("last_opened_ms"))
            new = window_id(route, opened_ms)
            leading = leads(leading_after, previous, now)
            due_at = opened_ms / 1000 + window_seconds
            batch.create(
                self._window(client, new),
                {
                    "id": new,
                    "route": route,
                    "opened_at": opened_ms / 1000,
                    "due_at": due_at,
                    "state": WindowState.OPEN.value,
                    "ready_at": due_at,
                    "pending": True,
                    "max_items": max_items,
                    "leading": key if leading else None,
                },
            )
            opening = {"route": route, "open": new, "last_opened_ms": opened_ms}
            if route_snap.exists:
                option = client.write_option(last_update_time=route_snap.update_time)
                batch.update(route_ref, opening, option=option)
            else:
                batch.create(route_ref, {**opening, "last_closed_at": None})
            join(new)
            if not leading:
                batch.create(self._event(client, new, key), self._event_fields(item, due_at))
            if await _commit(batch) is None:
                return None
            return Added(new, False, True, previous, leading)

        join(open_window)
        due_at = now + window_seconds  # only bounds the event's expiry; the window keeps its own
        batch.create(self._event(client, open_window, key), self._event_fields(item, due_at))
        await self._before_join(open_window)
        results = await _commit(batch)
        if results is None:
            return None
        created = results[-1].update_time
        await self._after_join(open_window)
        window_snap = await self._window(client, open_window).get(**call_options())
        if window_snap.exists and _counted(window_snap, created):
            return Added(open_window, False, False, previous, False)
        return None  # closed before the event landed: the next attempt moves it

    def _event_fields(self, item: DigestItem, due_at: float) -> dict[str, Any]:
        expire = due_at + self.retention_seconds + EVENT_KEEP_SECONDS
        return {"item": item.to_json(), "expire_at": _timestamp(expire)}

    async def _before_join(self, window: str) -> None:
        """Between reading the route and writing the event into its open window (tests pause
        here to let a flush close the window first)."""

    async def _after_join(self, window: str) -> None:
        """Between writing the event and reading its window back (tests pause or fail here)."""

    # --- rate -------------------------------------------------------------------------------

    async def take(self, route: str, limit: int, per_seconds: float, now: float) -> Taken:
        check_rate(limit, per_seconds)
        async with operation():
            client = await self._firestore.get()
            ref = client.collection(self._rates).document(document_id(route))
            for attempt in range(_TAKE_ATTEMPTS):
                snap = await ref.get(**call_options())
                period = snap.to_dict()
                batch = client.batch()
                fresh = {"route": route, "end": now + per_seconds, "used": 1}
                fresh["expire_at"] = _timestamp(now + per_seconds)
                if period is None:
                    batch.create(ref, fresh)
                    taken = Taken(True, now + per_seconds, 1)
                else:
                    end: float = period["end"]
                    used: int = period["used"]
                    option = client.write_option(last_update_time=snap.update_time)
                    if now >= end:
                        batch.update(ref, fresh, option=option)
                        taken = Taken(True, now + per_seconds, 1)
                    elif used < limit:
                        batch.update(ref, {"used": used + 1}, option=option)
                        taken = Taken(True, end, used + 1)
                    else:
                        return Taken(False, end, used)
                if await _commit(batch) is not None:
                    return taken
                # Another email of this route got in first: read again, spread out a little.
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
        raise StoreUnavailable(f"firestore: rate kept conflicting ({_TAKE_ATTEMPTS} attempts)")

    # --- flush ------------------------------------------------------------------------------

    async def due(self, now: float, limit: int) -> list[str]:
        if limit <= 0:
            return []
        async with operation():
            client = await self._firestore.get()
            query = (
                client.collection(self._windows)
                .where(filter=FieldFilter("ready_at", "<=", now))
                .order_by("ready_at")
                .limit(limit)
                .select(["id"])
            )
            return [snap.get("id") async for snap in query.stream(**call_options())]

    async def claim(self, window_id: str, owner: str, lease_seconds: float, now: float) -> Claim:
        def decide(window: dict[str, Any] | None) -> tuple[Claim, dict[str, Any] | None]:
            if window is None or window["state"] == WindowState.DONE:
                return Claim.DONE, None
            if (
                window["state"] == WindowState.SENDING
                and window["lease_until"] > now
                and window["owner"] != owner
            ):
                return Claim.IN_FLIGHT, None
            lease_until = now + lease_seconds
            fields = {
                "state": WindowState.SENDING.value,
                "owner": owner,
                "lease_until": lease_until,
                "ready_at": lease_until,
            }
            return Claim.CLAIMED, fields

        return await self._transition(window_id, now, "claim", decide)

    async def complete(self, window_id: str, owner: str, now: float) -> None:
        def decide(window: dict[str, Any] | None) -> tuple[None, dict[str, Any] | None]:
            if window is None or window["state"] == WindowState.DONE:
                return None, None
            fields = {
                "state": WindowState.DONE.value,
                "owner": DELETE_FIELD,
                "lease_until": DELETE_FIELD,
                "ready_at": DELETE_FIELD,  # out of `due`'s index
                "pending": False,
                "expire_at": _timestamp(now + self.retention_seconds),
            }
            return None, fields

        await self._transition(window_id, now, "complete", decide)

    async def release(self, window_id: str, owner: str, now: float) -> None:
        def decide(window: dict[str, Any] | None) -> tuple[None, dict[str, Any] | None]:
            if window is None or window["state"] != WindowState.SENDING:
                return None, None
            if window["owner"] != owner:
                return None, None
            fields = {
                "state": WindowState.RELEASED.value,
                "owner": DELETE_FIELD,
                "lease_until": DELETE_FIELD,
                "ready_at": now,
            }
            return None, fields

        await self._transition(window_id, now, "release", decide)

    async def _transition(
        self,
        window_id: str,
        now: float,
        what: str,
        decide: Callable[[dict[str, Any] | None], tuple[T, dict[str, Any] | None]],
    ) -> T:
        """Read the window, let `decide` say the answer and the fields to write (None: nothing
        to write), and write them conditionally; read again when another writer came first."""
        async with operation():
            client = await self._firestore.get()
            ref = self._window(client, window_id)
            for _ in range(_ATTEMPTS):
                snap = await ref.get(**call_options())
                answer, fields = decide(snap.to_dict())
                if fields is None or await self._write_window(client, snap, fields, now):
                    return answer
        raise StoreUnavailable(f"firestore: {what} kept conflicting ({_ATTEMPTS} attempts)")

    async def _write_window(
        self, client: AsyncClient, snap: Snapshot, fields: dict[str, Any], now: float
    ) -> bool:
        """Writes the window as read (precondition), closing it if it was OPEN; False when
        another writer changed it or its route first."""
        batch = client.batch()
        window = snap.to_dict() or {}
        if window["state"] == WindowState.OPEN:
            # This write closes it: its commit time is the closing time (see the module doc).
            route_ref = self._route(client, window["route"])
            route_snap = await route_ref.get(**call_options())
            if (route_snap.to_dict() or {}).get("open") == window["id"]:
                option = client.write_option(last_update_time=route_snap.update_time)
                batch.update(route_ref, {"open": None, "last_closed_at": now}, option=option)
        else:
            fields = {**fields, "closed_us": _closing_us(snap)}
        option = client.write_option(last_update_time=snap.update_time)
        batch.update(snap.reference, fields, option=option)
        return await _commit(batch) is not None

    # --- reading ----------------------------------------------------------------------------

    async def read(self, window_id: str) -> DigestWindow:
        # A flush reads a whole window, one document per event: a longer bound than a delivery's.
        async with operation(WINDOW_READ_SECONDS):
            client = await self._firestore.get()
            ref = self._window(client, window_id)
            snap = await ref.get(**call_options())
            if not snap.exists:
                raise UnknownWindow(window_id)
            events = ref.collection(self._events).stream(**call_options(WINDOW_READ_SECONDS))
            arrived = [event async for event in events]
        try:
            window = snap.to_dict() or {}
            closed = None if window["state"] == WindowState.OPEN else _closing_us(snap)
            counted = [
                (_microseconds(event.create_time), event.id, event.get("item"))
                for event in arrived
                if event.create_time is not None
            ]
            summary = DigestSummary.empty(window["max_items"])
            for created, _, item in sorted(counted, key=lambda e: (e[0], e[1])):
                if closed is None or created <= closed:
                    summary.add(DigestItem.from_json(item))
            return DigestWindow(_info(window, summary.count), summary)
        except (KeyError, TypeError, ValueError) as error:
            raise StoreUnavailable(
                f"firestore: window {window_id!r} is damaged: {error}"
            ) from error

    async def pending(self, now: float) -> list[WindowInfo]:
        async with operation():
            client = await self._firestore.get()
            query = client.collection(self._windows).where(
                filter=FieldFilter("pending", "==", True)
            )
            windows = [snap async for snap in query.stream(**call_options())]
            counts = await asyncio.gather(*(self._count(snap) for snap in windows))
        infos = [
            _info(snap.to_dict() or {}, count) for snap, count in zip(windows, counts, strict=True)
        ]
        return sorted(infos, key=lambda info: (info.due_at, info.window_id))

    async def _count(self, snap: Snapshot) -> int:
        """The events in a window's digest: all of them while it is open (an aggregation, one
        read per thousand events), else those created by its closing time."""
        events = snap.reference.collection(self._events)
        if (snap.to_dict() or {}).get("state") == WindowState.OPEN:
            result = await events.count(alias="n").get(**call_options())
            return int(result[0][0].value)
        closed = _closing_us(snap)
        created = [e.create_time async for e in events.select([]).stream(**call_options())]
        return sum(1 for t in created if t is not None and _microseconds(t) <= closed)

    async def aclose(self) -> None:
        await self._firestore.aclose()


def _info(window: dict[str, Any], events: int) -> WindowInfo:
    return WindowInfo(
        window_id=window["id"],
        route=window["route"],
        opened_at=window["opened_at"],
        due_at=window["due_at"],
        events=events,
        state=WindowState(window["state"]),
    )


def _counted(window: Snapshot, created: datetime) -> bool:
    """Whether an event created at `created` is in the window's digest."""
    if (window.to_dict() or {}).get("state") == WindowState.OPEN:
        return True
    return _microseconds(created) <= _closing_us(window)


def _closing_us(window: Snapshot) -> int:
    """When a window that is not OPEN was closed: the field, or, until a write after the
    closing one copied it there, the commit time of the closing write (its update time).
    Rounded up: every event committed before the close is at or before it."""
    closed = (window.to_dict() or {}).get("closed_us")
    if isinstance(closed, int):
        return closed
    if window.update_time is None:
        raise StoreUnavailable("firestore: a window read without its update time")
    return _microseconds(window.update_time, ceiling=True)


def _microseconds(value: datetime, *, ceiling: bool = False) -> int:
    micros = (value - _EPOCH) // _MICROSECOND
    nanos = getattr(value, "nanosecond", 0) % 1000
    return micros + 1 if ceiling and nanos else micros


def _timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


async def _get_all(client: AsyncClient, refs: Sequence[AsyncDocumentReference]) -> list[Snapshot]:
    """The documents in the order asked (one round trip; get_all answers in any order)."""
    found = {s.reference.path: s async for s in client.get_all(list(refs), **call_options())}
    return [found[ref.path] for ref in refs]


async def _commit(batch: AsyncWriteBatch) -> list[Any] | None:
    """The write results, or None when a create or precondition failed: nothing was written
    (a batch is atomic), and the caller reads again."""
    try:
        return await batch.commit(**call_options())
    except (AlreadyExists, FailedPrecondition, NotFound):
        return None
