"""Digest windows in Redis, shared by every instance (Memorystore). Not wired into the service
yet (issue 11).

Keys (under `gcs-notifier:digest:`; ids and routes are hashed into key names, as object names
may be long and odd):
- `route:<sha1(route)>`: hash with `open` (the route's OPEN window id), `last_ms` (start of its
  latest window) and `closed_at` (when its previous window was closed);
- `w:<sha1(window id)>`: hash with the window's state, owner, lease, times, and its counters;
- `items:<sha1(window id)>`: list of the first `max_items` items as DigestItem JSON;
- `due`: sorted set of every window not yet done, scored by when `due` should list it (due
  time, lease end, or release time), in milliseconds;
- `change:<hex>`: the window a change joined, expiring after the retention; a window that a
  leading change opened names that change's key in its hash (`lead`);
- `rate:<sha1(route)>`: hash with `end` (when the route's current period ends, as the seconds
  `repr` the caller's clock gave) and `used`, expiring when the period ends.

`add`, `claim`, `complete`, `release` and `take` are Lua scripts, atomic in Redis: two
instances cannot both open a route's window, nor both claim one, nor take a period's last
email. A window's key is derived inside the scripts (with `redis.sha1hex`) from ids the scripts
read, so this needs a standalone Redis (Memorystore basic or standard tier), not Redis Cluster.

The summary lives as counters in the window's hash, updated inside the script (`HINCRBY` for
counts and bytes, numeric comparisons for the first and last time in microseconds), and
`read` builds the DigestSummary from them. The common prefix is computed in Lua byte by byte:
a byte-wise common prefix cut back after its last "/" equals the character-wise one
DigestSummary computes, because in UTF-8 the byte of "/" never occurs inside another
character. Doing it in the script keeps `add` one round trip with no WATCH retries, which a
burst of events into one window would otherwise cause on every instance at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.digests.window import MAX_BUCKETS, DigestItem, DigestSummary
from app.events.models import EventType
from app.stores.base import Claim, StoreUnavailable
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
)

PREFIX = "gcs-notifier:digest:"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

_LUA_HELPERS = """
local P = ARGV[#ARGV]
local function folder(s)
  local i = #s
  while i > 0 and string.byte(s, i) ~= 47 do i = i - 1 end
  return string.sub(s, 1, i)
end
local function close(w, id, now)
  local r = P .. 'route:' .. redis.sha1hex(redis.call('HGET', w, 'route'))
  if redis.call('HGET', r, 'open') == id then redis.call('HDEL', r, 'open') end
  redis.call('HSET', r, 'closed_at', now)
end
"""

# KEYS: due, change, route. ARGV: route, now, now_ms, window_ms, max_items, retention_ms,
# item json, name, event, bytes added, time in microseconds or "", bucket, max buckets,
# leading_after or "", prefix. Returns window id, duplicate, opened, closed_at or "", leading.
_ADD = (
    _LUA_HELPERS
    + """
local due, change, routek = KEYS[1], KEYS[2], KEYS[3]
local route, now_ms, window_ms = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local closed = redis.call('HGET', routek, 'closed_at') or ''
local seen = redis.call('GET', change)
if seen then
  local lead = redis.call('HGET', P .. 'w:' .. redis.sha1hex(seen), 'lead') == change
  return {seen, 1, 0, closed, lead and 1 or 0}
end
local id = redis.call('HGET', routek, 'open')
local opened = 0
if not id then
  local ms = now_ms
  local last = redis.call('HGET', routek, 'last_ms')
  if last and tonumber(last) + 1 > ms then ms = tonumber(last) + 1 end
  local opened_ms = string.format('%d', ms)
  id = route .. ':' .. opened_ms
  local w = P .. 'w:' .. redis.sha1hex(id)
  redis.call('HSET', w, 'id', id, 'route', route, 'opened_ms', opened_ms,
    'due_ms', string.format('%d', ms + window_ms), 'state', 'open', 'max_items', ARGV[5],
    'count', 0, 'bytes', 0, 'prefix', '', 'nbuckets', 0, 'other', 0)
  redis.call('HSET', routek, 'open', id, 'last_ms', opened_ms)
  redis.call('ZADD', due, ms + window_ms, id)
  opened = 1
  local after = ARGV[14]
  if after ~= '' and (closed == '' or tonumber(ARGV[2]) - tonumber(closed) >= tonumber(after)) then
    -- the leading change: sent alone by the caller, not in the window's summary
    redis.call('HSET', w, 'lead', change)
    redis.call('SET', change, id, 'PX', ARGV[6])
    return {id, 0, 1, closed, 1}
  end
end
local w = P .. 'w:' .. redis.sha1hex(id)
local count = tonumber(redis.call('HGET', w, 'count'))
if count < tonumber(redis.call('HGET', w, 'max_items')) then
  redis.call('RPUSH', P .. 'items:' .. redis.sha1hex(id), ARGV[7])
end
local name = ARGV[8]
local prefix = redis.call('HGET', w, 'prefix')
if count == 0 then
  prefix = folder(name)
elseif string.sub(name, 1, #prefix) ~= prefix then
  local n, i = math.min(#prefix, #name), 0
  while i < n and string.byte(prefix, i + 1) == string.byte(name, i + 1) do i = i + 1 end
  prefix = folder(string.sub(prefix, 1, i))
end
redis.call('HSET', w, 'prefix', prefix)
redis.call('HINCRBY', w, 'count', 1)
redis.call('HINCRBY', w, 'c:' .. ARGV[9], 1)
if ARGV[10] ~= '0' then redis.call('HINCRBY', w, 'bytes', ARGV[10]) end
local t = ARGV[11]
if t ~= '' then
  local first = redis.call('HGET', w, 'first_us')
  if not first or tonumber(t) < tonumber(first) then redis.call('HSET', w, 'first_us', t) end
  local last = redis.call('HGET', w, 'last_us')
  if not last or tonumber(t) > tonumber(last) then redis.call('HSET', w, 'last_us', t) end
end
local bucket = 'b:' .. ARGV[12]
if redis.call('HEXISTS', w, bucket) == 0 then
  local known = tonumber(redis.call('HGET', w, 'nbuckets'))
  if known < tonumber(ARGV[13]) then
    redis.call('HSET', w, bucket, known)
    redis.call('HINCRBY', w, 'nbuckets', 1)
  else
    redis.call('HINCRBY', w, 'other', 1)
  end
end
redis.call('SET', change, id, 'PX', ARGV[6])
return {id, 0, opened, closed, 0}
"""
)

# KEYS: window, due. ARGV: id, owner, now, now_ms, lease end ms, prefix.
_CLAIM = (
    _LUA_HELPERS
    + """
local w, due = KEYS[1], KEYS[2]
local state = redis.call('HGET', w, 'state')
if not state or state == 'done' then return 'done' end
if state == 'sending' and tonumber(redis.call('HGET', w, 'lease_ms')) > tonumber(ARGV[4])
    and redis.call('HGET', w, 'owner') ~= ARGV[2] then
  return 'in-flight'
end
if state == 'open' then close(w, ARGV[1], ARGV[3]) end
redis.call('HSET', w, 'state', 'sending', 'owner', ARGV[2], 'lease_ms', ARGV[5])
redis.call('ZADD', due, ARGV[5], ARGV[1])
return 'claimed'
"""
)

# KEYS: window, due, items. ARGV: id, now, retention_ms, prefix.
_COMPLETE = (
    _LUA_HELPERS
    + """
local w, due = KEYS[1], KEYS[2]
local state = redis.call('HGET', w, 'state')
if not state or state == 'done' then return 0 end
if state == 'open' then close(w, ARGV[1], ARGV[2]) end
redis.call('HSET', w, 'state', 'done')
redis.call('HDEL', w, 'owner')
redis.call('ZREM', due, ARGV[1])
redis.call('PEXPIRE', w, ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 1
"""
)

# KEYS: window, due. ARGV: id, owner, now_ms.
_RELEASE = """
local w = KEYS[1]
if redis.call('HGET', w, 'state') == 'sending' and redis.call('HGET', w, 'owner') == ARGV[2] then
  redis.call('HSET', w, 'state', 'released')
  redis.call('HDEL', w, 'owner')
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  return 1
end
return 0
"""


# KEYS: the route's rate. ARGV: now, now + per (the end of a period starting now, both as
# Python's repr, so Lua compares the caller's exact floats), limit, period in whole ms.
_TAKE = """
local k = KEYS[1]
local period = redis.call('HMGET', k, 'end', 'used')
if not period[1] or tonumber(ARGV[1]) >= tonumber(period[1]) then
  redis.call('HSET', k, 'end', ARGV[2], 'used', 1)
  redis.call('PEXPIRE', k, ARGV[4])
  return {1, ARGV[2], 1}
end
local used = tonumber(period[2])
if used < tonumber(ARGV[3]) then
  redis.call('HINCRBY', k, 'used', 1)
  return {1, period[1], used + 1}
end
return {0, period[1], used}
"""


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()  # names keys, as redis.sha1hex does in Lua


def _window_key(window_id: str) -> str:
    return f"{PREFIX}w:{_sha1(window_id)}"


def _items_key(window_id: str) -> str:
    return f"{PREFIX}items:{_sha1(window_id)}"


def _microseconds(value: datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND


def _time(value: bytes | None) -> datetime | None:
    return None if value is None else _EPOCH + int(value) * _MICROSECOND


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisDigestStore:
    def __init__(self, client: Redis, retention_seconds: float = RETENTION_SECONDS) -> None:
        self._redis = client
        self.retention_seconds = retention_seconds
        self._due = PREFIX + "due"
        self._add = client.register_script(_ADD)
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)
        self._take = client.register_script(_TAKE)

    @classmethod
    def from_url(cls, url: str) -> RedisDigestStore:
        return cls(Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5))

    async def add(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None = None,
    ) -> Added:
        finalized = item.event_type is EventType.FINALIZED and item.size is not None
        args: list[str | int] = [
            route,
            repr(now),
            int(now * 1000),
            round(window_seconds * 1000),
            max_items,
            max(1, round(self.retention_seconds * 1000)),
            json.dumps(item.to_json(), ensure_ascii=False, separators=(",", ":")),
            item.name,
            item.event_type.short,
            item.size if finalized and item.size is not None else 0,
            "" if item.time is None else _microseconds(item.time),
            item.bucket,
            MAX_BUCKETS,
            "" if leading_after is None else repr(float(leading_after)),
            PREFIX,
        ]
        keys = [
            self._due,
            f"{PREFIX}change:{change_digest(route, item.change_key).hex()}",
            f"{PREFIX}route:{_sha1(route)}",
        ]
        try:
            window, duplicate, opened, closed, leading = await self._add(keys=keys, args=args)
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error
        return Added(
            _text(window),
            bool(duplicate),
            bool(opened),
            float(closed) if closed else None,
            bool(leading),
        )

    async def take(self, route: str, limit: int, per_seconds: float, now: float) -> Taken:
        check_rate(limit, per_seconds)
        args: list[str | int] = [
            repr(now),
            repr(now + per_seconds),
            limit,
            max(1, math.ceil(per_seconds * 1000)),
        ]
        try:
            allowed, end, used = await self._take(keys=[f"{PREFIX}rate:{_sha1(route)}"], args=args)
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error
        return Taken(bool(allowed), float(end), int(used))

    async def due(self, now: float, limit: int) -> list[str]:
        try:
            ids = await self._redis.zrangebyscore(self._due, "-inf", now * 1000, 0, limit)
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error
        return [_text(window) for window in ids]

    async def claim(self, window_id: str, owner: str, lease_seconds: float, now: float) -> Claim:
        keys = [_window_key(window_id), self._due]
        args = [window_id, owner, repr(now), repr(now * 1000), repr((now + lease_seconds) * 1000)]
        try:
            answer = await self._claim(keys=keys, args=[*args, PREFIX])
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error
        return Claim(_text(answer))

    async def read(self, window_id: str) -> DigestWindow:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(_window_key(window_id))
                pipe.lrange(_items_key(window_id), 0, -1)
                fields, items = await pipe.execute()
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error
        if not fields:
            raise UnknownWindow(window_id)
        record = {_text(k): v for k, v in fields.items()}
        buckets = sorted(
            (int(order), name.removeprefix("b:"))
            for name, order in record.items()
            if name.startswith("b:")
        )
        try:
            summary = DigestSummary(
                max_items=int(record["max_items"]),
                count=int(record["count"]),
                counts={
                    EventType.from_short(name.removeprefix("c:")): int(value)
                    for name, value in record.items()
                    if name.startswith("c:")
                },
                bytes_added=int(record["bytes"]),
                first_time=_time(record.get("first_us")),
                last_time=_time(record.get("last_us")),
                prefix=_text(record["prefix"]),
                buckets=[name for _, name in buckets],
                other_bucket_events=int(record["other"]),
                items=[DigestItem.from_json(json.loads(item)) for item in items],
            )
        except (KeyError, ValueError) as error:
            raise StoreUnavailable(f"redis: window {window_id!r} is damaged: {error}") from error
        return DigestWindow(self._info(record), summary)

    async def complete(self, window_id: str, owner: str, now: float) -> None:
        keys = [_window_key(window_id), self._due, _items_key(window_id)]
        retention_ms = max(1, round(self.retention_seconds * 1000))
        try:
            await self._complete(keys=keys, args=[window_id, repr(now), retention_ms, PREFIX])
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error

    async def release(self, window_id: str, owner: str, now: float) -> None:
        keys = [_window_key(window_id), self._due]
        try:
            await self._release(keys=keys, args=[window_id, owner, repr(now * 1000)])
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error

    async def pending(self, now: float) -> list[WindowInfo]:
        fields = ("id", "route", "opened_ms", "due_ms", "count", "state")
        try:
            ids = await self._redis.zrange(self._due, 0, -1)
            async with self._redis.pipeline(transaction=False) as pipe:
                for window in ids:
                    pipe.hmget(_window_key(_text(window)), fields)
                rows = await pipe.execute()
        except RedisError as error:
            raise StoreUnavailable(f"redis: {type(error).__name__}") from error
        infos = [
            self._info(dict(zip(fields, row, strict=True)))
            for row in rows
            if row[0] is not None  # done between the two reads
        ]
        return sorted((i for i in infos if i.state is not WindowState.DONE), key=_by_due)

    @staticmethod
    def _info(record: dict[str, bytes]) -> WindowInfo:
        return WindowInfo(
            window_id=_text(record["id"]),
            route=_text(record["route"]),
            opened_at=int(record["opened_ms"]) / 1000,
            due_at=int(record["due_ms"]) / 1000,
            events=int(record["count"]),
            state=WindowState(_text(record["state"])),
        )

    async def aclose(self) -> None:
        await self._redis.aclose()


def _by_due(info: WindowInfo) -> tuple[float, str]:
    return (info.due_at, info.window_id)
