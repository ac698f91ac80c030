"""What only the Redis stores promise: records of the previous version still read, tokens come
back exact, the takers of a period go with it, and an overflow that fails writes nothing."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.stores.base import Claim, Lease, StoreUnavailable
from app.stores.redis_claims import RedisStore, redis_key
from app.stores.redis_windows import PREFIX, RedisDigestStore
from app.stores.windows import Taken, change_digest
from tests.redis_server import redis_server
from tests.stores.test_windows import NOW, item

pytestmark = pytest.mark.redis

RETENTION = 3600
Scenario = Callable[[Redis, RedisStore, RedisDigestStore], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario) -> None:
    async def main(url: str) -> None:
        client = Redis.from_url(url)
        claims = RedisStore(Redis.from_url(url), retention_seconds=RETENTION)
        windows = RedisDigestStore(Redis.from_url(url), retention_seconds=RETENTION)
        try:
            await scenario(client, claims, windows)
        finally:
            await windows.aclose()
            await claims.aclose()
            await client.aclose()

    with redis_server(tmp_path) as url:
        asyncio.run(main(url))


def leased(answer: Lease | Claim) -> Lease:
    assert isinstance(answer, Lease), answer
    return answer


async def snapshot(client: Redis) -> dict[bytes, bytes | None]:
    """Every key with its serialized value (not its remaining time, which moves)."""
    return {key: await client.dump(key) async for key in client.scan_iter()}


def window_key(window_id: str) -> str:
    return f"{PREFIX}w:{hashlib.sha1(window_id.encode()).hexdigest()}"


def test_an_old_done_mark_reads_as_done(tmp_path: Path) -> None:
    async def scenario(client: Redis, claims: RedisStore, _: RedisDigestStore) -> None:
        await client.set(redis_key("k"), "done", px=60_000)
        assert await claims.claim("k", 60) is Claim.DONE
        assert await claims.renew("k", 0, 60) is None
        assert await claims.complete("k", 0) is False  # nobody's token completed it
        await claims.release("k", 0)
        assert await claims.claim("k", 60) is Claim.DONE
        assert await client.get(redis_key("k")) == b"done"

    run(tmp_path, scenario)


def test_an_old_claim_is_a_live_claim_of_token_0(tmp_path: Path) -> None:
    async def scenario(client: Redis, claims: RedisStore, _: RedisDigestStore) -> None:
        await client.set(redis_key("k"), "claimed:0f4c2a7e9b1d4e3a8c5b6d7e8f901234", px=300)
        assert await claims.claim("k", 60) is Claim.IN_FLIGHT
        await claims.release("k", 1)  # no token of this version holds it
        assert await claims.claim("k", 60) is Claim.IN_FLIGHT
        assert await claims.renew("k", 1, 60) is None
        await asyncio.sleep(0.4)  # its lease ran out
        assert leased(await claims.claim("k", 60)).token > 0

    run(tmp_path, scenario)


def test_completing_over_an_old_claim_reports_the_takeover(tmp_path: Path) -> None:
    async def scenario(client: Redis, claims: RedisStore, _: RedisDigestStore) -> None:
        await client.set(redis_key("k"), "claimed:0f4c2a7e9b1d4e3a8c5b6d7e8f901234", px=60_000)
        assert await claims.complete("k", 1) is False
        assert await claims.claim("k", 60) is Claim.DONE
        assert await client.get(redis_key("k")) == b"done:"

    run(tmp_path, scenario)


def test_done_marks_name_the_holder_that_completed_them(tmp_path: Path) -> None:
    async def scenario(client: Redis, claims: RedisStore, _: RedisDigestStore) -> None:
        held = leased(await claims.claim("held", 60))
        assert await client.get(redis_key("held")) == f"claimed:{held.token}".encode()
        assert await claims.complete("held", held.token)
        assert await client.get(redis_key("held")) == f"done:{held.token}".encode()
        assert (RETENTION - 5) * 1000 < await client.pttl(redis_key("held")) <= RETENTION * 1000
        stale = leased(await claims.claim("lost", 0.2))
        await asyncio.sleep(0.35)
        leased(await claims.claim("lost", 60))
        assert await claims.complete("lost", stale.token) is False
        assert await client.get(redis_key("lost")) == b"done:"

    run(tmp_path, scenario)


def test_tokens_follow_the_server_clock_and_come_back_exact(tmp_path: Path) -> None:
    async def scenario(client: Redis, claims: RedisStore, _: RedisDigestStore) -> None:
        first = leased(await claims.claim("a", 60))
        assert abs(first.token - time.time() * 1_000_000) < 5_000_000
        # A counter ahead of the clock (clock stepped back, or 2^53 near): the next token
        # follows it, exactly, even where a double's last digit would round.
        await client.set("gcs-notifier:delivery-token", str(2**53 - 3))
        lease = leased(await claims.claim("b", 60))
        assert lease.token == 2**53 - 2
        await claims.release("b", lease.token)  # the record is deleted; the counter stays
        assert leased(await claims.claim("b", 60)).token == 2**53 - 1

    run(tmp_path, scenario)


def test_overflow_marks_keys_done_as_the_claims_store_writes_them(tmp_path: Path) -> None:
    async def scenario(client: Redis, claims: RedisStore, windows: RedisDigestStore) -> None:
        lease = leased(await claims.claim("k", 60))
        await windows.overflow("r", 300, 10, item(1), NOW, ["k", "unclaimed"])
        for key in ("k", "unclaimed"):
            assert await client.get(redis_key(key)) == b"done:"
            assert (RETENTION - 5) * 1000 < await client.pttl(redis_key(key)) <= RETENTION * 1000
        assert await claims.complete("k", lease.token) is False  # overflow had marked it

    run(tmp_path, scenario)


def test_overflow_writes_nothing_when_redis_refuses_writes(tmp_path: Path) -> None:
    """maxmemory reached (noeviction): Redis refuses the script's first write, so neither the
    digest nor a done mark changes, and the caller hears StoreUnavailable."""

    async def scenario(client: Redis, claims: RedisStore, windows: RedisDigestStore) -> None:
        window = (await windows.add("r", 300, 10, item(1), NOW)).window_id
        await windows.overflow("other", 300, 10, item(1), NOW, ["other"])  # the script is loaded
        leased(await claims.claim("held", 60))
        before = await snapshot(client)
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", 1)
        try:
            with pytest.raises(StoreUnavailable, match="OutOfMemoryError"):
                await windows.overflow("r", 300, 10, item(2), NOW + 1, ["held", "free"])
        finally:
            await client.config_set("maxmemory", 0)
        assert await snapshot(client) == before
        assert await claims.claim("held", 60) is Claim.IN_FLIGHT
        leased(await claims.claim("free", 60))
        assert (await windows.read(window)).summary.items == [item(1)]
        # The same call succeeds once Redis takes writes again: it had failed for that alone.
        added = await windows.overflow("r", 300, 10, item(2), NOW + 2, ["held"])
        assert (added.window_id, added.duplicate) == (window, False)
        assert await claims.claim("held", 60) is Claim.DONE

    run(tmp_path, scenario)


def test_overflow_into_a_damaged_window_fails_before_its_first_write(tmp_path: Path) -> None:
    """A counter the join increments after its first write (here the window's count of
    finalized events) is checked before any write, so the script fails with nothing written
    rather than midway with the event half joined and no done mark."""

    async def scenario(client: Redis, claims: RedisStore, windows: RedisDigestStore) -> None:
        window = (await windows.add("r", 300, 10, item(1), NOW)).window_id
        await client.hset(window_key(window), "c:finalized", "not a number")
        before = await snapshot(client)
        with pytest.raises(StoreUnavailable):
            await windows.overflow("r", 300, 10, item(2), NOW + 1, ["k"])
        with pytest.raises(StoreUnavailable):
            await windows.add("r", 300, 10, item(2), NOW + 1)
        assert await snapshot(client) == before
        leased(await claims.claim("k", 60))

    run(tmp_path, scenario)


def test_the_takers_of_a_period_expire_with_it_and_a_new_period_forgets_them(
    tmp_path: Path,
) -> None:
    async def scenario(client: Redis, _: RedisStore, windows: RedisDigestStore) -> None:
        route = "r"
        takers = f"{PREFIX}takers:{hashlib.sha1(route.encode()).hexdigest()}"
        await windows.take(route, "c1", 5, 60, NOW)
        await windows.take(route, "c2", 5, 60, NOW + 1)
        assert await client.smembers(takers) == {
            change_digest(route, "c1"),
            change_digest(route, "c2"),
        }
        assert 59_000 < await client.pttl(takers) <= 60_000
        assert await windows.take(route, "c3", 5, 60, NOW + 61) == Taken(True, NOW + 121, 1)
        assert await client.smembers(takers) == {change_digest(route, "c3")}

    run(tmp_path, scenario)


def test_a_period_started_by_the_previous_version_gets_takers_that_expire_with_it(
    tmp_path: Path,
) -> None:
    async def scenario(client: Redis, _: RedisStore, windows: RedisDigestStore) -> None:
        route = "r"
        hashed = hashlib.sha1(route.encode()).hexdigest()
        rate, takers = f"{PREFIX}rate:{hashed}", f"{PREFIX}takers:{hashed}"
        await client.hset(rate, mapping={"end": repr(NOW + 60), "used": 2})
        await client.pexpire(rate, 30_000)
        assert await windows.take(route, "c1", 5, 60, NOW) == Taken(True, NOW + 60, 3)
        assert await windows.take(route, "c1", 5, 60, NOW + 1) == Taken(True, NOW + 60, 3, True)
        assert 29_000 < await client.pttl(takers) <= 30_000

    run(tmp_path, scenario)


def test_a_window_claimed_by_the_previous_version_is_held_until_its_lease_ends(
    tmp_path: Path,
) -> None:
    async def scenario(client: Redis, _: RedisStore, windows: RedisDigestStore) -> None:
        window = (await windows.add("r", 60, 10, item(1), NOW)).window_id
        old = ["state", "sending", "owner", "0f4c2a7e", "lease_ms", repr((NOW + 90) * 1000)]
        await client.hset(window_key(window), items=old)
        assert await windows.claim(window, 30, NOW + 60) is Claim.IN_FLIGHT
        lease = leased(await windows.claim(window, 30, NOW + 91))
        assert lease.token == int((NOW + 91) * 1_000_000)
        assert await client.hget(window_key(window), "owner") is None
        assert await windows.complete(window, lease.token, NOW + 92) is True

    run(tmp_path, scenario)
