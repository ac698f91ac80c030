"""One digest window's changes, summed up as they arrive. Pure: no I/O, no settings.

Used by the digest flush, issue 11 (not wired into the service yet): the digest store keeps one
`DigestSummary` per pending window, adds each event that joins it, persists it with `to_json`, and
the flush renders it (app.digests.render). Deduplicating the same change delivered twice is the
store's job (by `DigestItem.change_key`), not this module's.

A summary's size does not grow with the number of events: it keeps counts, sums and a common
prefix, the first `max_items` items in arrival order, and at most MAX_BUCKETS bucket names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Self

from app.events.models import EventType, StorageEvent

# A window belongs to one route, and a route rarely watches more than a few buckets; past this
# many, the others' events are only counted (`other_bucket_events`), so memory stays bounded.
MAX_BUCKETS = 20
JSON_VERSION = 1


@dataclass(frozen=True, slots=True)
class DigestItem:
    """What a digest tells about one change. `time` is the event's time in UTC, when it has one."""

    change_key: str
    event_type: EventType
    bucket: str
    name: str
    size: int | None
    time: datetime | None
    content_type: str | None

    @classmethod
    def of(cls, event: StorageEvent) -> DigestItem:
        data = event.data
        return cls(
            change_key=event.change_key(),
            event_type=event.type,
            bucket=data.bucket,
            name=data.name,
            size=data.size,
            time=utc(event.time),
            content_type=data.content_type,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "change_key": self.change_key,
            "event": self.event_type.short,
            "bucket": self.bucket,
            "name": self.name,
            "size": _int64_out(self.size),
            "time": iso(self.time),
            "content_type": self.content_type,
        }

    @classmethod
    def from_json(cls, value: object) -> DigestItem:
        item = _object(value, "item")
        return cls(
            change_key=_str(item, "change_key"),
            event_type=_event_type(item),
            bucket=_str(item, "bucket"),
            name=_str(item, "name"),
            size=_int64_in(item, "size", optional=True),
            time=_time(item, "time"),
            content_type=_optional_str(item, "content_type"),
        )


