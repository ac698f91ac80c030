"""The Firestore store against the emulator: what the shared contract suite cannot show with one
client (several instances racing), the documents it writes, and how it fails."""

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
from google.cloud.firestore import AsyncCollectionReference

from app.stores.base import Claim, StoreUnavailable
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


def test_two_instances_claiming_one_key_at_once_have_one_winner(firestore_url: str) -> None:
    async def scenario(first: FirestoreStore, second: FirestoreStore) -> None:
        for key in ("a", "b", "c"):
            claims = [
                store.claim(key, f"{name}{i}", 60)
                for i in range(10)
                for name, store in (("first", first), ("second", second))
            ]
            results = await asyncio.gather(*claims)
            assert results.count(Claim.CLAIMED) == 1, key
            assert results.count(Claim.IN_FLIGHT) == 19, key

    with_stores(firestore_url, 2, scenario)


def test_an_expired_lease_is_taken_over_by_exactly_one_of_two(firestore_url: str) -> None:
    keys = [f"k{index}" for index in range(5)]

    async def scenario(crashed: FirestoreStore, a: FirestoreStore, b: FirestoreStore) -> None:
        for key in keys:
            assert await crashed.claim(key, "crashed", 0.3) is Claim.CLAIMED
        await asyncio.sleep(0.5)
        for key in keys:
            results = await asyncio.gather(a.claim(key, "a", 60), b.claim(key, "b", 60))
            assert sorted(results) == [Claim.CLAIMED, Claim.IN_FLIGHT], key
            winner = "a" if results[0] is Claim.CLAIMED else "b"
            document = await raw_document(firestore_url, key)
            assert document is not None
            assert document["owner"] == winner

    with_stores(firestore_url, 3, scenario)


def test_a_live_lease_is_not_taken_over(firestore_url: str) -> None:
    async def scenario(a: FirestoreStore, b: FirestoreStore) -> None:
        assert await a.claim("k", "a", 60) is Claim.CLAIMED
        assert await b.claim("k", "b", 60) is Claim.IN_FLIGHT
        assert (await raw_document(firestore_url, "k") or {})["owner"] == "a"

    with_stores(firestore_url, 2, scenario)


def test_the_same_owner_claiming_again_keeps_its_claim(firestore_url: str) -> None:
    """A retried claim whose first answer was lost finds its own document: still its claim."""

    async def scenario(a: FirestoreStore, b: FirestoreStore) -> None:
        assert await a.claim("k", "a", 60) is Claim.CLAIMED
        assert await a.claim("k", "a", 60) is Claim.CLAIMED
        assert await b.claim("k", "b", 60) is Claim.IN_FLIGHT

    with_stores(firestore_url, 2, scenario)


def test_release_by_another_instance_leaves_the_claim(firestore_url: str) -> None:
    async def scenario(a: FirestoreStore, b: FirestoreStore) -> None:
        await a.claim("k", "a", 60)
        await b.release("k", "b")
        assert (await raw_document(firestore_url, "k") or {})["owner"] == "a"
        assert await b.claim("k", "b", 60) is Claim.IN_FLIGHT
        await a.release("k", "a")
        assert await raw_document(firestore_url, "k") is None
        assert await b.claim("k", "b", 60) is Claim.CLAIMED

    with_stores(firestore_url, 2, scenario)


def test_a_release_after_the_lease_moved_leaves_the_new_claim(firestore_url: str) -> None:
    async def scenario(slow: FirestoreStore, b: FirestoreStore, c: FirestoreStore) -> None:
        await slow.claim("k", "slow", 0.3)
        await asyncio.sleep(0.5)
        assert await b.claim("k", "b", 60) is Claim.CLAIMED
        await slow.release("k", "slow")
        assert await c.claim("k", "c", 60) is Claim.IN_FLIGHT

    with_stores(firestore_url, 3, scenario)


def test_complete_after_the_lease_moved_marks_the_key_done(firestore_url: str) -> None:
    """The slow sender's email was accepted: done, whoever holds the lease by then."""

    async def scenario(slow: FirestoreStore, b: FirestoreStore, c: FirestoreStore) -> None:
        await slow.claim("k", "slow", 0.3)
        await asyncio.sleep(0.5)
        assert await b.claim("k", "b", 60) is Claim.CLAIMED
        await slow.complete("k", "slow", 3600)
        await b.release("k", "b")  # b gives up: done stays done
        assert await c.claim("k", "c", 60) is Claim.DONE
        assert (await raw_document(firestore_url, "k") or {})["state"] == "done"

    with_stores(firestore_url, 3, scenario)


def test_a_damaged_document_is_taken_over(firestore_url: str) -> None:
    async def scenario(store: FirestoreStore) -> None:
        async with raw_claims(firestore_url) as claims:
            await claims.document(document_id("k")).set({"state": 7})
        assert await store.claim("k", "a", 60) is Claim.CLAIMED
        assert (await raw_document(firestore_url, "k") or {})["owner"] == "a"

    with_stores(firestore_url, 1, scenario)


def test_every_document_carries_expire_at(firestore_url: str) -> None:
    """Firestore's TTL policy deletes documents after `expire_at`: claims an hour past their
    lease (TTL tidies abandoned claims, the lease ends them), done marks after their retention."""

    async def scenario(store: FirestoreStore) -> None:
        before = datetime.now(UTC)
        await store.claim("claimed", "a", 60)
        await store.claim("done", "a", 60)
        await store.complete("done", "a", 90_000)
        after = datetime.now(UTC)

        claim = await raw_document(firestore_url, "claimed")
        assert claim is not None
        assert claim["state"] == "claimed"
        assert claim["owner"] == "a"
        lease = timedelta(seconds=60)
        assert before + lease <= claim["lease_until"] <= after + lease
        assert claim["expire_at"] == claim["lease_until"] + timedelta(hours=1)

        done = await raw_document(firestore_url, "done")
        assert done is not None
        assert done["state"] == "done"
        keep = timedelta(seconds=90_000)
        assert before + keep <= done["expire_at"] <= after + keep

    with_stores(firestore_url, 1, scenario)


def test_documents_live_in_the_prefixed_collection_under_the_key_digest(
    firestore_url: str,
) -> None:
    key = "google.cloud.storage.object.v1.finalized|b|a/b/c.txt|1|1"

    async def scenario(store: FirestoreStore) -> None:
        await store.claim(key, "a", 60)
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
        assert await store.claim("k", "a", 60) is Claim.CLAIMED
        assert (await raw_document(firestore_url, "k") or {})["owner"] == "a"

    with_stores(without_project, 1, scenario)


def test_ping_answers_when_the_emulator_does(firestore_url: str) -> None:
    async def scenario(store: FirestoreStore) -> None:
        await store.ping()
        assert await store.claim("k", "a", 60) is Claim.CLAIMED  # ping wrote nothing

    with_stores(firestore_url, 1, scenario)


async def each_operation_fails_in_bounded_time(store: FirestoreStore) -> list[str]:
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: store.claim("k", "a", 60),
        lambda: store.complete("k", "a", 60),
        lambda: store.release("k", "a"),
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
            assert await store.claim("k", "a", 60) is Claim.CLAIMED
        try:
            reasons = await each_operation_fails_in_bounded_time(store)
            assert all(reason.startswith("firestore: ") for reason in reasons)
        finally:
            await store.aclose()

    asyncio.run(scenario())
