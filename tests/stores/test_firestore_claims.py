"""The Firestore store against the emulator: what the shared contract suite cannot show with one
client (several instances racing, an answer lost), the documents it writes and reads (those of
the version before tokens too), and how it fails."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.api_core.exceptions import AlreadyExists
from google.cloud.firestore import AsyncCollectionReference, AsyncDocumentReference

from app.stores.base import Claim, Lease, StoreUnavailable
from app.stores.firestore import FirestoreClient, FirestoreLocation, claims_collection, document_id
from app.stores.firestore_claims import FirestoreStore
from tests.servers import free_port

pytest_plugins = ["tests.firestore_emulator"]

UNAVAILABLE_WITHIN = 15.0  # seconds: CALL_SECONDS (5) and a wide margin for a busy machine


def with_stores(url: str, count: int, scenario: Callable[..., Awaitable[None]]) -> None:
    """Run `scenario(*stores)` with `count` stores, each with its own client (as instances)."""

    async def main() -> None:
        stores = [FirestoreStore.from_url(url) for _ in range(count)]
        try:
            await scenario(*stores)
        finally:
            for store in stores:
                await store.aclose()

    asyncio.run(main())


@asynccontextmanager
async def raw_claims(url: str) -> AsyncIterator[AsyncCollectionReference]:
    """The claims collection, read and written past the store."""
    location = FirestoreLocation.parse(url)
    client = FirestoreClient(location)
    try:
        yield (await client.get()).collection(claims_collection(location.prefix))
    finally:
        await client.aclose()


async def raw_document(url: str, key: str) -> dict[str, Any] | None:
    async with raw_claims(url) as claims:
        snapshot = await claims.document(document_id(key)).get()
    return snapshot.to_dict() if snapshot.exists else None


def leased(answer: Lease | Claim) -> Lease:
    assert isinstance(answer, Lease), answer
    return answer


def test_two_instances_claiming_one_key_at_once_have_one_winner(firestore_url: str) -> None:
    async def scenario(first: FirestoreStore, second: FirestoreStore) -> None:
        for key in ("a", "b", "c"):
            claims = [store.claim(key, 60) for _ in range(10) for store in (first, second)]
            results = await asyncio.gather(*claims)
            assert sum(isinstance(result, Lease) for result in results) == 1, key
            assert results.count(Claim.IN_FLIGHT) == 19, key

    with_stores(firestore_url, 2, scenario)


def test_an_expired_lease_is_taken_over_by_exactly_one_of_two(firestore_url: str) -> None:
    keys = [f"k{index}" for index in range(5)]

    async def scenario(crashed: FirestoreStore, a: FirestoreStore, b: FirestoreStore) -> None:
        stale = {key: leased(await crashed.claim(key, 0.3)) for key in keys}
        await asyncio.sleep(0.5)
        for key in keys:
            results = await asyncio.gather(a.claim(key, 60), b.claim(key, 60))
            winners = [result for result in results if isinstance(result, Lease)]
            assert len(winners) == 1, key
            assert Claim.IN_FLIGHT in results, key
            document = await raw_document(firestore_url, key)
            assert document is not None
            assert document["token"] == winners[0].token > stale[key].token

    with_stores(firestore_url, 3, scenario)


def test_a_live_lease_is_not_taken_over(firestore_url: str) -> None:
    async def scenario(a: FirestoreStore, b: FirestoreStore) -> None:
        lease = leased(await a.claim("k", 60))
        assert await b.claim("k", 60) is Claim.IN_FLIGHT
        assert await a.claim("k", 60) is Claim.IN_FLIGHT  # the holder too: it renews instead
        assert (await raw_document(firestore_url, "k") or {})["token"] == lease.token

    with_stores(firestore_url, 2, scenario)


def test_a_claim_whose_answer_was_lost_finds_its_own_document(
    firestore_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library retries a create whose answer was lost; the retry gets AlreadyExists for the
    document the first attempt wrote: still this caller's claim, not another's in flight."""
    create = AsyncDocumentReference.create

    async def lost_answer(self: AsyncDocumentReference, *args: Any, **kwargs: Any) -> Any:
        await create(self, *args, **kwargs)
        already: Any = AlreadyExists  # google-api-core's exceptions are untyped
        raise already("the retry of a create that had landed")

    async def scenario(a: FirestoreStore, b: FirestoreStore) -> None:
        monkeypatch.setattr(AsyncDocumentReference, "create", lost_answer)
        lease = leased(await a.claim("k", 60))
        monkeypatch.setattr(AsyncDocumentReference, "create", create)
        assert (await raw_document(firestore_url, "k") or {})["token"] == lease.token
        assert await b.claim("k", 60) is Claim.IN_FLIGHT
        assert await a.complete("k", lease.token) is True

    with_stores(firestore_url, 2, scenario)