@dataclass(slots=True)
class DigestSummary:
    """The aggregate of one window. Mutable: `add` changes the summary in place (and returns it),
    because a new value per event would copy up to `max_items` items each time.

    - `counts`: events per type (types never seen have no key);
    - `bytes_added`: the sum of the sizes of finalized events (an upload without a size adds 0);
    - `first_time` / `last_time`: the earliest and latest event times (events arrive in any order;
      events without a time are left out);
    - `prefix`: the longest common prefix of all object names, cut back after its last "/" so it
      names a folder ("" when the names share no folder), whatever their buckets;
    - `buckets`: the first MAX_BUCKETS distinct buckets in order of first appearance;
      `other_bucket_events` counts the events in any other bucket;
    - `items`: the first `max_items` items in arrival order; `more` counts the rest.
    """

    max_items: int
    count: int = 0
    counts: dict[EventType, int] = field(default_factory=dict)
    bytes_added: int = 0
    first_time: datetime | None = None
    last_time: datetime | None = None
    prefix: str = ""
    buckets: list[str] = field(default_factory=list)
    other_bucket_events: int = 0
    items: list[DigestItem] = field(default_factory=list)

    @classmethod
    def empty(cls, max_items: int) -> DigestSummary:
        if max_items < 0:
            raise ValueError(f"max_items must be 0 or more, not {max_items}")
        return cls(max_items=max_items)

    @property
    def more(self) -> int:
        """Events counted but not listed."""
        return self.count - len(self.items)

    def add(self, item: DigestItem) -> Self:
        """Adds one change in O(1), plus O(len(name)) for the prefix."""
        if self.count == 0:
            self.prefix = folder(item.name)
        elif not item.name.startswith(self.prefix):
            # The kept prefix is already a folder; cutting the shorter common prefix back to a
            # folder gives what cutting the common prefix of every name would. Characters, not
            # path components: commonpath would normalise "a//b" and refuse "/a" beside "a".
            common = os.path.commonprefix((self.prefix, item.name))  # noqa: RUF071
            self.prefix = folder(common)
        self.count += 1
        self.counts[item.event_type] = self.counts.get(item.event_type, 0) + 1
        if item.event_type is EventType.FINALIZED and item.size is not None:
            self.bytes_added += item.size
        if item.time is not None:
            if self.first_time is None or item.time < self.first_time:
                self.first_time = item.time
            if self.last_time is None or item.time > self.last_time:
                self.last_time = item.time
        if item.bucket not in self.buckets:  # at most MAX_BUCKETS comparisons
            if len(self.buckets) < MAX_BUCKETS:
                self.buckets.append(item.bucket)
            else:
                self.other_bucket_events += 1
        if len(self.items) < self.max_items:
            self.items.append(item)
        return self

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict; `from_json` reads it back to an equal summary. Sizes and the byte
        total are decimal strings, as proto3 JSON writes int64: a reader that keeps JSON numbers
        as doubles (JavaScript, Lua's cjson in Redis) would round them past 2**53."""
        return {
            "version": JSON_VERSION,
            "max_items": self.max_items,
            "count": self.count,
            "counts": {kind.short: self.counts[kind] for kind in EventType if kind in self.counts},
            "bytes_added": str(self.bytes_added),
            "first_time": iso(self.first_time),
            "last_time": iso(self.last_time),
            "prefix": self.prefix,
            "buckets": list(self.buckets),
            "other_bucket_events": self.other_bucket_events,
            "items": [item.to_json() for item in self.items],
        }

    @classmethod
    def from_json(cls, value: object) -> DigestSummary:
        """The summary `to_json` wrote, or ValueError naming what is wrong."""
        summary = _object(value, "digest summary")
        if summary.get("version") != JSON_VERSION:
            raise ValueError(f"digest summary: unknown version {summary.get('version')!r}")
        counts = _object(summary.get("counts"), "counts")
        items = summary.get("items")
        buckets = summary.get("buckets")
        if not isinstance(items, list):
            raise ValueError("digest summary: items must be a list")
        if not isinstance(buckets, list) or not all(isinstance(b, str) for b in buckets):
            raise ValueError("digest summary: buckets must be a list of strings")
        result = cls(
            max_items=_count(summary, "max_items"),
            count=_count(summary, "count"),
            counts={_short_type(short): _count(counts, short) for short in counts},
            bytes_added=_int64_in(summary, "bytes_added", optional=False, limit=None) or 0,
            first_time=_time(summary, "first_time"),
            last_time=_time(summary, "last_time"),
            prefix=_str(summary, "prefix", allow_empty=True),
            buckets=list(buckets),
            other_bucket_events=_count(summary, "other_bucket_events"),
            items=[DigestItem.from_json(item) for item in items],
        )
        if sum(result.counts.values()) != result.count or len(result.items) > min(
            result.count, result.max_items
        ):
            raise ValueError("digest summary: count, counts and items disagree")
        return result


def folder(name: str) -> str:
    """`reports/2024/q3.csv` -> `reports/2024/`; a name without "/" -> ""."""
    return name[: name.rfind("/") + 1]


def utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:  # CloudEvents times are RFC 3339 with an offset; naive means UTC
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a `Z`, microseconds kept: `2024-10-01T09:30:00.123000Z`."""
    return None if value is None else value.isoformat().replace("+00:00", "Z")


# --- reading JSON back: every field checked, so a damaged row fails loudly, not later --------

_INT64_MAX = 2**63 - 1


def _object(value: object, what: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"digest summary: {what} must be an object")
    return value


def _str(value: Mapping[str, object], key: str, *, allow_empty: bool = False) -> str:
    text = value.get(key)
    if not isinstance(text, str) or not (text or allow_empty):
        raise ValueError(f"digest summary: {key} must be a non-empty string")
    return text


def _optional_str(value: Mapping[str, object], key: str) -> str | None:
    text = value.get(key)
    if text is not None and not isinstance(text, str):
        raise ValueError(f"digest summary: {key} must be a string or null")
    return text


def _count(value: Mapping[str, object], key: str) -> int:
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"digest summary: {key} must be a whole number, 0 or more")
    return number


def _int64_out(value: int | None) -> str | None:
    return None if value is None else str(value)


def _int64_in(
    value: Mapping[str, object], key: str, *, optional: bool, limit: int | None = _INT64_MAX
) -> int | None:
    """A decimal string (as written) or a JSON integer, 0 or more, at most `limit`."""
    raw = value.get(key)
    if raw is None and optional:
        return None
    if isinstance(raw, str) and raw.isascii() and raw.isdigit():
        number = int(raw)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        number = raw
    else:
        raise ValueError(f"digest summary: {key} must be a whole number")
    if number < 0 or (limit is not None and number > limit):
        raise ValueError(f"digest summary: {key} is out of range")
    return number


def _time(value: Mapping[str, object], key: str) -> datetime | None:
    raw = value.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError(f"digest summary: {key} must be an ISO 8601 time or null")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"digest summary: {key} must be an ISO 8601 time or null") from None
    return utc(parsed)


def _short_type(short: str) -> EventType:
    try:
        return EventType.from_short(short)
    except ValueError:
        raise ValueError(f"digest summary: unknown event type {short!r}") from None


def _event_type(item: Mapping[str, object]) -> EventType:
    return _short_type(_str(item, "event"))
