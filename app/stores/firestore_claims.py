"""Firestore store: one document per key in `{prefix}-claims`, shared by every Cloud Run
instance, with no VPC and nothing running between events.

A document is a claim `{state: claimed, token, lease_until, expire_at}` or a done mark
`{state: done, token, expire_at}` (`done_fields`; the digest store's overflow writes the same
shape), whose `token` is the one that completed it while holding it, or null.

Every write is atomic on its own, without transactions (contended transactions queue up and time
out, on the emulator too): a claim is a `create()` (the second one gets AlreadyExists); taking
over an expired lease, renewing, completing and releasing are conditional on the document's
`update_time` as read just before (`last_update_time` precondition), so of two instances racing
for one key one wins and the other reads again. The holder remembers the update time its own
claim wrote, so its `complete` (and `release`) is one conditional write with no read before it,
unless someone wrote the document since. Done is written whoever holds the lease, as the contract
says; only the token it records depends on who held it. Every document carries `expire_at`, which
Firestore's TTL policy deletes after: an abandoned claim does not stay forever, and done marks go
after the retention.

Documents written before fencing (an `owner` instead of a `token`) still read: a done mark stays
done, and an old claim is a claim with token 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.api_core.exceptions import AlreadyExists, FailedPrecondition, NotFound
from google.cloud.firestore import (
    DELETE_FIELD,
    AsyncClient,
    AsyncDocumentReference,
    DocumentSnapshot,
)

from app.stores.base import Claim, Lease, StoreUnavailable, next_token
from app.stores.firestore import (
    FirestoreClient,
    FirestoreLocation,
    call_options,
    claims_collection,
    document_id,
    operation,
)
from app.stores.windows import RETENTION_SECONDS

Snapshot = DocumentSnapshot[AsyncDocumentReference]
T = TypeVar("T")
CLAIMED = "claimed"
DONE = "done"
# TTL deletion tidies abandoned claims; it never ends a lease (readers compare lease_until), so
# the claim document stays an hour past its lease, where an operator can still see it.
CLAIM_KEPT_SECONDS = 3600.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ATTEMPTS = 4  # create, read, write: each retry follows another writer's success
# The update times of this instance's own live claims, for `complete` without a read; a few
# thousand emails in flight at most, so the oldest are forgotten past this (they read first).
_REMEMBERED = 4096


def done_fields(token: int | None, expire_at: datetime) -> dict[str, Any]:
    """A done mark, as `claim` reads it: `token` completed it while holding it (None: nobody
    held it, or a claim had been taken over)."""
    return {"state": DONE, "token": token, "expire_at": expire_at}


class FirestoreStore:
    def __init__(
        self, location: FirestoreLocation, retention_seconds: float = RETENTION_SECONDS
    ) -> None:
        self.location = location
        self.retention_seconds = retention_seconds
        self._firestore = FirestoreClient(location)
        self._collection = claims_collection(location.prefix)
        self._claimed: dict[str, tuple[int, datetime]] = {}  # key -> (token, update time)

    @classmethod
    def from_url(cls, url: str, retention_seconds: float = RETENTION_SECONDS) -> FirestoreStore:
        """ValueError for a bad URL; the client is made on the first call."""
        return cls(FirestoreLocation.parse(url), retention_seconds)

    async def _document(self, key: str) -> AsyncDocumentReference:
        client = await self._firestore.get()
        return client.collection(self._collection).document(document_id(key))

    async def claim(self, key: str, lease_seconds: float) -> Lease | Claim:
        async with operation():
            document = await self._document(key)
            for _ in range(_ATTEMPTS):
                now = time.time()
                fields = _claim_fields(next_token(None, now), now, lease_seconds)
                created = await _write(document.create(fields, **call_options()))
                if created is not None:
                    return self._held(key, fields, now + lease_seconds, created.update_time)
                snapshot = await document.get(**call_options())
                data = snapshot.to_dict()
                if data is None:
                    continue  # released or deleted since: create it again
                if _ours(data, fields):  # our create's answer was lost and the call retried
                    assert snapshot.update_time is not None
                    return self._held(key, fields, now + lease_seconds, snapshot.update_time)
                state = _state(data, now)
                if state is not None:
                    return state
                fields = _claim_fields(next_token(_token_of(data), now), now, lease_seconds)
                taken = await _write(
                    document.update(fields, option=_unchanged_since(snapshot), **call_options())
                )
                if taken is not None:
                    return self._held(key, fields, now + lease_seconds, taken.update_time)
            # Another writer changed the document between each read and write: it is active.
            return Claim.IN_FLIGHT

    async def renew(self, key: str, token: int, lease_seconds: float) -> Lease | None:
        async with operation():
            document = await self._document(key)
            for _ in range(_ATTEMPTS):
                snapshot = await document.get(**call_options())
                data = snapshot.to_dict()
                now = time.time()
                if data is None or not _holds(data, token) or not _live(data, now):
                    return None
                fields = _lease_fields(now, lease_seconds)
                renewed = await _write(
                    document.update(fields, option=_unchanged_since(snapshot), **call_options())
                )
                if renewed is not None:
                    lease = {**fields, "token": token}
                    return self._held(key, lease, now + lease_seconds, renewed.update_time)
        raise StoreUnavailable(f"firestore: renew kept conflicting ({_ATTEMPTS} attempts)")

    async def complete(self, key: str, token: int) -> bool:
        async with operation():
            document = await self._document(key)
            expire_at = _timestamp(time.time() + self.retention_seconds)
            option = self._as_written(key, token)
            if option is not None:
                ours = {**done_fields(token, expire_at), "lease_until": DELETE_FIELD}
                done = await _write(document.update(ours, option=option, **call_options()))
                if done is not None:
                    return True
            for _ in range(_ATTEMPTS):
                snapshot = await document.get(**call_options())
                data = snapshot.to_dict()
                now = time.time()
                if data is not None and data.get("state") == DONE and _live(data, now):
                    return data.get("token") == token  # a retry of the holder's own done mark
                held = data is None or data.get("state") != CLAIMED or _holds(data, token)
                fields = done_fields(token if held else None, expire_at)
                if data is None:
                    written = await _write(document.create(fields, **call_options()))
                else:
                    replace = {**fields, "lease_until": DELETE_FIELD, "owner": DELETE_FIELD}
                    option = _unchanged_since(snapshot)
                    written = await _write(
                        document.update(replace, option=option, **call_options())
                    )
                if written is not None:
                    return held
        raise StoreUnavailable(f"firestore: complete kept conflicting ({_ATTEMPTS} attempts)")

    async def release(self, key: str, token: int) -> None:
        async with operation():
            document = await self._document(key)
            option = self._as_written(key, token)
            if option is not None:
                released = await _write(document.delete(option=option, **call_options()))
                if released is not None:
                    return
            for _ in range(_ATTEMPTS):
                snapshot = await document.get(**call_options())
                data = snapshot.to_dict()
                if data is None or data.get("state") != CLAIMED or not _holds(data, token):
                    return
                option = _unchanged_since(snapshot)
                if await _write(document.delete(option=option, **call_options())) is not None:
                    return
        raise StoreUnavailable(f"firestore: release kept conflicting ({_ATTEMPTS} attempts)")

    async def ping(self) -> None:
        async with operation():
            await (await self._document("ping")).get(**call_options())

    async def aclose(self) -> None:
        self._claimed.clear()
        await self._firestore.aclose()

    def _held(self, key: str, fields: dict[str, Any], expires: float, written: Any) -> Lease:
        """The Lease of a claim (or renewal) this instance just wrote, remembering its update
        time for the holder's `complete`."""
        self._claimed.pop(key, None)
        if len(self._claimed) >= _REMEMBERED:
            del self._claimed[next(iter(self._claimed))]
        self._claimed[key] = (fields["token"], written)
        return Lease(fields["token"], expires)

    def _as_written(self, key: str, token: int) -> Any:
        """The precondition "still the claim this instance wrote for `token`" (a write under it
        needs no read before it), or None when this instance does not know that claim."""
        remembered = self._claimed.pop(key, None)
        if remembered is None or remembered[0] != token:
            return None
        return AsyncClient.write_option(last_update_time=remembered[1])


