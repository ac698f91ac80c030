"""Redis store: one record per key shared by every Cloud Run instance (Memorystore).

A claim is `SET key claimed:OWNER NX PX lease`, atomic in Redis; done is `SET key done PX keep`;
a release deletes the key only while it still holds this owner's claim (a Lua script, atomic).
"""

from __future__ import annotations

import hashlib

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.stores.base import Claim, StoreUnavailable

_PREFIX = "gcs-notifier:delivery:"
_DONE = "done"
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _redis_key(key: str) -> str:
    # Object names run to 1,024 bytes; a digest keeps keys short and free of odd characters.
    return _PREFIX + hashlib.sha256(key.encode()).hexdigest()


class RedisStore:
    def __init__(self, client: Redis) -> None:
        self._redis = client

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        return cls(Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5))

    async def claim(self, key: str, owner: str, lease_seconds: float) -> Claim:
        name = _redis_key(key)
        lease_ms = max(1, int(lease_seconds * 1000))
        try:
            for _ in range(3):  # the record may expire between SET and GET: try again
                if await self._redis.set(name, f"claimed:{owner}", nx=True, px=lease_ms):
                    return Claim.CLAIMED
                value = await self._redis.get(name)
                if value is not None:
                    return Claim.DONE if value == _DONE.encode() else Claim.IN_FLIGHT
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error
        return Claim.IN_FLIGHT

    async def complete(self, key: str, owner: str, keep_seconds: float) -> None:
        try:
            await self._redis.set(_redis_key(key), _DONE, px=int(keep_seconds * 1000))
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error

    async def release(self, key: str, owner: str) -> None:
        try:
            await self._redis.eval(_RELEASE, 1, _redis_key(key), f"claimed:{owner}")
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error

    async def aclose(self) -> None:
        await self._redis.aclose()
