"""Digest windows and rate periods in Redis, shared by every instance (Memorystore).

Keys (under `gcs-notifier:digest:`; ids and routes are hashed into key names, as object names
may be long and odd):
- `route:<sha1(route)>`: hash with `open` (the route's OPEN window id), `last_ms` (start of its
  latest window) and `closed_at` (when its previous window was closed);
- `w:<sha1(window id)>`: hash with the window's state, times and counters, `token` (its latest
  claim's), `lease_ms` (when that claim's lease ends) and, once done, `done_by` (the token that
  completed it while holding it; absent when another did). A window of the previous version
  names an `owner` instead of a token: it reads as held by no token, and the next claim or
  completion drops the field;
- `items:<sha1(window id)>`: list of the first `max_items` items as DigestItem JSON;
- `due`: sorted set of every window not yet done, scored by when `due` should list it (due
  time, lease end, or release time), in milliseconds;
- `change:<hex>`: the window a change joined, expiring after the retention; a window that a
  leading change opened names that change's key in its hash (`lead`);
- `rate:<sha1(route)>`: hash with `end` (when the route's current period ends, as the seconds
  `repr` the caller's clock gave) and `used`, expiring when the period ends;
- `takers:<sha1(route)>`: set of the change digests that took an email of that period, expiring
  with it, and emptied when the route's next period starts.

`add`, `overflow`, `claim`, `renew`, `complete`, `release` and `take` are Lua scripts, atomic in
Redis: two instances cannot both open a route's window, nor both claim one, nor take a period's
last email. A window's key is derived inside the scripts (with `redis.sha1hex`) from ids the
scripts read, and `overflow` writes the claims store's keys beside the digest's, so this needs a
standalone Redis (Memorystore basic or standard tier), not Redis Cluster.

A window claim's token is `max(the window's last token + 1, the caller's now in microseconds)`,
as app.stores.base gives it; a window's record outlives every claim of it (a done one is purged
after the retention, and an unknown window is never claimed again), so its last token is always
at hand. Microseconds since the epoch stay below 2^53 (Lua's numbers are doubles) until the
year 2255; the scripts format tokens as decimal strings, so Python gets them exactly.

`overflow` joins the event as `add` does (the same Lua function) and sets the done marks of its
email keys in the claims' keyspace (app.stores.redis_claims names them and their value) in the
same script. Redis does not roll a script back when it fails midway, so the join reads and
checks everything first, and a script fails before its first write or not at all (see
`_OVERFLOW`).

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
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.digests.window import MAX_BUCKETS, DigestItem, DigestSummary
from app.events.models import EventType
from app.stores.base import Claim, Lease, StoreUnavailable
from app.stores.redis_claims import DONE_BY_NOBODY, milliseconds, redis_key
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

# Joins one event to its route's window, as `add` and `overflow` both do. It reads and checks
# everything it relies on first (key types, the counters it increments or compares), so an error
# it raises comes before its first write.
# KEYS: due, change, route. ARGV: route, now, now_ms, window_ms, max_items, retention_ms,
# item json, name, event, bytes added, time in microseconds or "", bucket, max buckets,
# leading_after or "", ..., prefix (last). Returns window id, duplicate, opened, closed_at or
# "", leading.
_JOIN = """
local function expect(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found ~= 'none' and found ~= kind then
    error('gcs-notifier: ' .. key .. ' is a ' .. found .. ', not a ' .. kind)
  end
end
local function integer(value, field)
  if not value or not string.match(value, '^-?%d+$') then
    error('gcs-notifier: damaged record, ' .. field .. ' is not an integer')
  end
  return tonumber(value)
end
local function join()
  local due, change, routek = KEYS[1], KEYS[2], KEYS[3]
  local route, now_ms, window_ms = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
  expect(due, 'zset')  -- HMGET and GET below fail on a key of another type themselves
  local r = redis.call('HMGET', routek, 'closed_at', 'open', 'last_ms')
  local closed, id = r[1] or '', r[2]
  local seen = redis.call('GET', change)
  if seen then
    local lead = redis.call('HGET', P .. 'w:' .. redis.sha1hex(seen), 'lead') == change
    return {seen, 1, 0, closed, lead and 1 or 0}
  end
  local opened, ms, leading = 0, 0, false
  if not id then
    opened, ms = 1, now_ms
    if r[3] and integer(r[3], 'last_ms') + 1 > ms then ms = tonumber(r[3]) + 1 end
    id = route .. ':' .. string.format('%d', ms)
    local after = ARGV[14]
    if after ~= '' then
      local since = closed ~= '' and tonumber(closed)
      if closed ~= '' and not since then error('gcs-notifier: damaged record, closed_at') end
      -- the leading change: sent alone by the caller, not in the window's summary
      leading = not since or tonumber(ARGV[2]) - since >= tonumber(after)
    end
  end
  local w, items = P .. 'w:' .. redis.sha1hex(id), P .. 'items:' .. redis.sha1hex(id)
  expect(items, 'list')
  local f = redis.call('HMGET', w, 'count', 'max_items', 'prefix', 'bytes', 'nbuckets', 'other',
    'c:' .. ARGV[9], 'first_us', 'last_us', 'b:' .. ARGV[12])
  if opened == 1 then f[1], f[2], f[3], f[4], f[5], f[6] = '0', ARGV[5], '', '0', '0', '0' end
  local count, max_items = integer(f[1], 'count'), integer(f[2], 'max_items')
  local prefix, nbuckets = f[3], integer(f[5], 'nbuckets')
  if not prefix then error('gcs-notifier: damaged record, no prefix') end
  integer(f[4], 'bytes')
  integer(f[6], 'other')
  if f[7] then integer(f[7], 'c:' .. ARGV[9]) end
  local first = f[8] and integer(f[8], 'first_us')
  local last = f[9] and integer(f[9], 'last_us')
  -- Checked: the writes follow.
  if opened == 1 then
    local opened_ms = string.format('%d', ms)
    redis.call('HSET', w, 'id', id, 'route', route, 'opened_ms', opened_ms,
      'due_ms', string.format('%d', ms + window_ms), 'state', 'open', 'max_items', ARGV[5],
      'count', 0, 'bytes', 0, 'prefix', '', 'nbuckets', 0, 'other', 0)
    redis.call('HSET', routek, 'open', id, 'last_ms', opened_ms)
    redis.call('ZADD', due, ms + window_ms, id)
    if leading then
      redis.call('HSET', w, 'lead', change)
      redis.call('SET', change, id, 'PX', ARGV[6])
      return {id, 0, 1, closed, 1}
    end
  end
  if count < max_items then redis.call('RPUSH', items, ARGV[7]) end
  local name = ARGV[8]
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
    if not first or tonumber(t) < first then redis.call('HSET', w, 'first_us', t) end
    if not last or tonumber(t) > last then redis.call('HSET', w, 'last_us', t) end
  end
  if not f[10] then
    if nbuckets < tonumber(ARGV[13]) then
      redis.call('HSET', w, 'b:' .. ARGV[12], nbuckets)
      redis.call('HINCRBY', w, 'nbuckets', 1)
    else
      redis.call('HINCRBY', w, 'other', 1)
    end
  end
  redis.call('SET', change, id, 'PX', ARGV[6])
  return {id, 0, opened, closed, 0}
end
"""

_ADD = _LUA_HELPERS + _JOIN + "return join()\n"

# KEYS: as `join`, then the claims' records of the done keys. ARGV: as `join` (leading_after
# ""), then the done mark, the retention in ms, and the prefix.
#
# Why the order is all or nothing: Redis does not undo a script's writes when it fails midway,
# so nothing may fail after the first write. What refuses writes refuses the first one: Redis
# checks maxmemory only until a script has written (scriptVerifyOOM in Redis's script.c, "only
# if this is the first write in the context of this script, otherwise we'd break atomicity";
# https://redis.io/docs/latest/develop/reference/errors/common/oom/), and a failed disk save or
# a read-only replica stays so for the whole script. `join` checks what its own writes could
# trip on (key types, damaged counters) before it writes. SET replaces a value of any type, and
# its PX is a positive whole number of milliseconds from Python, so the done marks cannot fail
# once the join has written. They come second all the same: were one to fail, the event would
# be in the digest and emailed again at worst, never lost from both.
_OVERFLOW = (
    _LUA_HELPERS
    + _JOIN
    + """
local added = join()
for i = 4, #KEYS do redis.call('SET', KEYS[i], ARGV[15], 'PX', ARGV[16]) end
return added
"""
)

# KEYS: window, due. ARGV: id, now, now_ms, lease end ms, now in microseconds, prefix. Returns
# 'done', 'in-flight' or the new token.
_CLAIM = (
    _LUA_HELPERS
    + """
local w, due = KEYS[1], KEYS[2]
local f = redis.call('HMGET', w, 'state', 'lease_ms', 'token')
local state = f[1]
if not state or state == 'done' then return 'done' end
if state == 'sending' and (tonumber(f[2]) or 0) > tonumber(ARGV[3]) then return 'in-flight' end
if state == 'open' then close(w, ARGV[1], ARGV[2]) end
local token, last = tonumber(ARGV[5]), tonumber(f[3] or '0') or 0
if last + 1 > token then token = last + 1 end
token = string.format('%d', token)
redis.call('HSET', w, 'state', 'sending', 'token', token, 'lease_ms', ARGV[4])
redis.call('HDEL', w, 'owner')
redis.call('ZADD', due, ARGV[4], ARGV[1])
return token
"""
)

# KEYS: window, due. ARGV: id, token, now_ms, lease end ms. Returns 1 when renewed.
_RENEW = """
local f = redis.call('HMGET', KEYS[1], 'state', 'token', 'lease_ms')
if f[1] ~= 'sending' or f[2] ~= ARGV[2] or (tonumber(f[3]) or 0) <= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_ms', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
"""

# KEYS: window, due, items. ARGV: id, now, retention_ms, token, prefix. Returns 1 when the token
# held the window (or had completed it while holding it: a retry), 0 otherwise.
_COMPLETE = (
    _LUA_HELPERS
    + """
local w, due = KEYS[1], KEYS[2]
local f = redis.call('HMGET', w, 'state', 'token', 'done_by')
local state = f[1]
if not state then return 0 end
if state == 'done' then return f[3] == ARGV[4] and 1 or 0 end
if state == 'open' then close(w, ARGV[1], ARGV[2]) end
local held = f[2] == ARGV[4]
redis.call('HSET', w, 'state', 'done')
if held then redis.call('HSET', w, 'done_by', ARGV[4]) end
redis.call('HDEL', w, 'owner')
redis.call('ZREM', due, ARGV[1])
redis.call('PEXPIRE', w, ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return held and 1 or 0
"""
)

# KEYS: window, due. ARGV: id, token, now_ms.
_RELEASE = """
local f = redis.call('HMGET', KEYS[1], 'state', 'token')
if f[1] == 'sending' and f[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'state', 'released')
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  return 1
end
return 0
"""

# KEYS: the route's period, its takers. ARGV: now, now + per (the end of a period starting now,
# both as Python's repr, so Lua compares the caller's exact floats), limit, period in whole ms,
# the change's digest. Returns allowed, the period's end, used, again.
_TAKE = """
local k, takers, taker = KEYS[1], KEYS[2], ARGV[5]
local period = redis.call('HMGET', k, 'end', 'used')
if not period[1] or tonumber(ARGV[1]) >= tonumber(period[1]) then
  redis.call('HSET', k, 'end', ARGV[2], 'used', 1)
  redis.call('PEXPIRE', k, ARGV[4])
  redis.call('DEL', takers)
  redis.call('SADD', takers, taker)
  redis.call('PEXPIRE', takers, ARGV[4])
  return {1, ARGV[2], 1, 0}
end
local used = tonumber(period[2])
if redis.call('SISMEMBER', takers, taker) == 1 then return {1, period[1], used, 1} end
if used < tonumber(ARGV[3]) then
  redis.call('HINCRBY', k, 'used', 1)
  redis.call('SADD', takers, taker)
  -- A period the previous version started has no takers set: give it the period's expiry.
  if redis.call('PTTL', takers) == -1 then
    local ttl = redis.call('PTTL', k)
    if ttl > 0 then redis.call('PEXPIRE', takers, ttl) end
  end
  return {1, period[1], used + 1, 0}
end
return {0, period[1], used, 0}
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


def _unavailable(error: RedisError) -> StoreUnavailable:
    return StoreUnavailable(f"redis: {type(error).__name__}")


class RedisDigestStore:
    def __init__(self, client: Redis, retention_seconds: float = RETENTION_SECONDS) -> None:
        self._redis = client
        self.retention_seconds = retention_seconds
        self._due = PREFIX + "due"
        self._add = client.register_script(_ADD)
        self._overflow = client.register_script(_OVERFLOW)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)
        self._take = client.register_script(_TAKE)

    @classmethod
    def from_url(cls, url: str, retention_seconds: float = RETENTION_SECONDS) -> RedisDigestStore:
        client = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        return cls(client, retention_seconds)

    async def add(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None = None,
    ) -> Added:
        keys, args = self._join(route, window_seconds, max_items, item, now, leading_after)
        try:
            reply = await self._add(keys=keys, args=[*args, PREFIX])
        except RedisError as error:
            raise _unavailable(error) from error
        return _added(reply)

    async def overflow(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        done_keys: Sequence[str],
    ) -> Added:
        keys, args = self._join(route, window_seconds, max_items, item, now, None)
        # Done marks as RedisStore.complete writes them, expiring by the server's clock as its
        # do, with no completing token.
        done = [milliseconds(self.retention_seconds)]
        try:
            reply = await self._overflow(
                keys=[*keys, *(redis_key(key) for key in done_keys)],
                args=[*args, DONE_BY_NOBODY, *done, PREFIX],
            )
        except RedisError as error:
            raise _unavailable(error) from error
        return _added(reply)

    def _join(
        self,
        route: str,
        window_seconds: float,
        max_items: int,
        item: DigestItem,
        now: float,
        leading_after: float | None,
    ) -> tuple[list[str], list[str | int]]:
        """The keys and arguments of the Lua `join` (without the trailing prefix)."""
        finalized = item.event_type is EventType.FINALIZED and item.size is not None
        args: list[str | int] = [
            route,
            repr(now),
            int(now * 1000),
            round(window_seconds * 1000),
            max_items,
            milliseconds(self.retention_seconds),
            json.dumps(item.to_json(), ensure_ascii=False, separators=(",", ":")),
            item.name,
            item.event_type.short,
            item.size if finalized and item.size is not None else 0,
            "" if item.time is None else _microseconds(item.time),
            item.bucket,
            MAX_BUCKETS,
            "" if leading_after is None else repr(float(leading_after)),
        ]
        keys = [
            self._due,
            f"{PREFIX}change:{change_digest(route, item.change_key).hex()}",
            f"{PREFIX}route:{_sha1(route)}",
        ]
        return keys, args

    async def take(
        self, route: str, change_key: str, limit: int, per_seconds: float, now: float
    ) -> Taken:
        check_rate(limit, per_seconds)
        keys = [f"{PREFIX}rate:{_sha1(route)}", f"{PREFIX}takers:{_sha1(route)}"]
        args: list[str | int | bytes] = [
            repr(now),
            repr(now + per_seconds),
            limit,
            milliseconds(per_seconds),
            change_digest(route, change_key),
        ]
        try:
            allowed, end, used, again = await self._take(keys=keys, args=args)
        except RedisError as error:
            raise _unavailable(error) from error
        return Taken(bool(allowed), float(end), int(used), bool(again))

    async def due(self, now: float, limit: int) -> list[str]:
        try:
            ids = await self._redis.zrangebyscore(self._due, "-inf", now * 1000, 0, limit)
        except RedisError as error:
            raise _unavailable(error) from error
        return [_text(window) for window in ids]

    async def claim(self, window_id: str, lease_seconds: float, now: float) -> Lease | Claim:
        keys = [_window_key(window_id), self._due]
        expires = now + lease_seconds
        args: list[str | int] = [
            window_id,
            repr(now),
            repr(now * 1000),
            repr(expires * 1000),
            int(now * 1_000_000),  # as base.next_token stamps it
            PREFIX,
        ]
        try:
            answer = _text(await self._claim(keys=keys, args=args))
        except RedisError as error:
            raise _unavailable(error) from error
        if answer in (Claim.DONE, Claim.IN_FLIGHT):
            return Claim(answer)
        return Lease(int(answer), expires)

    async def renew(
        self, window_id: str, token: int, lease_seconds: float, now: float
    ) -> Lease | None:
        keys = [_window_key(window_id), self._due]
        expires = now + lease_seconds
        args = [window_id, str(token), repr(now * 1000), repr(expires * 1000)]
        try:
            renewed = await self._renew(keys=keys, args=args)
        except RedisError as error:
            raise _unavailable(error) from error
        return Lease(token, expires) if renewed else None

    async def read(self, window_id: str) -> DigestWindow:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(_window_key(window_id))
                pipe.lrange(_items_key(window_id), 0, -1)
                fields, items = await pipe.execute()
        except RedisError as error:
            raise _unavailable(error) from error
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

    async def complete(self, window_id: str, token: int, now: float) -> bool:
        keys = [_window_key(window_id), self._due, _items_key(window_id)]
        retention_ms = milliseconds(self.retention_seconds)
        args: list[str | int] = [window_id, repr(now), retention_ms, str(token), PREFIX]
        try:
            held = await self._complete(keys=keys, args=args)
        except RedisError as error:
            raise _unavailable(error) from error
        return bool(held)

    async def release(self, window_id: str, token: int, now: float) -> None:
        keys = [_window_key(window_id), self._due]
        try:
            await self._release(keys=keys, args=[window_id, str(token), repr(now * 1000)])
        except RedisError as error:
            raise _unavailable(error) from error

    async def pending(self, now: float) -> list[WindowInfo]:
        fields = ("id", "route", "opened_ms", "due_ms", "count", "state")
        try:
            ids = await self._redis.zrange(self._due, 0, -1)
            async with self._redis.pipeline(transaction=False) as pipe:
                for window in ids:
                    pipe.hmget(_window_key(_text(window)), fields)
                rows = await pipe.execute()
        except RedisError as error:
            raise _unavailable(error) from error
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


def _added(reply: list[object]) -> Added:
    window, duplicate, opened, closed, leading = reply
    return Added(
        _text(window),
        bool(duplicate),
        bool(opened),
        float(_text(closed)) if closed else None,
        bool(leading),
    )


def _by_due(info: WindowInfo) -> tuple[float, str]:
    return (info.due_at, info.window_id)