def test_release_by_another_token_leaves_the_claim(firestore_url: str) -> None:
    async def scenario(a: FirestoreStore, b: FirestoreStore) -> None:
        lease = leased(await a.claim("k", 60))
        await b.release("k", lease.token + 1)
        assert (await raw_document(firestore_url, "k") or {})["token"] == lease.token
        assert await b.claim("k", 60) is Claim.IN_FLIGHT
        await b.release("k", lease.token)  # another instance, the holder's token: released
        assert await raw_document(firestore_url, "k") is None
        leased(await b.claim("k", 60))

    with_stores(firestore_url, 2, scenario)


def test_a_release_after_the_lease_moved_leaves_the_new_claim(firestore_url: str) -> None:
    async def scenario(slow: FirestoreStore, b: FirestoreStore, c: FirestoreStore) -> None:
        stale = leased(await slow.claim("k", 0.3))
        await asyncio.sleep(0.5)
        leased(await b.claim("k", 60))
        await slow.release("k", stale.token)  # remembers its own claim: the write is refused
        assert await c.claim("k", 60) is Claim.IN_FLIGHT

    with_stores(firestore_url, 3, scenario)


def test_complete_after_the_lease_moved_marks_the_key_done_and_reports_it(
    firestore_url: str,
) -> None:
    """The slow sender's email was accepted: done, whoever holds the lease by then; False, so
    the caller logs the takeover; and the new holder can no longer renew, so it sends nothing."""

    async def scenario(slow: FirestoreStore, b: FirestoreStore, c: FirestoreStore) -> None:
        stale = leased(await slow.claim("k", 0.3))
        await asyncio.sleep(0.5)
        current = leased(await b.claim("k", 60))
        assert await slow.complete("k", stale.token) is False
        assert await b.renew("k", current.token, 60) is None
        await b.release("k", current.token)  # b gives up: done stays done
        assert await c.claim("k", 60) is Claim.DONE
        document = await raw_document(firestore_url, "k")
        assert document is not None
        assert (document["state"], document["token"]) == ("done", None)
        assert "lease_until" not in document

    with_stores(firestore_url, 3, scenario)


