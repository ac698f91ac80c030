"""Firestore store: one document per key in `{prefix}-claims`, shared by every Cloud Run
instance, with no VPC and nothing running between events.

Every write is atomic on its own, without transactions (contended transactions queue up and time
out, on the emulator too): a claim is a `create()` (the second one gets AlreadyExists); taking
over an expired lease, and a release, are conditional on the document's `update_time` read just
before (`last_update_time` precondition), so of two instances racing for one key one wins and
the other reads again. Done is written unconditionally, whoever holds the lease, as the contract
says. Every document carries `expire_at`, which Firestore's TTL policy deletes after: an
abandoned claim does not stay forever, and done marks go after their retention.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core.exceptions import AlreadyExists, FailedPrecondition, NotFound
from google.cloud.firestore import AsyncClient, AsyncDocumentReference, DocumentSnapshot

from app.stores.base import Claim
from app.stores.firestore import (
    FirestoreClient,
    FirestoreLocation,
    call_options,
    claims_collection,
    document_id,
    operation,
)

Snapshot = DocumentSnapshot[AsyncDocumentReference]
CLAIMED = "claimed"
DONE = "done"
# TTL deletion tidies abandoned claims; it never ends a lease (readers compare lease_until), so
# the claim document stays an hour past its lease, where an operator can still see it.
CLAIM_KEPT_SECONDS = 3600.0
_ATTEMPTS = 4  # create, read, take over: each retry follows another writer's success


class FirestoreStore:
    def __init__(self, location: FirestoreLocation) -> None:
        self.location = location
        self._firestore = FirestoreClient(location)
        self._collection = claims_collection(location.prefix)

    @classmethod
    def from_url(cls, url: str) -> FirestoreStore:
        """ValueError for a bad URL; the client is made on the first call."""
        return cls(FirestoreLocation.parse(url))

    async def _document(self, key: str) -> AsyncDocumentReference:
        client = await self._firestore.get()
        return client.collection(self._collection).document(document_id(key))

    async def claim(self, key: str, owner: str, lease_seconds: float) -> Claim:
        async with operation():
            document = await self._document(key)
            for _ in range(_ATTEMPTS):
                now = datetime.now(UTC)
                fields = _claim_fields(owner, now, lease_seconds)
                if await _create(document, fields):
                    return Claim.CLAIMED
                snapshot = await document.get(**call_options())
                if not snapshot.exists:
                    continue  # released or deleted since: create it again
                state = _state(snapshot, owner, now)
                if state is not None:
                    return state
                if await _take_over(document, snapshot, fields):
                    return Claim.CLAIMED
            # Another writer changed the document between each read and write: it is active.
            return Claim.IN_FLIGHT

    async def complete(self, key: str, owner: str, keep_seconds: float) -> None:
        async with operation():
            document = await self._document(key)
            expire_at = datetime.now(UTC) + timedelta(seconds=keep_seconds)
            fields = {"state": DONE, "owner": owner, "expire_at": expire_at}
            await document.set(fields, **call_options())

    async def release(self, key: str, owner: str) -> None:
        async with operation():
            document = await self._document(key)
            snapshot = await document.get(**call_options())
            data = snapshot.to_dict() if snapshot.exists else None
            if data is None or data.get("state") != CLAIMED or data.get("owner") != owner:
                return
            precondition = _unchanged_since(snapshot)
            try:
                await document.delete(option=precondition, **call_options())
            except (FailedPrecondition, NotFound):
                return  # taken over or completed meanwhile: no longer this owner's to release

    async def ping(self) -> None:
        async with operation():
            await (await self._document("ping")).get(**call_options())

    async def aclose(self) -> None:
        await self._firestore.aclose()


def _claim_fields(owner: str, now: datetime, lease_seconds: float) -> dict[str, Any]:
    lease_until = now + timedelta(seconds=lease_seconds)
    return {
        "state": CLAIMED,
        "owner": owner,
        "lease_until": lease_until,
        "expire_at": lease_until + timedelta(seconds=CLAIM_KEPT_SECONDS),
    }


def _state(snapshot: Snapshot, owner: str, now: datetime) -> Claim | None:
    """DONE or IN_FLIGHT as the document says, or None when it may be taken over: an expired
    lease or done mark (TTL deletion may lag a day), the same owner's claim (its own create or
    update whose answer was lost and retried), or a document that is not ours to read."""
    data = snapshot.to_dict() or {}
    state, expire_at, lease_until = (
        data.get("state"),
        data.get("expire_at"),
        data.get("lease_until"),
    )
    if state == DONE and isinstance(expire_at, datetime) and expire_at > now:
        return Claim.DONE
    live = isinstance(lease_until, datetime) and lease_until > now
    if state == CLAIMED and live and data.get("owner") != owner:
        return Claim.IN_FLIGHT
    return None


async def _create(document: AsyncDocumentReference, fields: dict[str, Any]) -> bool:
    try:
        await document.create(fields, **call_options())
    except AlreadyExists:
        return False
    return True


async def _take_over(
    document: AsyncDocumentReference, snapshot: Snapshot, fields: dict[str, Any]
) -> bool:
    try:
        await document.update(fields, option=_unchanged_since(snapshot), **call_options())
    except (FailedPrecondition, NotFound):
        return False  # someone wrote (or deleted) it after our read
    return True


def _unchanged_since(snapshot: Snapshot) -> Any:
    return AsyncClient.write_option(last_update_time=snapshot.update_time)
