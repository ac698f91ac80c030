"""Redis store: one record per key shared by every Cloud Run instance (Memorystore).

A key's record is a string under `gcs-notifier:delivery:<sha256 of the key>`:
- `claimed:TOKEN`, expiring with the lease (PX): a claim in flight, fenced by TOKEN;
- `done:TOKEN`, expiring after the retention: done, completed by TOKEN while it held the claim;
- `done:` (no token): done by a holder that had lost its claim, or marked by a rate route's
  overflow (app.stores.redis_windows writes it, with `redis_key` and `DONE_BY_NOBODY`).
The previous version wrote `done` and `claimed:OWNER` (a uuid): they read as done and as a live
claim of token 0, which no holder of this version has.

`claim`, `renew`, `complete` and `release` are each one Lua script: one round trip, atomic in
Redis. A lease's end is the record's expiry (a record that exists has a live lease). Tokens come
from the server: `max(last token + 1, TIME in microseconds)`, the last one kept in one counter
key (`gcs-notifier:delivery-token`), so a token is larger than every token handed out before,
whatever key it was for and whether that key's record expired or was deleted since; the clock
keeps them growing should the counter be lost with a Redis restart. Microseconds since the epoch
stay below 2^53 (Lua's numbers are doubles) until the year 2255, and the scripts format tokens
as decimal strings, so Python gets them exactly. The counter is a second key in the claim
script, so this needs a standalone Redis (Memorystore basic or standard tier), as the digest
store does, not Redis Cluster; and Redis 5 or later, which replicates a script by its effects,
so a script may write after reading the clock.
"""

from __future__ import annotations

import hashlib
import math
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.config import DEDUPE_RETENTION_SECONDS
from app.stores.base import Claim, Lease, StoreUnavailable

_PREFIX = "gcs-notifier:delivery:"
_TOKENS = "gcs-notifier:delivery-token"
DONE_BY_NOBODY = "done:"  # a done mark that no holder completed (overflow, or a lost claim)

# The token a record's value names: `claimed:TOKEN` / `done:TOKEN`; '0' for an old
# `claimed:OWNER`; nil for `done:`, the old `done` and a value of no known form.
_HOLDER = """
local function holder(value, kind)
  if not value or string.sub(value, 1, #kind) ~= kind then return nil end
  local rest = string.sub(value, #kind + 1)
  if string.match(rest, '^%d+$') then return rest end
  if kind == 'claimed:' then return '0' end
  return nil
end
local function done(value)
  return value == 'done' or string.sub(value, 1, 5) == 'done:'
end
"""

# KEYS: record, token counter. ARGV: lease in ms. Returns 'done', 'in-flight' or the token.
_CLAIM = (
    _HOLDER
    + """
local value = redis.call('GET', KEYS[1])
if value then
  if done(value) then return 'done' end
  return 'in-flight'
end
local now = redis.call('TIME')
local token = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if last + 1 > token then token = last + 1 end
token = string.format('%d', token)
redis.call('SET', KEYS[2], token)
redis.call('SET', KEYS[1], 'claimed:' .. token, 'PX', ARGV[1])
return token
"""
)

# KEYS: record. ARGV: token, lease in ms. Returns 1 when renewed.
_RENEW = (
    _HOLDER
    + """
if holder(redis.call('GET', KEYS[1]), 'claimed:') ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# KEYS: record. ARGV: token, retention in ms. Returns 1 when the token held the claim (or had
# completed it while holding it: a retry), 0 otherwise; done either way.
_COMPLETE = (
    _HOLDER
    + """
local value = redis.call('GET', KEYS[1])
if value and done(value) then
  return holder(value, 'done:') == ARGV[1] and 1 or 0
end
-- No record: the lease ran out and nobody claimed the key since; this token was the last holder.
local held = not value or holder(value, 'claimed:') == ARGV[1]
redis.call('SET', KEYS[1], 'done:' .. (held and ARGV[1] or ''), 'PX', ARGV[2])
return held and 1 or 0
"""
)

# KEYS: record. ARGV: token.
_RELEASE = (
    _HOLDER
    + """
if holder(redis.call('GET', KEYS[1]), 'claimed:') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)


def redis_key(key: str) -> str:
    """The record of `key` (app.stores.redis_windows marks overflowed keys done under it too)."""
    # Object names run to 1,024 bytes; a digest keeps keys short and free of odd characters.
    return _PREFIX + hashlib.sha256(key.encode()).hexdigest()


def milliseconds(seconds: float) -> int:
    """A PX argument: whole milliseconds, rounded up (a lease never ends early) and at least 1
    (Redis refuses 0)."""
    return max(1, math.ceil(seconds * 1000))


class RedisStore:
    def __init__(self, client: Redis, retention_seconds: float = DEDUPE_RETENTION_SECONDS) -> None:
        self._redis = client
        self.retention_seconds = retention_seconds
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, retention_seconds: float = DEDUPE_RETENTION_SECONDS) -> RedisStore:
        client = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        return cls(client, retention_seconds)

    async def claim(self, key: str, lease_seconds: float) -> Lease | Claim:
        now = time.time()  # before the write: the record's expiry never comes before `expires`
        keys = [redis_key(key), _TOKENS]
        try:
            answer = await self._claim(keys=keys, args=[milliseconds(lease_seconds)])
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error
        text = answer.decode() if isinstance(answer, bytes) else str(answer)
        if text in (Claim.DONE, Claim.IN_FLIGHT):
            return Claim(text)
        return Lease(int(text), now + lease_seconds)

    async def renew(self, key: str, token: int, lease_seconds: float) -> Lease | None:
        now = time.time()
        args: list[str | int] = [str(token), milliseconds(lease_seconds)]
        try:
            renewed = await self._renew(keys=[redis_key(key)], args=args)
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error
        return Lease(token, now + lease_seconds) if renewed else None

    async def complete(self, key: str, token: int) -> bool:
        args: list[str | int] = [str(token), milliseconds(self.retention_seconds)]
        try:
            held = await self._complete(keys=[redis_key(key)], args=args)
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error
        return bool(held)

    async def release(self, key: str, token: int) -> None:
        try:
            await self._release(keys=[redis_key(key)], args=[str(token)])
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error

    async def aclose(self) -> None:
        await self._redis.aclose()
