"""DigestSummary: a window's changes summed up one by one, equal to the same summary computed from
the whole list at once, bounded in memory however many events arrive, and stored as JSON that
reads back to an equal summary (and keeps adding from there)."""

from __future__ import annotations

import json
import os
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.digests.window import MAX_BUCKETS, DigestItem, DigestSummary, folder
from app.events.models import EventType, StorageEvent, StorageObjectData
from tests.factories import object_data

FINALIZED, DELETED = EventType.FINALIZED, EventType.DELETED
T0 = datetime(2024, 10, 1, 9, 30, tzinfo=UTC)


def item(
    name: str = "reports/q3.csv",
    event_type: EventType = FINALIZED,
    bucket: str = "acme",
    size: int | None = 100,
    time: datetime | None = T0,
    key: str | None = None,
) -> DigestItem:
    return DigestItem(
        change_key=key or f"{event_type.short}:{bucket}:{name}",
        event_type=event_type,
        bucket=bucket,
        name=name,
        size=size,
        time=time,
        content_type="text/csv",
    )


def summarise(items: list[DigestItem], max_items: int = 100) -> DigestSummary:
    summary = DigestSummary.empty(max_items)
    for each in items:
        summary.add(each)
    return summary


def reference(items: list[DigestItem], max_items: int) -> DigestSummary:
    """The same summary computed from the whole list at once, the obvious way."""
    buckets = list(dict.fromkeys(each.bucket for each in items))[:MAX_BUCKETS]
    times = [each.time for each in items if each.time is not None]
    return DigestSummary(
        max_items=max_items,
        count=len(items),
        counts=dict(Counter(each.event_type for each in items)),
        bytes_added=sum(each.size or 0 for each in items if each.event_type is FINALIZED),
        first_time=min(times, default=None),
        last_time=max(times, default=None),
        prefix=folder(os.path.commonprefix([each.name for each in items])),  # noqa: RUF071
        buckets=buckets,
        other_bucket_events=sum(1 for each in items if each.bucket not in buckets),
        items=items[:max_items],
    )


# Names from a small alphabet with many "/" so that windows share folders, and sometimes not.
names = st.text(alphabet="ab/.\u202e<", min_size=1, max_size=12)
times = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)
items = st.builds(
    item,
    name=names,
    event_type=st.sampled_from(EventType),
    bucket=st.sampled_from([f"bucket-{n}" for n in range(MAX_BUCKETS + 5)]) | st.just("acme"),
    size=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
    time=st.none() | times,
    key=st.text(min_size=1, max_size=8),
)


@settings(max_examples=300)
@given(st.lists(items, max_size=60), st.integers(min_value=0, max_value=10))
def test_summary_built_one_by_one_equals_summary_of_the_whole_list(
    window: list[DigestItem], max_items: int
) -> None:
    summary = summarise(window, max_items)
    assert summary == reference(window, max_items)
    assert summary.more == max(0, len(window) - max_items)


@settings(max_examples=300)
@given(st.lists(items, max_size=40), st.integers(min_value=0, max_value=10))
def test_json_reads_back_to_an_equal_summary(window: list[DigestItem], max_items: int) -> None:
    summary = summarise(window, max_items)
    stored = json.dumps(summary.to_json())
    again = DigestSummary.from_json(json.loads(stored))
    assert again == summary
    assert again.to_json() == summary.to_json()


@settings(max_examples=200)
@given(st.lists(items, max_size=40), st.lists(items, max_size=40), st.integers(0, 10))
def test_a_summary_read_back_from_json_keeps_adding_as_if_never_stored(
    before: list[DigestItem], after: list[DigestItem], max_items: int
) -> None:
    stored = json.loads(json.dumps(summarise(before, max_items).to_json()))
    resumed = DigestSummary.from_json(stored)
    for each in after:
        resumed.add(each)
    assert resumed == reference(before + after, max_items)


