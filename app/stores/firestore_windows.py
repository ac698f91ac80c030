"""Digest windows in Firestore, shared by every Cloud Run instance: no VPC, nothing running
between events, and windows of any size.

Firestore sustains about one write per second on one document, and a burst of 5,000 uploads must
not write one window document 5,000 times. So an event is a document of its own, and nothing
that every event touches is ever written:
- `{prefix}-digest-routes/<sha256(route)>`: the route's OPEN window (`open`), the start of its
  latest window (`last_opened_ms`) and when its previous window closed (`last_closed_at`);
  written when a window opens or closes, never per event.
- `{prefix}-digest-windows/<sha256(window id)>`: state, the token of its latest claim (`token`),
  the token that completed it while holding it (`done_by`), lease, times, `max_items`, the
  leading change (`leading`), how many shards hold its events (`shards`); `ready_at` (when `due`
  lists it) only while not done, so `due` is one range query on one field (Firestore's automatic
  single-field index: no composite index), `pending` (true until done) for `pending`; once a
  flush has read it after its close, its summary (`summary`, zlib-compressed JSON, and `events`).
- `.../<window>/{prefix}-digest-events-<n>/<change digest>`: one per event, in one of SHARDS
  collections chosen by the change digest (n = 0 .. SHARDS - 1: a collection group per shard).
  Each holds the DigestItem JSON (`item`) and the fields the summary is computed from
  (`event_fields`).
- `{prefix}-digest-changes/<change digest>`: the window a change joined (deduplication).
- `{prefix}-digest-rates/<sha256(route)>`: a rate route's current period, and under it
  `{prefix}-digest-changes/<change digest>` for each change that took an email of that period
  (the same collection group as the changes, so the same TTL policy deletes them).

Writes are batches (atomic across documents) with `create()` and `last_update_time`
preconditions, not transactions (but one, below): contended transactions queue up and time out (on
the emulator too), while a batch whose precondition failed is simply read again and retried.
- Opening a window is one batch: create the window, point the route at it (precondition: the
  route as read), create the change and event documents. Of two instances opening at once, one
  batch fails whole and its add joins the winner's window.
- Joining is one batch: create the change document (AlreadyExists: a duplicate) and the event.
- Closing (a claim or completion of an OPEN window) is one batch: the window's new state
  (precondition) and the route without an open window (precondition).
- A rate route's overflow is the one transaction: the event joins the window as above and the
  email keys' done marks (app.stores.firestore_claims.done_fields) are written with it. The
  transaction reads the route, so no close commits between that read and the join (Firestore
  serializes them): the event is in the window's digest, never left behind uncounted by a crash
  while its keys are already done.

The closing race: an add read the route (window W open), then a flush claimed W, then the add's
event landed in W. Commit times decide, as Firestore orders them: W's closing time `closed_us`
is the commit time of the write that closed it (until a later write copies it into the field,
the window's own update time), rounded up to the microsecond, and W's digest holds exactly its
events committed at or before it: the summary of a closed window is read at that time
(`read_time`). After joining, an add reads W back: still open, or closed after its event -> the
event is in W's digest. Closed before it -> the add moves the event to the route's next window
(one batch: delete it from W, re-point the change, join the next window), so every event is in
exactly one digest. A change whose event is missing from its window, or sits there uncounted (a
crash between joining and moving), is joined again when the change is delivered again, not taken
for a duplicate.

Reading a window never reads its events one by one. Its summary comes from these queries, each on
every shard at one `read_time`:
- an aggregation: the count, and the sums of `bytes` and of a 0/1 field per event type;
- the first event by `time` either way (first and last time);
- the first `max(max_items, MAX_BUCKETS)` by arrival (`arrived`, the adder's clock, then the
  document id: each shard's page, merged): the items listed, and the buckets and the common
  folder of these first events;
- the least and the greatest `place` ("<bucket>/<name>") of each shard: when they are of one
  bucket, so is every event, and the folder of their names' common prefix is that of all names
  (every name lies between them): a window of one bucket is summed up from six queries a shard,
  whatever its size and folders;
- only for several buckets, a walk that checks the buckets and folder of the first events and
  the extremes against every event: the events of the known buckets under the known folder are
  one range of `place` per bucket, and the walk asks for the first event in each gap between
  those ranges. None found: the buckets and the folder are exact (every name starts with the
  known folder, and no "/" follows it in their common prefix, so none follows it in all names'
  either). An event found widens them as DigestSummary.add would (its bucket joins, the folder
  is cut back to what its name shares) and the walk goes on after it: one step per gap, per
  bucket found and per folder cut back; it starts at the least `place` and ends at the
  greatest, so the gaps before and after all buckets take no query. Seven queries a shard for
  two buckets under one folder.
  (Measured on the emulator: one OR query of all the gaps costs as much as a query per gap, and
  the two range queries of a one-bucket walk more than the two unfiltered extremes.)
Buckets in order of first appearance: those of the first events in their order (exact: nothing
arrived before them), then the others, and when two or more others are to be ordered, each one's
first event by `bucket` ("<bucket> <arrived>": the least of one bucket's range is its first to
arrive); past MAX_BUCKETS, one count of the events outside the listed buckets' ranges. A window of
dozens of buckets, whose walk would take too many steps, takes the least and the greatest name
instead (the common prefix of all names is theirs) and walks each shard's buckets by `bucket`, as
many as it can (logged).
A flush reads O(max_items + shards) documents, and aggregations are billed one read per 1,000
index entries they scan.

The emulator runs a query by scanning the collection group of the shard it asks (no index): about
10 µs an event a query. So shards do not share a collection group (each query would scan every
event of the window), and a read costs its queries per shard times the window's events, whatever
the number of shards: on two cores, about 3 s for 60,000 events and 7-9 s for 200,000, where
Firestore seeks its indexes. Aggregations go in arrival order (`order_by("arrived")`): the
emulator then counts and sums in about half the time; and a read keeps two queries in flight
(_QUERIES_AT_ONCE).

Firestore reads at a past time only within the hour: the first read after a close stores the
summary in the window, and a window closed longer ago without one is summed up as it is now, with
a WARNING (an event that landed after the close and was not moved yet would be counted).

The events are spread over SHARDS collections, not kept in one with values prefixed by a shard,
because Firestore documents its limit per collection: an indexed field whose value grows with
time (`arrived`, `time`, `bucket`, often `name` and `place` in a bulk upload) caps the writes to
a collection at 500 a second (Firestore docs, "Best practices", "Index exemptions"). Document ids
are change digests: random, not increasing. `item` and `expire_at` are exempt from indexing
(eventarc.tf, in each shard's collection group).

Deletion is Firestore's TTL policy on `expire_at` (Terraform creates one per collection group):
changes after the retention, done windows after the retention, a rate period at its end, and
events EVENT_KEEP_SECONDS after their window was due plus the retention (set when the event is
written, because rewriting thousands of events when their window is sent would cost as many
writes as the events did). Route documents are one per digest route and stay.

Windows written before the shards (no `shards` field) keep their events in
`.../<window>/{prefix}-digest-events` (events joining them later go to the shards); they are read
by streaming those events, as before, and their old `owner` claims read as token 0.

Every operation is bounded in time (app.stores.firestore.operation) and Firestore's failures are
StoreUnavailable: the event is answered 503 and delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import os
import random
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from google.api_core.exceptions import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    GoogleAPICallError,
    NotFound,
)
from google.cloud.firestore import (
    DELETE_FIELD,
    AsyncClient,
    AsyncCollectionReference,
    AsyncDocumentReference,
    AsyncQuery,
    AsyncTransaction,
    AsyncWriteBatch,
    DocumentSnapshot,
)
from google.cloud.firestore_v1.base_query import And, BaseFilter, FieldFilter, Or

from app.digests.window import MAX_BUCKETS, DigestItem, DigestSummary, folder
from app.events.models import EventType
from app.stores.base import Claim, Lease, StoreUnavailable, next_token
from app.stores.firestore import (
    CALL_SECONDS,
    DIGEST_EVENT_SHARDS,
    WINDOW_READ_SECONDS,
    FirestoreClient,
    FirestoreLocation,
    call_options,
    claims_collection,
    digest_changes_collection,
    digest_event_shard_collection,
    digest_events_collection,
    digest_rates_collection,
    digest_routes_collection,
    digest_windows_collection,
    document_id,
    operation,
)
from app.stores.firestore_claims import done_fields
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
Snapshot = DocumentSnapshot[AsyncDocumentReference]
T = TypeVar("T")

# Collections a window's events are spread over (see the module doc): each takes 500 writes a
# second with fields that grow with time, so 8 take a bulk upload of 4,000 events a second. A
# read queries each of them: in Firestore an index seek each; the emulator scans the shard's
# collection group for each, so there a read costs its queries per shard times all events,
# whatever the number of shards.
SHARDS = DIGEST_EVENT_SHARDS
# An event document outlives its window's due time by the retention and this much: a window
# still unsent this long after it was due (its digest failing for a month) loses its events.
EVENT_KEEP_SECONDS = 30 * 24 * 3600.0
# Firestore reads at a past time within the last hour (RunQuery.read_time); the margin covers
# the read itself and a clock that drifts.
READ_TIME_REACH = timedelta(minutes=55)
# Each retry follows another writer's success (a window opened, a state changed), so a few
# suffice; `take` under many concurrent emails of one route needs more, spaced out.
_ATTEMPTS = 8
_TAKE_ATTEMPTS = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_EARLIEST_TIME = -(2**63)  # below every event time, in microseconds since 1970
# The event types counted by a 0/1 field of their own; the last one is the rest of the count
# (an aggregation query takes at most five aggregations: count, bytes and these).
_FLAGGED = tuple(EventType)[:-1]
# A `bucket` field is "<bucket> <arrived>", the bucket percent-encoded (`_quoted`: a valid bucket
# name is left as it is), which leaves no character at or below "!" in it: one bucket's events
# are the range [bucket + " ", bucket + "!").
_BUCKET_OPEN, _BUCKET_CLOSE = " ", "!"
# A `place` field is "<bucket>/<name>", the bucket percent-encoded (no "/" in it): the names of
# one bucket under one folder are one range of it, [bucket/folder, bucket/folder[:-1] + "0").
_PLACE_SEPARATOR, _PLACE_AFTER = "/", "0"
# A summary walks each shard past the events its first events do not explain, one query a step:
# one step per gap between the known buckets, per bucket found and per narrower folder found.
# Past this many in one shard (a window of dozens of buckets), it falls back to finding the
# prefix from the least and greatest name and walking each shard's buckets (below).
_MOST_PLACE_STEPS = 64
# That fallback walks each shard's buckets one query at a time; past this many in one shard,
# the buckets listed may not be the first to appear (logged).
_MOST_BUCKETS_WALKED = 64
# A read keeps this many of its queries in flight, not all of them: Firestore answers each in tens
# of milliseconds (a read's fifty-odd queries, two at a time, take well under a second), and the
# emulator, which scans for each, gets through them faster a few at a time (a warm emulator on two
# cores read 200,000 events in 6.6 s with 2 in flight, 7.0 s with 4, 7.3 s with 8, 8.6 s with all).
_QUERIES_AT_ONCE = 8


def event_fields(item: DigestItem, arrived_us: int, expire_at: datetime) -> dict[str, Any]:
    """One event's document: its DigestItem (`item`, JSON) and what the summary is computed
    from: `arrived` (the adder's clock in microseconds: the listing's order), `time` (the event
    time in microseconds since 1970, or null), `name`, `place` (bucket and name: which bucket
    and folder), `bucket` (with the arrival: a bucket's first event), `bytes` (the size of an
    upload, else 0), a 0/1 field per counted type."""
    size = item.size if item.event_type is EventType.FINALIZED and item.size is not None else 0
    bucket = _quoted(item.bucket)
    return {
        "item": json.dumps(item.to_json(), separators=(",", ":"), ensure_ascii=False),
        "arrived": arrived_us,
        "time": None if item.time is None else _microseconds(item.time),
        "name": item.name,
        "place": f"{bucket}{_PLACE_SEPARATOR}{item.name}",
        "bucket": f"{bucket}{_BUCKET_OPEN}{arrived_us:020d}",
        "bytes": size,
        **{kind.short: int(item.event_type is kind) for kind in _FLAGGED},
        "expire_at": expire_at,
    }


def event_shard(key: str, shards: int = SHARDS) -> int:
    """The shard of the event whose change digest (hex) is `key`, of a window with `shards`."""
    return int(key[:2], 16) % shards


@dataclass(frozen=True, slots=True)
class _Join:
    """What one attempt of an add decided: its answer, whether it wrote anything, and the open
    window its event joined (read back after the batch, for the closing race)."""

    added: Added
    writes: bool = True
    joined: str | None = None


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
        self._claims = claims_collection(prefix)

    @classmethod
    def from_url(
        cls, url: str, retention_seconds: float = RETENTION_SECONDS
    ) -> FirestoreDigestStore:
        """ValueError for a bad URL; the client is made on the first call."""
        return cls(FirestoreLocation.parse(url), retention_seconds)

    # --- references ---------------------------------------------------------------------

    def _route(self, client: AsyncClient, route: str) -> AsyncDocumentReference:
        return client.collection(self._routes).document(document_id(route))

    def _window(self, client: AsyncClient, window: str) -> AsyncDocumentReference:
        return client.collection(self._windows).document(document_id(window))

    def event_reference(
        self, client: AsyncClient, window: str, key: str, shards: int | None = SHARDS
    ) -> AsyncDocumentReference:
        """Where the event of change digest `key` lives in `window`, whose events are spread
        over `shards` (None: an event of the layout before shards)."""
        events = self._events
        if shards:
            events = digest_event_shard_collection(self.location.prefix, event_shard(key, shards))
        window_ref = self._window(client, window)
        event: AsyncDocumentReference = window_ref.collection(events).document(key)
        return event

    def _event_collections(
        self, window: AsyncDocumentReference, shards: int | None
    ) -> list[AsyncCollectionReference]:
        """The collections of a window's events: its shards, and for a window of the layout
        before shards, its own events collection too."""
        found: list[AsyncCollectionReference] = [
            window.collection(digest_event_shard_collection(self.location.prefix, n))
            for n in range(shards or SHARDS)
        ]
        return found if shards else [window.collection(self._events), *found]

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
                batch = client.batch()
                join = await self._join(
                    client, batch, None, route, window_seconds, max_items, item, key, now,
                    leading_after,
                )  # fmt: skip
                added = await self._commit_join(client, batch, join)
                if added is not None:
                    return added
        raise StoreUnavailable(f"firestore: digest add kept conflicting ({_ATTEMPTS} attempts)")

    async def overflow(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        done_keys: Sequence[str],
    ) -> Added:
        key = change_digest(route, item.change_key).hex()
        # The claims store reads its done marks by the wall clock, not the digest's `now`.
        marks = done_fields(None, _timestamp(time.time() + self.retention_seconds))
        async with operation():
            client = await self._firestore.get()
            claims = client.collection(self._claims)

            async def attempt(transaction: AsyncTransaction) -> Added:
                join = await self._join(
                    client, transaction, transaction, route, window_seconds, max_items, item,
                    key, now, None,
                )  # fmt: skip
                if join.joined is not None:
                    await self._before_join(join.joined)
                for done_key in done_keys:
                    transaction.set(claims.document(document_id(done_key)), marks)
                return join.added

            for _ in range(_ATTEMPTS):
                try:
                    return await _transaction(client, attempt)
                except (Aborted, AlreadyExists, FailedPrecondition, NotFound):
                    continue  # another writer came first: read again
        raise StoreUnavailable(f"firestore: overflow kept conflicting ({_ATTEMPTS} attempts)")

    async def _join(
        self,
        client: AsyncClient,
        writer: AsyncWriteBatch,
        transaction: AsyncTransaction | None,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        key: str,
        now: float,
        leading_after: float | None,
    ) -> _Join:
        """Read what an add needs (in `transaction` when given) and put its writes in `writer`."""
        route_ref, change_ref = self._route(client, route), self._change(client, key)
        route_snap, change_snap = await _get_all(client, [route_ref, change_ref], transaction)
        state = route_snap.to_dict() or {}
        previous: float | None = state.get("last_closed_at")
        change = change_snap.to_dict()
        if change is not None and change["expire_at"] > _timestamp(now):
            joined: str = change["window"]
            window_ref = self._window(client, joined)
            event_ref = self.event_reference(client, joined, key, change.get("shards"))
            window_snap, event_snap = await _get_all(client, [window_ref, event_ref], transaction)
            window = window_snap.to_dict()
            if window is None:  # done and purged: it was sent
                return _Join(Added(joined, True, False, previous, False), writes=False)
            if window.get("leading") == key:
                return _Join(Added(joined, True, False, previous, True), writes=False)
            if event_snap.create_time is not None:
                if _counted(window_snap, event_snap.create_time):
                    return _Join(Added(joined, True, False, previous, False), writes=False)
                writer.delete(event_snap.reference)  # it landed after its window closed
            # else: the change was written but its event was not: join again

        open_window: str | None = state.get("open")
        # A new window's events go to SHARDS shards, an open one's to those its route names (a
        # window of the layout before shards gets today's, where reading it looks too).
        shards: int = SHARDS if open_window is None else state.get("shards") or SHARDS

        def join(target: str) -> None:
            fields = {
                "window": target,
                "route": route,
                "shards": shards,
                "expire_at": _timestamp(now + self.retention_seconds),
            }
            if change_snap.exists:
                option = client.write_option(last_update_time=change_snap.update_time)
                writer.update(change_ref, fields, option=option)
            else:
                writer.create(change_ref, fields)

        def event(target: str, due_at: float) -> None:
            expire = due_at + self.retention_seconds + EVENT_KEEP_SECONDS
            fields = event_fields(item, time.time_ns() // 1000, _timestamp(expire))
            writer.create(self.event_reference(client, target, key, shards), fields)

        if open_window is None:
            opened_ms = next_opened_ms(now, state.get("last_opened_ms"))
            new = window_id(route, opened_ms)
            leading = leads(leading_after, previous, now)
            due_at = opened_ms / 1000 + window_seconds
            writer.create(
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
                    "shards": shards,
                },
            )
            opening = {"route": route, "open": new, "last_opened_ms": opened_ms, "shards": shards}
            if route_snap.exists:
                option = client.write_option(last_update_time=route_snap.update_time)
                writer.update(route_ref, opening, option=option)
            else:
                writer.create(route_ref, {**opening, "last_closed_at": None})
            join(new)
            if not leading:
                event(new, due_at)
            return _Join(Added(new, False, True, previous, leading))

        join(open_window)
        event(open_window, now + window_seconds)  # only bounds the expiry; the window keeps its own
        return _Join(Added(open_window, False, False, previous, False), joined=open_window)

    async def _commit_join(
        self, client: AsyncClient, batch: AsyncWriteBatch, join: _Join
    ) -> Added | None:
        """Commit an add's batch: its answer, or None when another writer got in between or the
        window closed before the event landed (the next attempt reads again and moves it)."""
        if not join.writes:
            return join.added
        if join.joined is not None:
            await self._before_join(join.joined)
        results = await _commit(batch)
        if results is None:
            return None
        if join.joined is None:
            return join.added
        created = results[-1].update_time  # the event is the batch's last write
        await self._after_join(join.joined)
        window_snap = await self._window(client, join.joined).get(**call_options())
        if window_snap.exists and _counted(window_snap, created):
            return join.added
        return None

    async def _before_join(self, window: str) -> None:
        """Between reading the route and writing the event into its open window (tests pause
        here to let a flush close the window first)."""

    async def _after_join(self, window: str) -> None:
        """Between writing the event and reading its window back (tests pause or fail here)."""

    # --- rate -------------------------------------------------------------------------------

    async def take(
        self, route: str, change_key: str, limit: int, per_seconds: float, now: float
    ) -> Taken:
        check_rate(limit, per_seconds)
        async with operation():
            client = await self._firestore.get()
            ref = client.collection(self._rates).document(document_id(route))
            taker = ref.collection(self._changes).document(change_digest(route, change_key).hex())
            for attempt in range(_TAKE_ATTEMPTS):
                snap, taker_snap = await _get_all(client, [ref, taker])
                period = snap.to_dict()
                batch = client.batch()
                if period is None or now >= period["end"]:
                    end, used = now + per_seconds, 1
                    fresh = {"route": route, "end": end, "used": 1, "expire_at": _timestamp(end)}
                    if period is None:
                        batch.create(ref, fresh)
                    else:
                        option = client.write_option(last_update_time=snap.update_time)
                        batch.update(ref, fresh, option=option)
                else:
                    end, used = period["end"], period["used"]
                    if (taker_snap.to_dict() or {}).get("end") == end:
                        return Taken(True, end, used, again=True)
                    if used >= limit:
                        return Taken(False, end, used)
                    used += 1
                    option = client.write_option(last_update_time=snap.update_time)
                    batch.update(ref, {"used": used}, option=option)
                # Remembered for this period only: a taker of an earlier period has its `end`.
                batch.set(taker, {"end": end, "expire_at": _timestamp(end)})
                if await _commit(batch) is not None:
                    return Taken(True, end, used)
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

    async def claim(self, window_id: str, lease_seconds: float, now: float) -> Lease | Claim:
        def decide(window: dict[str, Any] | None) -> tuple[Lease | Claim, dict[str, Any] | None]:
            if window is None or window["state"] == WindowState.DONE:
                return Claim.DONE, None
            if window["state"] == WindowState.SENDING and window["lease_until"] > now:
                return Claim.IN_FLIGHT, None
            lease = Lease(next_token(_token_of(window), now), now + lease_seconds)
            fields = {
                "state": WindowState.SENDING.value,
                "token": lease.token,
                "lease_until": lease.expires,
                "ready_at": lease.expires,
                "owner": DELETE_FIELD,  # an old claim's
            }
            return lease, fields

        return await self._transition(window_id, now, "claim", decide)

    async def renew(
        self, window_id: str, token: int, lease_seconds: float, now: float
    ) -> Lease | None:
        def decide(window: dict[str, Any] | None) -> tuple[Lease | None, dict[str, Any] | None]:
            if (
                window is None
                or window["state"] != WindowState.SENDING
                or _token_of(window) != token
                or window["lease_until"] <= now
            ):
                return None, None
            lease = Lease(token, now + lease_seconds)
            return lease, {"lease_until": lease.expires, "ready_at": lease.expires}

        return await self._transition(window_id, now, "renew", decide)

    async def complete(self, window_id: str, token: int, now: float) -> bool:
        def decide(window: dict[str, Any] | None) -> tuple[bool, dict[str, Any] | None]:
            if window is None:
                return False, None
            if window["state"] == WindowState.DONE:
                return window.get("done_by") == token, None  # a retry, or another's
            held = _token_of(window) == token
            fields = {
                "state": WindowState.DONE.value,
                "done_by": token if held else None,
                "owner": DELETE_FIELD,
                "lease_until": DELETE_FIELD,
                "ready_at": DELETE_FIELD,  # out of `due`'s index
                "pending": False,
                "expire_at": _timestamp(now + self.retention_seconds),
            }
            return held, fields

        return await self._transition(window_id, now, "complete", decide)

    async def release(self, window_id: str, token: int, now: float) -> None:
        def decide(window: dict[str, Any] | None) -> tuple[None, dict[str, Any] | None]:
            if window is None or window["state"] != WindowState.SENDING:
                return None, None
            if _token_of(window) != token:
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
        # A flush waits for this, not a delivery: the longer bound of a flush's read.
        async with operation(WINDOW_READ_SECONDS):
            client = await self._firestore.get()
            ref = self._window(client, window_id)
            snap = await ref.get(**call_options())
            window = snap.to_dict()
            if window is None:
                raise UnknownWindow(window_id)
            try:
                summary = await self._summary(snap, window)
            except (KeyError, TypeError, ValueError, zlib.error) as error:
                raise StoreUnavailable(
                    f"firestore: window {window_id!r} is damaged: {error}"
                ) from error
        return DigestWindow(_info(window, summary.count), summary)

    async def _summary(self, snap: Snapshot, window: dict[str, Any]) -> DigestSummary:
        stored = window.get("summary")
        if stored is not None:
            return DigestSummary.from_json(json.loads(zlib.decompress(stored)))
        shards: int | None = window.get("shards")
        collections = self._event_collections(snap.reference, shards)
        if shards:
            at, exact = self._as_of(snap, window, "read")
            summary = await _summarize(_Events(collections, at), window["max_items"])
        else:  # the layout before shards: every event read now, its create time decides
            closed = None if window["state"] == WindowState.OPEN else _closing_us(snap)
            summary = await _streamed(_Events(collections, None), window["max_items"], closed)
            exact = True
        if exact and window["state"] in (WindowState.SENDING, WindowState.RELEASED):
            await self._keep(snap, summary)
        return summary

    def _as_of(self, snap: Snapshot, window: dict[str, Any], what: str) -> tuple[datetime, bool]:
        """When to read a window's events: now while it is open, else its closing time; and
        whether that gives its digest exactly (False: closed longer ago than Firestore reads
        back, and read as it is now)."""
        now = snap.read_time
        if now is None:
            raise StoreUnavailable("firestore: a window read without its read time")
        if window["state"] == WindowState.OPEN:
            return now, True
        closed = _EPOCH + timedelta(microseconds=_closing_us(snap))
        if now - closed <= READ_TIME_REACH:
            # Not after the read of the window itself: Firestore refuses a time to come.
            return min(closed, now), True
        log.warning(
            "digest window closed too long ago to read as it was; read as it is now: the count "
            "may include an event that landed after the close and was not moved yet",
            extra={"window": window["id"], "closed_at": closed.isoformat(), "reading": what},
        )
        return now, False

    async def _keep(self, snap: Snapshot, summary: DigestSummary) -> None:
        """Store a closed window's summary in it, so a flush more than an hour after the close
        still sends it exactly. Conditional on the window as read; a failure only means the next
        read computes it again."""
        packed = zlib.compress(json.dumps(summary.to_json(), separators=(",", ":")).encode())
        fields = {"summary": packed, "events": summary.count, "closed_us": _closing_us(snap)}
        option = AsyncClient.write_option(last_update_time=snap.update_time)
        try:
            await snap.reference.update(fields, option=option, **call_options())
        except (FailedPrecondition, NotFound):
            return  # claimed, renewed or completed meanwhile: the next read stores it
        except GoogleAPICallError as error:  # a summary past Firestore's 1 MiB document
            log.warning(
                "digest window summary not stored",
                extra={"window": (snap.to_dict() or {}).get("id"), "reason": str(error)},
            )

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
        """The events in a window's digest: its stored summary's count, or a count aggregation
        over its shards (at its closing time once it is closed), never its events."""
        window = snap.to_dict() or {}
        if isinstance(window.get("events"), int):
            return int(window["events"])
        at, _ = self._as_of(snap, window, "pending")
        shards: int | None = window.get("shards")
        events = _Events(self._event_collections(snap.reference, shards), at, arrived=bool(shards))
        return await events.count()

    async def aclose(self) -> None:
        await self._firestore.aclose()


class _Events:
    """One window's event collections (its shards), read as they were at `at` (None: now).
    `arrived`: every event has its `arrived` field (not those of the layout before shards)."""

    def __init__(
        self, collections: list[AsyncCollectionReference], at: datetime | None, arrived: bool = True
    ) -> None:
        self.collections = collections
        self.arrived = arrived
        self.slots = asyncio.Semaphore(_QUERIES_AT_ONCE)
        self.options: dict[str, Any] = call_options(WINDOW_READ_SECONDS)
        if at is not None:
            self.options = {**self.options, "read_time": at}

    def all(self, collection: AsyncCollectionReference) -> Any:
        """Every event of a shard, as the query an aggregation runs over: in arrival order,
        which the emulator counts and sums in about half the time it takes without an order
        (Firestore reads the `arrived` index instead of the documents' own: the same cost)."""
        return collection.order_by("arrived") if self.arrived else collection

    async def documents(self, query: AsyncQuery) -> list[Snapshot]:
        async with self.slots:
            return [document async for document in query.stream(**self.options)]

    async def aggregate(self, aggregation: Any) -> Any:
        """The results of an aggregation query (its builders are untyped)."""
        async with self.slots:
            return await aggregation.get(**self.options)

    async def each(self, shape: Callable[[AsyncCollectionReference], Any]) -> list[list[Snapshot]]:
        """The documents of the query `shape(collection)` in every shard."""
        return list(await asyncio.gather(*(self.documents(shape(c)) for c in self.collections)))

    async def first(
        self, where: BaseFilter | None, order_by: str, *, descending: bool = False
    ) -> list[Snapshot]:
        """From each shard that has one, its first event by `order_by` matching `where`."""

        def shape(collection: AsyncCollectionReference) -> Any:
            query: Any = collection if where is None else collection.where(filter=where)
            direction = "DESCENDING" if descending else "ASCENDING"
            return query.order_by(order_by, direction=direction).limit(1)

        return [documents[0] for documents in await self.each(shape) if documents]

    async def totals(self) -> dict[str, int]:
        """count, the sum of `bytes` and the count of each flagged type, over every shard."""

        async def one(collection: AsyncCollectionReference) -> dict[str, int]:
            aggregation = self.all(collection).count(alias="count").sum("bytes", alias="bytes")
            for kind in _FLAGGED:
                aggregation = aggregation.sum(kind.short, alias=kind.short)
            results = await self.aggregate(aggregation)
            return {result.alias: int(result.value) for result in results[0]}

        totals: dict[str, int] = {}
        for shard in await asyncio.gather(*(one(c) for c in self.collections)):
            for name, value in shard.items():
                totals[name] = totals.get(name, 0) + value
        return totals

    async def count(self, where: BaseFilter | None = None) -> int:
        async def one(collection: AsyncCollectionReference) -> int:
            query: Any = self.all(collection) if where is None else collection.where(filter=where)
            results = await self.aggregate(query.count())
            return int(results[0][0].value)

        return sum(await asyncio.gather(*(one(c) for c in self.collections)))

    async def first_arrivals(self, limit: int) -> list[Snapshot]:
        """The first `limit` events by arrival (`arrived`, then document id): the shards' pages
        merged, a shard's next page read only when the merge runs through its first."""
        if limit <= 0:
            return []
        share = limit // len(self.collections)
        size = share + 2 * int(share**0.5) + 4  # a shard's share, and room for chance

        async def page(collection: AsyncCollectionReference, after: Snapshot | None) -> list[Any]:
            query = collection.order_by("arrived").limit(size)
            return await self.documents(query if after is None else query.start_after(after))

        pages = await asyncio.gather(*(page(c, None) for c in self.collections))
        heads = [list(reversed(p)) for p in pages]  # popped from the end
        more = [len(p) == size for p in pages]
        ready = [(_arrival(h[-1]), n) for n, h in enumerate(heads) if h]
        heapq.heapify(ready)
        found: list[Snapshot] = []
        while ready and len(found) < limit:
            _, n = heapq.heappop(ready)
            document = heads[n].pop()
            found.append(document)
            if not heads[n] and more[n] and len(found) < limit:
                following = await page(self.collections[n], document)
                heads[n], more[n] = list(reversed(following)), len(following) == size
            if heads[n]:
                heapq.heappush(ready, (_arrival(heads[n][-1]), n))
        return found

    async def first_arrival(self, bucket: str) -> tuple[int, str]:
        """When the first event of `bucket` arrived (`arrived`, document id)."""
        quoted = _quoted(bucket)
        where = And(
            [
                FieldFilter("bucket", ">=", quoted + _BUCKET_OPEN),
                FieldFilter("bucket", "<", quoted + _BUCKET_CLOSE),
            ]
        )
        return min(_arrival(document) for document in await self.first(where, "bucket"))


class _Places:
    """The buckets and the common folder of a window's events as far as they are known: those of
    its first events, widened by the events a walk of each shard's `place` order finds that they
    do not explain (see the module doc). `buckets`: in order of first appearance for those of
    the first events, then in the order found."""

    def __init__(self, items: Sequence[DigestItem]) -> None:
        self.buckets: dict[str, None] = {}
        self.folder = folder(items[0].name)
        for item in items:
            self.explain(item.bucket, item.name)
        self.first_seen = list(self.buckets)

    def explain(self, bucket: str, name: str) -> None:
        """Widen the known buckets and folder to take in this event (as DigestSummary.add)."""
        self.buckets.setdefault(bucket, None)
        if not name.startswith(self.folder):
            self.folder = folder(os.path.commonprefix((self.folder, name)))  # noqa: RUF071

    def gap(self, position: str) -> tuple[str, str | None]:
        """The first range [low, high) of `place` at or after `position` that no known bucket
        under the known folder takes in (high None: no end)."""
        low = position
        for start, end in sorted(map(self.span, self.buckets)):
            if end <= low:
                continue
            if low < start:
                return low, start
            low = end
        return low, None

    def span(self, bucket: str) -> tuple[str, str]:
        """The range of `place` of the names of `bucket` under the known folder: both end in
        the separator, so the range ends where the separator's successor takes its place."""
        start = f"{_quoted(bucket)}{_PLACE_SEPARATOR}{self.folder}"
        return start, start[:-1] + _PLACE_AFTER

    async def walk(
        self, events: _Events, collection: AsyncCollectionReference, least: str, greatest: str
    ) -> bool:
        """Walk one shard past every event the known buckets and folder do not take in,
        widening them with each: in the end they take in every event of the shard (True), or
        the walk took _MOST_PLACE_STEPS queries (False). Every event of the shard before
        `position` is taken in, or was found not to exist; the known buckets and folder only
        widen (the shards' walks share them), so that stays true. `least` and `greatest`: the
        window's least and greatest `place`, so the walk starts at the one and ends past the
        other (no event lies outside them: no query for the gaps before and after)."""
        position = least
        for _ in range(_MOST_PLACE_STEPS):
            low, high = self.gap(position)
            if low > greatest:
                return True
            query: Any = collection.where(filter=FieldFilter("place", ">=", low))
            if high is not None:
                query = query.where(filter=FieldFilter("place", "<", high))
            found = await events.documents(query.order_by("place").limit(1).select(["place"]))
            if found:
                position = found[0].get("place")
                bucket, _, name = position.partition(_PLACE_SEPARATOR)
                self.explain(unquote(bucket), name)
            elif high is None:
                return True
            else:
                position = high
        return False


async def _summarize(events: _Events, max_items: int) -> DigestSummary:
    """The summary of the events `events` reads, from a few queries per shard (see the module
    doc): more only for the buckets and folders the first events do not show."""
    timed = FieldFilter("time", ">=", _EARLIEST_TIME)

    async def listed_and_placed() -> tuple[list[DigestItem], _Places | None]:
        listed, least, greatest = await asyncio.gather(
            events.first_arrivals(max(max_items, MAX_BUCKETS)),
            events.first(None, "place"),
            events.first(None, "place", descending=True),
        )
        items = [_item(document.get("item")) for document in listed]
        if not items:
            return items, None
        places = _Places(items)
        low, high = min(d.get("place") for d in least), max(d.get("place") for d in greatest)
        for place in (low, high):
            bucket, _, name = place.partition(_PLACE_SEPARATOR)
            places.explain(unquote(bucket), name)
        if len(places.buckets) == 1:
            return items, places  # every place lies between the extremes: exact (module doc)
        walks = await asyncio.gather(
            *(places.walk(events, c, low, high) for c in events.collections)
        )
        return items, places if all(walks) else None

    totals, earliest, latest, (items, places) = await asyncio.gather(
        events.totals(),
        events.first(timed, "time"),
        events.first(timed, "time", descending=True),
        listed_and_placed(),
    )
    count = totals["count"]
    if count == 0 or not items:
        return DigestSummary.empty(max_items)
    first_seen = list(dict.fromkeys(item.bucket for item in items))
    if places is not None:
        prefix = places.folder
        buckets, other = await _ordered_buckets(events, places)
    else:
        log.warning(
            "digest window with more buckets and folders than its summary walks: reading the"
            " prefix from the least and greatest names, and walking each shard's buckets"
        )
        prefix, (buckets, other) = await asyncio.gather(
            _common_prefix(events), _first_buckets(events, first_seen)
        )
    counts = {kind: totals[kind.short] for kind in _FLAGGED}
    counts[tuple(EventType)[-1]] = count - sum(counts.values())
    return DigestSummary(
        max_items=max_items,
        count=count,
        counts={kind: n for kind, n in counts.items() if n},
        bytes_added=totals["bytes"],
        first_time=min(_times(earliest), default=None),
        last_time=max(_times(latest), default=None),
        prefix=prefix,
        buckets=buckets,
        other_bucket_events=other,
        items=items[:max_items],
    )


def _times(documents: Iterable[Snapshot]) -> list[datetime]:
    times = (_item(document.get("item")).time for document in documents)
    return [t for t in times if t is not None]


async def _ordered_buckets(events: _Events, places: _Places) -> tuple[list[str], int]:
    """The first MAX_BUCKETS buckets by first appearance, and the count of the other buckets'
    events, knowing every bucket (`places`, walked to the end). The first events' buckets
    come first, in their order; the others' first events are looked up when there are two or
    more of them to order."""
    first_seen = places.first_seen
    later = [bucket for bucket in places.buckets if bucket not in first_seen]
    if len(first_seen) >= MAX_BUCKETS:
        listed = first_seen[:MAX_BUCKETS]
    elif len(later) <= 1:
        listed = first_seen + later
    else:
        firsts = await asyncio.gather(*(events.first_arrival(bucket) for bucket in later))
        arrivals = dict(zip(later, firsts, strict=True))
        listed = (first_seen + sorted(later, key=arrivals.__getitem__))[:MAX_BUCKETS]
    if len(places.buckets) <= len(listed):
        return listed, 0
    return listed, await events.count(_outside(listed))


async def _common_prefix(events: _Events) -> str:
    """The folder of the common prefix of all names: that of the least and the greatest."""
    least, greatest = await asyncio.gather(
        events.first(None, "name"), events.first(None, "name", descending=True)
    )
    names = [document.get("name") for document in (*least, *greatest)]
    # Characters, not path components, as DigestSummary.add compares them.
    return folder(os.path.commonprefix([min(names), max(names)]))  # noqa: RUF071


async def _first_buckets(events: _Events, first_seen: list[str]) -> tuple[list[str], int]:
    """The first MAX_BUCKETS buckets by first appearance, and the count of the other buckets'
    events, by walking each shard's buckets in name order. `first_seen`: the buckets of the
    first events, in order of appearance."""
    if len(first_seen) >= MAX_BUCKETS:
        listed = first_seen[:MAX_BUCKETS]
        return listed, await events.count(_outside(listed))
    firsts: dict[str, tuple[int, str]] = {}  # bucket -> its first event (arrival, id)

    async def walk(collection: AsyncCollectionReference) -> bool:
        """One shard's buckets in name order, each with its first event in the shard; False
        when it has more than the walk takes."""
        found = await events.documents(collection.order_by("bucket").limit(1))
        for _ in range(_MOST_BUCKETS_WALKED):
            if not found:
                return True
            bucket, first = _bucket(found[0]), _arrival(found[0])
            firsts[bucket] = min(firsts.get(bucket, first), first)
            after = FieldFilter("bucket", ">=", _quoted(bucket) + _BUCKET_CLOSE)
            found = await events.documents(
                collection.where(filter=after).order_by("bucket").limit(1)
            )
        return False

    complete = all(await asyncio.gather(*(walk(c) for c in events.collections)))
    if not complete:
        log.warning(
            "digest window with more buckets than its summary walks: the buckets listed may not"
            " be the first to appear",
            extra={"buckets_found": len(firsts)},
        )
    ordered = sorted(firsts, key=lambda bucket: firsts[bucket])
    listed = ordered[:MAX_BUCKETS]
    if complete and len(ordered) <= MAX_BUCKETS:
        return listed, 0
    return listed, await events.count(_outside(listed))


async def _streamed(events: _Events, max_items: int, closed: int | None) -> DigestSummary:
    """A window of the layout before shards, from every event it holds: those committed by its
    closing time `closed` (None: open), in commit order (windows opened before the upgrade)."""
    counted = [
        (_microseconds(event.create_time, ceiling=True), event.id, event.get("item"))
        for documents in await events.each(lambda collection: collection)
        for event in documents
        if event.create_time is not None
    ]
    summary = DigestSummary.empty(max_items)
    for created, _, item in sorted(counted, key=lambda e: (e[0], e[1])):
        if closed is None or created <= closed:
            summary.add(_item(item))
    return summary


def _outside(buckets: Sequence[str]) -> BaseFilter:
    """The events in none of `buckets`: the gaps between their ranges of the `bucket` field."""
    bounds = sorted(map(_quoted, buckets))
    gaps: list[BaseFilter] = [FieldFilter("bucket", "<", bounds[0] + _BUCKET_OPEN)]
    for low, high in itertools.pairwise(bounds):
        gaps.append(
            And(
                [
                    FieldFilter("bucket", ">=", low + _BUCKET_CLOSE),
                    FieldFilter("bucket", "<", high + _BUCKET_OPEN),
                ]
            )
        )
    gaps.append(FieldFilter("bucket", ">=", bounds[-1] + _BUCKET_CLOSE))
    return Or(gaps)


def _quoted(bucket: str) -> str:
    """A bucket name percent-encoded: a valid one (a-z, 0-9, -, _ and .) as it is; any other
    without "/", " " or "!", which the `place` and `bucket` fields use to separate it."""
    return quote(bucket, safe="")


def _bucket(document: Snapshot) -> str:
    value: str = document.get("bucket")
    return unquote(value.rsplit(_BUCKET_OPEN, 1)[0])


def _arrival(document: Snapshot) -> tuple[int, str]:
    return document.get("arrived"), document.id


def _item(value: object) -> DigestItem:
    """An event's DigestItem: JSON text, or a map (the layout before shards)."""
    return DigestItem.from_json(json.loads(value) if isinstance(value, str) else value)


def _info(window: dict[str, Any], events: int) -> WindowInfo:
    return WindowInfo(
        window_id=window["id"],
        route=window["route"],
        opened_at=window["opened_at"],
        due_at=window["due_at"],
        events=events,
        state=WindowState(window["state"]),
    )


def _token_of(window: dict[str, Any]) -> int | None:
    """The window's latest claim's token; a claim made before tokens (an `owner`) is 0."""
    token = window.get("token")
    if isinstance(token, int) and not isinstance(token, bool):
        return token
    return 0 if window.get("owner") is not None else None


def _counted(window: Snapshot, created: datetime) -> bool:
    """Whether an event committed at `created` is in the window's digest: committed at or
    before its closing time, so that reading the window at that time finds it."""
    if (window.to_dict() or {}).get("state") == WindowState.OPEN:
        return True
    return _microseconds(created, ceiling=True) <= _closing_us(window)


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


async def _get_all(
    client: AsyncClient,
    refs: Sequence[AsyncDocumentReference],
    transaction: AsyncTransaction | None = None,
) -> list[Snapshot]:
    """The documents in the order asked (one round trip; get_all answers in any order)."""
    found = {
        s.reference.path: s
        async for s in client.get_all(list(refs), transaction=transaction, **call_options())
    }
    return [found[ref.path] for ref in refs]


async def _transaction(client: AsyncClient, work: Callable[[AsyncTransaction], Awaitable[T]]) -> T:
    """`work`'s answer, its reads and writes committed as one transaction (once: the caller
    reads again after a conflict). Not the library's async_transactional: that one rolls back
    on any exception, and when the transaction never began (an unreachable Firestore, the
    operation's time up) its rollback raises a ValueError in place of the failure or the
    cancellation; a rollback here is bounded, and only of a transaction that began."""
    transaction = client.transaction(max_attempts=1)
    async with _bounded("begin a transaction"):  # the library's own retries run for a minute
        await transaction._begin()
    try:
        answer = await work(transaction)
        async with _bounded("commit a transaction"):
            await transaction._commit()
    except BaseException:
        if transaction.in_progress:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CALL_SECONDS):
                    await transaction._rollback()  # else its reads hold locks until it expires
        raise
    return answer


@contextlib.asynccontextmanager
async def _bounded(what: str) -> AsyncIterator[None]:
    """A call made without `call_options` (a transaction's), bounded as if made with them."""
    try:
        async with asyncio.timeout(CALL_SECONDS):
            yield
    except TimeoutError as error:
        raise StoreUnavailable(f"firestore: could not {what} within {CALL_SECONDS:g} s") from error


async def _commit(batch: AsyncWriteBatch) -> list[Any] | None:
    """The write results, or None when a create or precondition failed: nothing was written
    (a batch is atomic), and the caller reads again."""
    try:
        return await batch.commit(**call_options())
    except (AlreadyExists, FailedPrecondition, NotFound):
        return None
