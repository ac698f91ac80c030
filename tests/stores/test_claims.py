"""Every idempotency store keeps the same promises: one claim per key, leases expire, done lasts."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.stores.base import Claim, StoreUnavailable
from app.stores.claims import IdempotencyStore
from app.stores.factory import open_store
from app.stores.firestore import FirestoreLocation
from tests.redis_server import redis_server

pytest_plugins = ["tests.firestore_emulator"]
BACKENDS = ["memory", "sqlite", "redis", "firestore"]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/state/notifier.db"
    elif request.param == "firestore":
        yield request.getfixturevalue("firestore_url")
    else:
        with redis_server(tmp_path) as url:
            yield url


def run(store_url: str, scenario: object) -> None:
    async def main() -> None:
        store = open_store(store_url)
        try:
            await scenario(store)  # type: ignore[operator]
        finally:
            await store.aclose()

    asyncio.run(main())


def test_first_claim_wins_and_others_see_it_in_flight(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        assert await store.claim("k", "a", 60) is Claim.CLAIMED
        assert await store.claim("k", "b", 60) is Claim.IN_FLIGHT
        assert await store.claim("other", "b", 60) is Claim.CLAIMED

    run(store_url, scenario)


def test_done_key_is_reported_done_to_everyone(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        await store.claim("k", "a", 60)
        await store.complete("k", "a", 3600)
        assert await store.claim("k", "b", 60) is Claim.DONE
        assert await store.claim("k", "a", 60) is Claim.DONE

    run(store_url, scenario)


def test_release_lets_the_next_delivery_claim(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        await store.claim("k", "a", 60)
        await store.release("k", "a")
        assert await store.claim("k", "b", 60) is Claim.CLAIMED

    run(store_url, scenario)


def test_release_by_another_owner_does_nothing(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        await store.claim("k", "a", 60)
        await store.release("k", "intruder")
        assert await store.claim("k", "b", 60) is Claim.IN_FLIGHT

    run(store_url, scenario)


def test_release_never_undoes_done(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        await store.claim("k", "a", 60)
        await store.complete("k", "a", 3600)
        await store.release("k", "a")
        assert await store.claim("k", "b", 60) is Claim.DONE

    run(store_url, scenario)


def test_an_expired_lease_can_be_claimed_again(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        assert await store.claim("k", "crashed", 0.2) is Claim.CLAIMED
        await asyncio.sleep(0.35)
        assert await store.claim("k", "b", 60) is Claim.CLAIMED

    run(store_url, scenario)


def test_done_expires_after_its_retention(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        await store.claim("k", "a", 60)
        await store.complete("k", "a", 0.2)
        await asyncio.sleep(0.35)
        assert await store.claim("k", "b", 60) is Claim.CLAIMED

    run(store_url, scenario)


def test_concurrent_claims_of_one_key_have_one_winner(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        results = await asyncio.gather(*(store.claim("k", f"o{i}", 60) for i in range(50)))
        assert results.count(Claim.CLAIMED) == 1
        assert results.count(Claim.IN_FLIGHT) == 49

    run(store_url, scenario)


def test_long_keys_with_odd_characters_are_fine(store_url: str) -> None:
    key = "google.cloud.storage.object.v1.finalized|b|" + "ü\r\n/*?" * 200 + "|1|1"

    async def scenario(store: IdempotencyStore) -> None:
        assert await store.claim(key, "a", 60) is Claim.CLAIMED
        await store.complete(key, "a", 60)
        assert await store.claim(key, "b", 60) is Claim.DONE

    run(store_url, scenario)


def test_sqlite_done_marks_survive_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/notifier.db"

    async def scenario() -> None:
        first = open_store(url)
        assert await first.claim("k", "a", 60) is Claim.CLAIMED
        await first.complete("k", "a", 3600)
        await first.aclose()
        reopened = open_store(url)
        assert await reopened.claim("k", "c", 60) is Claim.DONE
        await reopened.aclose()

    asyncio.run(scenario())


def test_sqlite_claims_die_with_their_process(tmp_path: Path) -> None:
    """A claim means "this process is sending": after a crash, the restarted service may send at
    once instead of answering 409 until the crashed process's lease runs out."""
    url = f"sqlite:///{tmp_path}/notifier.db"

    async def scenario() -> None:
        crashed = open_store(url)
        assert await crashed.claim("k", "a", 60) is Claim.CLAIMED
        restarted = open_store(url)
        assert await restarted.claim("k", "b", 60) is Claim.CLAIMED
        await restarted.complete("k", "b", 3600)
        assert await crashed.claim("k", "a", 60) is Claim.DONE  # done marks are shared
        await crashed.aclose()
        await restarted.aclose()

    asyncio.run(scenario())


def test_unreachable_redis_raises_store_unavailable() -> None:
    async def scenario() -> None:
        store = open_store("redis://127.0.0.1:9/0")
        with pytest.raises(StoreUnavailable):
            await store.claim("k", "a", 60)
        await store.aclose()

    asyncio.run(scenario())


def test_firestore_urls_open_the_firestore_store_without_a_call() -> None:
    from app.stores.firestore_claims import FirestoreStore

    store = open_store("firestore:///gcs-notifier?prefix=p")  # no client yet, so no credentials
    assert isinstance(store, FirestoreStore)
    assert store.location == FirestoreLocation(None, "gcs-notifier", "p")
    with pytest.raises(ValueError, match="names no database"):
        open_store("firestore://my-project")


def test_unknown_store_url_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown idempotency store"):
        open_store("postgres://x")


def test_sqlite_maintenance_purges_expired_records_and_keeps_live_ones(tmp_path: Path) -> None:
    from app.stores.sqlite_claims import SqliteStore

    async def scenario() -> None:
        store = SqliteStore(str(tmp_path / "notifier.db"))
        await store.claim("expired", "a", 60)
        await store.complete("expired", "a", 0.01)
        await store.claim("kept", "a", 60)
        await store.complete("kept", "a", 3600)
        await asyncio.sleep(0.05)
        store.maintain(time.time())
        rows = sqlite3.connect(tmp_path / "notifier.db").execute("SELECT COUNT(*) FROM done")
        assert rows.fetchone() == (1,)
        assert await store.claim("kept", "b", 60) is Claim.DONE
        assert await store.claim("expired", "b", 60) is Claim.CLAIMED
        await store.aclose()

    asyncio.run(scenario())


def test_sqlite_writes_trigger_background_maintenance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.stores import sqlite_claims as sqlite_store

    monkeypatch.setattr(sqlite_store, "MAINTAIN_EVERY", 10)
    wal = tmp_path / "notifier.db-wal"

    async def scenario() -> None:
        store = sqlite_store.SqliteStore(str(tmp_path / "notifier.db"))
        for index in range(30):
            await store.claim(f"k{index}", "a", 60)
            await store.complete(f"k{index}", "a", 0)
        await asyncio.sleep(0.1)
        await store.aclose()  # waits for the maintenance under way, then truncates the WAL

    asyncio.run(scenario())
    rows = sqlite3.connect(tmp_path / "notifier.db").execute("SELECT COUNT(*) FROM done")
    assert rows.fetchone()[0] < 30  # of 30 keys, the expired ones were purged along the way
    assert not wal.exists() or wal.stat().st_size == 0
