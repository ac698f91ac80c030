"""Every idempotency store keeps the same promises: one claim per key, leases expire, done lasts."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from app.stores.base import Claim, Lease, StoreUnavailable
from app.stores.claims import IdempotencyStore
from app.stores.factory import open_store
from app.stores.firestore import FirestoreLocation

pytest_plugins = ["tests.firestore_emulator", "tests.store_backends"]


def run(store_url: str, scenario: object, *, retention_seconds: float = 3600) -> None:
    async def main() -> None:
        store = open_store(store_url, retention_seconds=retention_seconds)
        try:
            await scenario(store)  # type: ignore[operator]
        finally:
            await store.aclose()

    asyncio.run(main())


def leased(answer: Lease | Claim) -> Lease:
    assert isinstance(answer, Lease), answer
    return answer


def test_first_claim_wins_and_others_see_it_in_flight(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        before = time.time()
        lease = leased(await store.claim("k", 60))
        assert before + 60 <= lease.expires <= time.time() + 60
        assert await store.claim("k", 60) is Claim.IN_FLIGHT
        leased(await store.claim("other", 60))

    run(store_url, scenario)


def test_done_key_is_reported_done_to_everyone(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        lease = leased(await store.claim("k", 60))
        assert await store.complete("k", lease.token)
        assert await store.claim("k", 60) is Claim.DONE
        assert await store.renew("k", lease.token, 60) is None  # nothing left to send

    run(store_url, scenario)


def test_release_lets_the_next_delivery_claim(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        lease = leased(await store.claim("k", 60))
        await store.release("k", lease.token)
        again = leased(await store.claim("k", 60))
        assert again.token > lease.token

    run(store_url, scenario)


def test_release_with_another_token_does_nothing(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        lease = leased(await store.claim("k", 60))
        await store.release("k", lease.token + 1)
        await store.release("k", lease.token - 1)
        assert await store.claim("k", 60) is Claim.IN_FLIGHT

    run(store_url, scenario)


def test_release_never_undoes_done(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        lease = leased(await store.claim("k", 60))
        await store.complete("k", lease.token)
        await store.release("k", lease.token)
        assert await store.claim("k", 60) is Claim.DONE

    run(store_url, scenario)


def test_an_expired_lease_can_be_claimed_again_with_a_larger_token(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        crashed = leased(await store.claim("k", 0.2))
        await asyncio.sleep(0.35)
        taken_over = leased(await store.claim("k", 60))
        assert taken_over.token > crashed.token

    run(store_url, scenario)


def test_renew_extends_a_live_lease_from_now(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        lease = leased(await store.claim("k", 0.5))
        await asyncio.sleep(0.3)
        before = time.time()
        renewed = await store.renew("k", lease.token, 0.6)
        assert renewed is not None
        assert renewed.token == lease.token
        assert renewed.expires >= before + 0.6
        await asyncio.sleep(0.4)  # past the first lease's end, inside the renewed one
        assert await store.claim("k", 60) is Claim.IN_FLIGHT

    run(store_url, scenario)


def test_a_holder_whose_lease_ran_out_cannot_renew_even_unclaimed(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        lease = leased(await store.claim("k", 0.2))
        await asyncio.sleep(0.35)
        assert await store.renew("k", lease.token, 60) is None

    run(store_url, scenario)


def test_a_stale_holder_cannot_renew_or_release_the_new_holders_claim(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        stale = leased(await store.claim("k", 0.2))
        await asyncio.sleep(0.35)
        current = leased(await store.claim("k", 60))
        assert await store.renew("k", stale.token, 60) is None
        await store.release("k", stale.token)
        assert await store.claim("k", 60) is Claim.IN_FLIGHT  # the new claim stands
        assert await store.renew("k", current.token, 60) is not None

    run(store_url, scenario)


def test_a_stale_complete_reports_the_takeover_and_its_done_mark_stops_the_new_holder(
    store_url: str,
) -> None:
    """The stale holder's email went out: its done mark stands, so the holder that took over
    fails the renew it makes before sending, and no second email follows."""

    async def scenario(store: IdempotencyStore) -> None:
        stale = leased(await store.claim("k", 0.2))
        await asyncio.sleep(0.35)
        current = leased(await store.claim("k", 60))
        assert await store.complete("k", stale.token) is False
        assert await store.renew("k", current.token, 60) is None
        assert await store.claim("k", 60) is Claim.DONE
        assert await store.complete("k", current.token) is False

    run(store_url, scenario)


def test_complete_after_the_lease_ran_out_unclaimed_is_the_holders(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        slow = leased(await store.claim("k", 0.2))
        await asyncio.sleep(0.35)
        assert await store.complete("k", slow.token) is True
        assert await store.claim("k", 60) is Claim.DONE

    run(store_url, scenario)


def test_done_expires_after_its_retention(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        lease = leased(await store.claim("k", 60))
        await store.complete("k", lease.token)
        await asyncio.sleep(0.35)
        leased(await store.claim("k", 60))

    run(store_url, scenario, retention_seconds=0.2)


def test_concurrent_claims_of_one_key_have_one_winner(store_url: str) -> None:
    async def scenario(store: IdempotencyStore) -> None:
        results = await asyncio.gather(*(store.claim("k", 60) for _ in range(50)))
        assert sum(isinstance(result, Lease) for result in results) == 1
        assert results.count(Claim.IN_FLIGHT) == 49

    run(store_url, scenario)


def test_long_keys_with_odd_characters_are_fine(store_url: str) -> None:
    key = "google.cloud.storage.object.v1.finalized|b|" + "ü\r\n/*?" * 200 + "|1|1"

    async def scenario(store: IdempotencyStore) -> None:
        lease = leased(await store.claim(key, 60))
        await store.complete(key, lease.token)
        assert await store.claim(key, 60) is Claim.DONE

    run(store_url, scenario)


def test_sqlite_done_marks_survive_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/notifier.db"

    async def scenario() -> None:
        first = open_store(url)
        await first.complete("k", leased(await first.claim("k", 60)).token)
        await first.aclose()
        reopened = open_store(url)
        assert await reopened.claim("k", 60) is Claim.DONE
        await reopened.aclose()

    asyncio.run(scenario())


def test_sqlite_claims_die_with_their_process(tmp_path: Path) -> None:
    """A claim means "this process is sending": after a crash, the restarted service may send at
    once instead of answering 409 until the crashed process's lease runs out."""
    url = f"sqlite:///{tmp_path}/notifier.db"

    async def scenario() -> None:
        crashed = open_store(url)
        leased(await crashed.claim("k", 60))
        restarted = open_store(url)
        lease = leased(await restarted.claim("k", 60))
        await restarted.complete("k", lease.token)
        assert await crashed.claim("k", 60) is Claim.DONE  # done marks are shared
        await crashed.aclose()
        await restarted.aclose()

    asyncio.run(scenario())