def _claim_fields(token: int, now: float, lease_seconds: float) -> dict[str, Any]:
    return {"state": CLAIMED, "token": token, **_lease_fields(now, lease_seconds)}


def _lease_fields(now: float, lease_seconds: float) -> dict[str, Any]:
    # Rounded up to the microsecond: the stored lease never ends before the caller's.
    lease_until = _EPOCH + timedelta(microseconds=math.ceil((now + lease_seconds) * 1e6))
    return {
        "lease_until": lease_until,
        "expire_at": lease_until + timedelta(seconds=CLAIM_KEPT_SECONDS),
    }


def _token_of(data: dict[str, Any]) -> int | None:
    """The document's last token; an old claim (an `owner`, no token) is token 0."""
    token = data.get("token")
    if isinstance(token, int) and not isinstance(token, bool):
        return token
    return 0 if data.get("state") == CLAIMED else None


def _holds(data: dict[str, Any], token: int) -> bool:
    return data.get("state") == CLAIMED and _token_of(data) == token


def _live(data: dict[str, Any], now: float) -> bool:
    """A claim's lease, or a done mark's retention, has not run out at `now`."""
    until = data.get("lease_until" if data.get("state") == CLAIMED else "expire_at")
    return isinstance(until, datetime) and until > _timestamp(now)


def _ours(data: dict[str, Any], fields: dict[str, Any]) -> bool:
    return all(data.get(name) == fields[name] for name in ("token", "lease_until"))


def _state(data: dict[str, Any], now: float) -> Claim | None:
    """DONE or IN_FLIGHT as the document says, or None when it may be taken over: an expired
    lease or done mark (TTL deletion may lag a day), or a document that is not ours to read."""
    if data.get("state") == DONE and _live(data, now):
        return Claim.DONE
    if data.get("state") == CLAIMED and _live(data, now):
        return Claim.IN_FLIGHT
    return None


async def _write(call: Awaitable[T]) -> T | None:
    """The write's answer, or None when its create or precondition failed (another writer came
    first: read again)."""
    try:
        return await call
    except (AlreadyExists, FailedPrecondition, NotFound):
        return None


def _unchanged_since(snapshot: Snapshot) -> Any:
    return AsyncClient.write_option(last_update_time=snapshot.update_time)


def _timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