def test_prefix_names_the_deepest_shared_folder() -> None:
    assert summarise([item("reports/2024/q3.csv")]).prefix == "reports/2024/"
    assert summarise([item("reports/a1.csv"), item("reports/a2.csv")]).prefix == "reports/"
    assert summarise([item("reports/2024/q3.csv"), item("reports/2025/q1.csv")]).prefix == (
        "reports/"
    )
    assert summarise([item("reports/q3.csv"), item("logs/x")]).prefix == ""
    assert summarise([item("q3.csv")]).prefix == ""
    # Characters, not path components: "a//b" and "/a" are names like any other.
    assert summarise([item("a//b/c"), item("a//b/d")]).prefix == "a//b/"
    assert summarise([item("/a/b"), item("a/b")]).prefix == ""
    assert DigestSummary.empty(5).prefix == ""


def test_counts_bytes_and_times() -> None:
    summary = summarise(
        [
            item("r/a", FINALIZED, size=1000, time=T0 + timedelta(seconds=30)),
            item("r/b", FINALIZED, size=None, time=None),
            item("r/c", DELETED, size=5000, time=T0),  # a deletion adds no bytes
            item("r/d", FINALIZED, size=24, time=T0 + timedelta(seconds=10)),
        ]
    )
    assert summary.count == 4
    assert summary.counts == {FINALIZED: 3, DELETED: 1}
    assert summary.bytes_added == 1024
    # Events arrive in any order: the span runs from the earliest to the latest time.
    assert (summary.first_time, summary.last_time) == (T0, T0 + timedelta(seconds=30))


def test_only_the_first_max_items_are_kept_in_arrival_order_and_the_rest_counted() -> None:
    window = [item(f"r/{n}") for n in range(7)]
    summary = summarise(window, max_items=3)
    assert summary.items == window[:3]
    assert (summary.count, summary.more) == (7, 4)
    assert summarise(window, max_items=0).items == []


def test_buckets_past_the_limit_are_only_counted() -> None:
    window = [item(bucket=f"b{n:02}") for n in range(MAX_BUCKETS + 3)] + [item(bucket="b00")]
    summary = summarise(window)
    assert summary.buckets == [f"b{n:02}" for n in range(MAX_BUCKETS)]
    assert summary.other_bucket_events == 3


def test_add_changes_the_summary_in_place_and_returns_it() -> None:
    summary = DigestSummary.empty(5)
    assert summary.add(item()) is summary
    assert summary.count == 1


def test_negative_max_items_is_refused() -> None:
    with pytest.raises(ValueError, match="max_items"):
        DigestSummary.empty(-1)


def storage_event(time: datetime | None, **data: Any) -> StorageEvent:
    return StorageEvent(
        id="evt-1",
        source="//storage.googleapis.com/projects/_/buckets/acme",
        type=DELETED,
        time=time,
        data=StorageObjectData.model_validate(object_data(bucket="acme", name="r/q3.csv", **data)),
    )


def test_item_of_an_event_takes_its_change_key_and_fields_with_the_time_in_utc() -> None:
    paris = timezone(timedelta(hours=2))
    event = storage_event(datetime(2024, 10, 1, 11, 30, 0, 5, tzinfo=paris), size="352")
    made = DigestItem.of(event)
    assert made == DigestItem(
        change_key=event.change_key(),
        event_type=DELETED,
        bucket="acme",
        name="r/q3.csv",
        size=352,
        time=datetime(2024, 10, 1, 9, 30, 0, 5, tzinfo=UTC),
        content_type="text/plain",
    )
    assert made.time is not None
    assert made.time.utcoffset() == timedelta(0)


def test_item_of_an_event_reads_a_naive_time_as_utc_and_keeps_no_time_as_none() -> None:
    assert DigestItem.of(storage_event(datetime(2024, 10, 1, 9, 30))).time == T0
    event = storage_event(None, size=None, contentType=None)
    assert DigestItem.of(event) == DigestItem(
        change_key=event.change_key(),
        event_type=DELETED,
        bucket="acme",
        name="r/q3.csv",
        size=None,
        time=None,
        content_type=None,
    )