def test_the_holders_complete_is_one_write_and_a_retry_of_it_is_still_true(
    firestore_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance that claimed remembers the update time of its claim: its done mark is one
    conditional write, no read; another instance (or a retry) reads first and answers the same."""
    reads: list[str] = []
    get = AsyncDocumentReference.get

    async def counted(self: AsyncDocumentReference, *args: Any, **kwargs: Any) -> Any:
        reads.append(self.id)
        return await get(self, *args, **kwargs)

    monkeypatch.setattr(AsyncDocumentReference, "get", counted)

    async def scenario(holder: FirestoreStore, other: FirestoreStore) -> None:
        lease = leased(await holder.claim("k", 60))
        reads.clear()
        assert await holder.complete("k", lease.token) is True
        assert reads == []
        assert await holder.complete("k", lease.token) is True  # a retry reads the done mark
        assert await other.complete("k", lease.token) is True
        assert await other.complete("k", lease.token + 1) is False
        assert await other.claim("k", 60) is Claim.DONE
        moved = leased(await other.claim("m", 60))
        assert await holder.complete("m", moved.token) is True  # not its claim: it reads first
        assert reads

    with_stores(firestore_url, 2, scenario)


def test_renew_extends_only_the_holders_live_lease(firestore_url: str) -> None:
    async def scenario(a: FirestoreStore, b: FirestoreStore) -> None:
        lease = leased(await a.claim("k", 0.4))
        renewed = await b.renew("k", lease.token, 60)  # any instance, with the holder's token
        assert renewed is not None
        assert renewed.token == lease.token
        document = await raw_document(firestore_url, "k")
        assert document is not None
        assert document["lease_until"] > datetime.now(UTC) + timedelta(seconds=50)
        await asyncio.sleep(0.5)
        assert await b.claim("k", 60) is Claim.IN_FLIGHT  # the renewed lease still runs
        assert await a.renew("k", lease.token + 1, 60) is None
        assert await a.complete("k", lease.token) is True  # after a renewal: still the holder

    with_stores(firestore_url, 2, scenario)


def test_a_damaged_document_is_taken_over(firestore_url: str) -> None:
    async def scenario(store: FirestoreStore) -> None:
        async with raw_claims(firestore_url) as claims:
            await claims.document(document_id("k")).set({"state": 7})
        lease = leased(await store.claim("k", 60))
        assert (await raw_document(firestore_url, "k") or {})["token"] == lease.token

    with_stores(firestore_url, 1, scenario)


def test_documents_of_the_version_before_tokens_still_read(firestore_url: str) -> None:
    """Done stays done; a claim with an `owner` and no token is a claim with token 0."""
    later = datetime.now(UTC) + timedelta(hours=1)
    earlier = datetime.now(UTC) - timedelta(seconds=1)

    async def scenario(store: FirestoreStore) -> None:
        async with raw_claims(firestore_url) as claims:
            await claims.document(document_id("done")).set(
                {"state": "done", "owner": "old", "expire_at": later}
            )
            for key, lease_until in (("live", later), ("expired", earlier), ("held", later)):
                await claims.document(document_id(key)).set(
                    {"state": "claimed", "owner": "old", "lease_until": lease_until,
                     "expire_at": later}
                )  # fmt: skip
        assert await store.claim("done", 60) is Claim.DONE
        assert await store.complete("done", 0) is False  # nobody's token completed it
        assert await store.claim("live", 60) is Claim.IN_FLIGHT
        assert leased(await store.claim("expired", 60)).token > 0
        assert await store.renew("held", 0, 60) is not None
        assert await store.complete("held", 0) is True
        assert await store.claim("held", 60) is Claim.DONE

    with_stores(firestore_url, 1, scenario)


def test_every_document_carries_expire_at(firestore_url: str) -> None:
    """Firestore's TTL policy deletes documents after `expire_at`: claims an hour past their
    lease (TTL tidies abandoned claims, the lease ends them), done marks after the retention."""

    async def scenario(store: FirestoreStore) -> None:
        before = datetime.now(UTC)
        claimed = leased(await store.claim("claimed", 60))
        done = leased(await store.claim("done", 60))
        await store.complete("done", done.token)
        after = datetime.now(UTC)

        claim = await raw_document(firestore_url, "claimed")
        assert claim is not None
        assert (claim["state"], claim["token"]) == ("claimed", claimed.token)
        lease = timedelta(seconds=60)
        assert before + lease <= claim["lease_until"] <= after + lease
        assert claim["expire_at"] == claim["lease_until"] + timedelta(hours=1)

        mark = await raw_document(firestore_url, "done")
        assert mark is not None
        assert mark == {"state": "done", "token": done.token, "expire_at": mark["expire_at"]}
        keep = timedelta(seconds=90_000)
        assert before + keep <= mark["expire_at"] <= after + keep

    async def main() -> None:
        store = FirestoreStore.from_url(firestore_url, retention_seconds=90_000)
        try:
            await scenario(store)
        finally:
            await store.aclose()

    asyncio.run(main())


def test_documents_live_in_the_prefixed_collection_under_the_key_digest(
    firestore_url: str,
) -> None:
    key = "google.cloud.storage.object.v1.finalized|b|a/b/c.txt|1|1"

    async def scenario(store: FirestoreStore) -> None:
        await store.claim(key, 60)
        async with raw_claims(firestore_url) as claims:
            assert claims.id == "test-claims"
            ids = [document.id async for document in claims.list_documents()]
        assert ids == [document_id(key)]

    with_stores(firestore_url, 1, scenario)


def test_the_project_may_come_from_the_environment(
    firestore_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = FirestoreLocation.parse(firestore_url)
    assert location.project is not None
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", location.project)
    without_project = f"firestore:///{location.database}?prefix={location.prefix}"

    async def scenario(store: FirestoreStore) -> None:
        lease = leased(await store.claim("k", 60))
        assert (await raw_document(firestore_url, "k") or {})["token"] == lease.token

    with_stores(without_project, 1, scenario)


def test_ping_answers_when_the_emulator_does(firestore_url: str) -> None:
    async def scenario(store: FirestoreStore) -> None:
        await store.ping()
        leased(await store.claim("k", 60))  # ping wrote nothing

    with_stores(firestore_url, 1, scenario)


async def each_operation_fails_in_bounded_time(store: FirestoreStore) -> list[str]:
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: store.claim("k", 60),
        lambda: store.renew("k", 1, 60),
        lambda: store.complete("k", 1),
        lambda: store.release("k", 1),
        store.ping,
    ]

    async def fails(operation: Callable[[], Awaitable[object]]) -> str:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as raised:
            await operation()
        assert time.monotonic() - started < UNAVAILABLE_WITHIN
        return str(raised.value)

    return list(await asyncio.gather(*(fails(operation) for operation in operations)))


def test_a_dead_endpoint_is_unavailable_within_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens

    async def scenario(store: FirestoreStore) -> None:
        reasons = await each_operation_fails_in_bounded_time(store)
        assert all(reason.startswith("firestore: ServiceUnavailable") for reason in reasons)

    with_stores("firestore://test-dead/gcs-notifier", 1, scenario)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A port that accepts connections and never answers (a hung server, a black-holed route)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_an_endpoint_that_never_answers_is_unavailable_within_bounded_time(
    silent_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", silent_endpoint)

    async def scenario(store: FirestoreStore) -> None:
        reasons = await each_operation_fails_in_bounded_time(store)
        assert all(reason.startswith("firestore: ") for reason in reasons)

    with_stores("firestore://test-silent/gcs-notifier", 1, scenario)


def test_a_stopped_emulator_makes_the_store_unavailable_within_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.firestore_emulator import firestore_emulator_process  # registered as a plugin

    async def scenario() -> None:
        with firestore_emulator_process(tmp_path / "first.log") as host:
            monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", host)
            store = FirestoreStore.from_url("firestore://test-stopped/gcs-notifier")
            leased(await store.claim("k", 60))
        try:
            reasons = await each_operation_fails_in_bounded_time(store)
            assert all(reason.startswith("firestore: ") for reason in reasons)
        finally:
            await store.aclose()

    asyncio.run(scenario())