def test_unreachable_redis_raises_store_unavailable() -> None:
    async def scenario() -> None:
        store = open_store("redis://127.0.0.1:9/0")
        with pytest.raises(StoreUnavailable):
            await store.claim("k", 60)
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
        short = SqliteStore(str(tmp_path / "notifier.db"), retention_seconds=0.01)
        await short.complete("expired", leased(await short.claim("expired", 60)).token)
        store = SqliteStore(str(tmp_path / "notifier.db"), retention_seconds=3600)
        await store.complete("kept", leased(await store.claim("kept", 60)).token)
        await asyncio.sleep(0.05)
        store.maintain(time.time())
        rows = sqlite3.connect(tmp_path / "notifier.db").execute("SELECT COUNT(*) FROM done")
        assert rows.fetchone() == (1,)
        assert await store.claim("kept", 60) is Claim.DONE
        leased(await store.claim("expired", 60))
        await short.aclose()
        await store.aclose()

    asyncio.run(scenario())


def test_sqlite_writes_trigger_background_maintenance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.stores import sqlite_claims as sqlite_store

    monkeypatch.setattr(sqlite_store, "MAINTAIN_EVERY", 10)
    wal = tmp_path / "notifier.db-wal"

    async def scenario() -> None:
        store = sqlite_store.SqliteStore(str(tmp_path / "notifier.db"), retention_seconds=0)
        for index in range(30):
            await store.complete(f"k{index}", leased(await store.claim(f"k{index}", 60)).token)
        await asyncio.sleep(0.1)
        await store.aclose()  # waits for the maintenance under way, then truncates the WAL

    asyncio.run(scenario())
    rows = sqlite3.connect(tmp_path / "notifier.db").execute("SELECT COUNT(*) FROM done")
    assert rows.fetchone()[0] < 30  # of 30 keys, the expired ones were purged along the way
    assert not wal.exists() or wal.stat().st_size == 0