def test_json_writes_int64_as_decimal_strings_and_times_as_iso_8601_utc() -> None:
    big = 2**63 - 1
    stored = summarise([item(size=big), item(size=big)], max_items=1).to_json()
    assert stored["bytes_added"] == str(2 * big)  # a sum may pass int64; it stays exact
    assert stored["counts"] == {"finalized": 2}
    assert stored["first_time"] == "2024-10-01T09:30:00Z"
    listed = stored["items"]
    assert isinstance(listed, list)
    assert listed[0]["size"] == str(big)
    assert listed[0]["time"] == "2024-10-01T09:30:00Z"
    assert listed[0]["event"] == "finalized"


def test_json_numbers_are_read_as_well_as_decimal_strings() -> None:
    stored = summarise([item(size=352)]).to_json()
    stored["bytes_added"] = 352
    first = stored["items"]
    assert isinstance(first, list)
    first[0]["size"] = 352
    assert DigestSummary.from_json(stored) == summarise([item(size=352)])


def stored_summary() -> dict[str, Any]:
    stored: dict[str, Any] = json.loads(
        json.dumps(summarise([item("r/a"), item("r/b", DELETED)]).to_json())
    )
    return stored


def broken() -> Iterator[tuple[str, object]]:
    yield "version", {**stored_summary(), "version": 2}
    yield "max_items", {**stored_summary(), "max_items": -1}
    yield "count", {**stored_summary(), "count": True}
    yield "disagree", {**stored_summary(), "count": 3}
    yield "unknown event type", {**stored_summary(), "counts": {"finalized": 1, "moved": 1}}
    yield "bytes_added", {**stored_summary(), "bytes_added": "-5"}
    yield "bytes_added", {**stored_summary(), "bytes_added": 1.5}
    yield "first_time", {**stored_summary(), "first_time": "yesterday"}
    yield "first_time", {**stored_summary(), "first_time": 1727775000}
    yield "prefix", {**stored_summary(), "prefix": None}
    yield "buckets", {**stored_summary(), "buckets": "acme"}
    yield "items", {**stored_summary(), "items": {}}
    yield "counts", {**stored_summary(), "counts": []}
    for key, value in [
        ("size", str(2**63)),
        ("size", "1e3"),
        ("name", ""),
        ("event", "moved"),
        ("content_type", 5),
        ("time", "2024-13-01T00:00:00Z"),
    ]:
        damaged = stored_summary()
        damaged["items"][0][key] = value
        yield key if key != "event" else "unknown event type", damaged
    yield "item", {**stored_summary(), "items": ["r/a"]}
    yield "digest summary", ["not", "an", "object"]


@pytest.mark.parametrize(("named", "damaged"), list(broken()))
def test_damaged_json_is_refused_naming_what_is_wrong(named: str, damaged: object) -> None:
    with pytest.raises(ValueError, match=named):
        DigestSummary.from_json(damaged)


def test_twenty_thousand_events_keep_a_small_summary() -> None:
    """Issue 11: a burst of 20,000 events into one window, listed as 100 objects. The items are
    made while memory is traced, as the store would make them, so those not kept must be freed."""

    def burst() -> Iterator[DigestItem]:
        for n in range(20_000):
            yield item(f"reports/2024/batch-{n:05}.csv", key=f"change-{n}", size=n)

    tracemalloc.start()
    try:
        summary = DigestSummary.empty(100)
        for each in burst():
            summary.add(each)
        kept, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(summary.items) == 100
    assert (summary.count, summary.more) == (20_000, 19_900)
    assert summary.bytes_added == sum(range(20_000))
    assert summary.prefix == "reports/2024/"
    assert kept < 2 * 1024 * 1024, f"summary holds {kept:,} bytes"
