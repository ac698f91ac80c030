"""Issue 18's Firestore row: a digest window of 200,000 events, flushed on the Firestore emulator.

`python -m bench.firestore_window` runs it alone and prints it (`--json`: one line, how `make
bench` reads it; `--events N` for another size). It needs the Google Cloud SDK's Firestore
emulator and Java (tests/firestore_emulator.py finds them); without them it says so and `make
bench` notes the row as skipped.

In a process of its own: a fresh emulator on a free port (its log in the bench's logs), and the
service's own `FirestoreDigestStore` on it. The route `bulk` gathers a 5-minute window listing
100 objects (`digest: {window: 5m, max_items: 100}`). Its first event opens the window through
`add`; the other 199,999 are written straight into the window's shards with the store's own
event documents (`event_reference`, `event_fields`), 500 to a batch, 4 batches at a time, as
tests/stores/test_firestore_windows.py fills its 60,000-event window (an `add` per event would
take an hour on the emulator). They are a bulk upload shaped as that test's: every event type,
sizes, times rising with gaps and out of order by a few milliseconds, some without a time or a
size; after the first 40,000, every 1,000th in a second bucket and another folder, so the
summary's buckets and prefix come from the walk past the first events, not from them alone.
The expected summary is `DigestSummary.add` over the same events in the same order.

Then, timed with perf_counter:
- `pending()` (what GET /digests shows: the window and its 200,000 events, counted by
  aggregations);
- a first read of the still open window: the emulator's JVM compiles its query code during its
  first queries, seconds that an emulator which has served flushes before does not pay; it is
  reported, and the flush below is measured on the warmed emulator;
- one `Digests.flush()` that finds the window due and sends it as the service does: claim (this
  closes the window), the read of its summary at its closing time, render, renew, send to the
  fake SendGrid (its own process, as in the other rows), done. The store's claim and read are
  timed inside it. Its memory: tracemalloc's peak during the flush (started just before it) and
  the peak RSS of the process during it (VmHWM, reset through /proc/self/clear_refs) less the
  RSS before it.

Checked: `pending` counts 200,000, the read's summary equals the expected one (counts, bytes,
times, prefix, buckets, the first 100 items), the fake SendGrid accepted one email, and its text
names the first 100 objects and says "and 199,900 more".
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import systems
from bench.fake import fake_sendgrid_process
from bench.processes import clean_environment

EVENTS = 200_000
MAX_ITEMS = 100
WINDOW_SECONDS = 300.0
ROUTE = "bulk"
FLUSH_TARGET_SECONDS = 10.0
MEMORY_TARGET_MIB = 64.0
BATCH = 500
BATCHES_AT_ONCE = 4
MIB = 1024 * 1024
_START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class WindowFlush:
    events: int
    fill_seconds: float  # writing the events (not measured against a target)
    pending_seconds: float
    pending_events: int  # what pending() counted
    first_read_seconds: float  # the open window, the emulator's first queries
    claim_seconds: float  # the flush's claim, closing the window
    read_seconds: float  # the flush's read of the closed window
    flush_seconds: float  # the whole Digests.flush()
    traced_peak_mib: float  # tracemalloc's peak during the flush
    rss_peak_mib: float  # peak RSS during the flush less the RSS before it
    listed: int  # objects the email names
    more_line: str  # the "and N more" line of its text part
    problems: tuple[str, ...]

    @property
    def expected_more(self) -> str:
        return f"and {self.events - MAX_ITEMS:,} more"

    @property
    def extra_mib(self) -> float:
        return max(self.traced_peak_mib, self.rss_peak_mib)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> WindowFlush:
        return cls(**{**value, "problems": tuple(value["problems"])})


def bulk_event(n: int) -> Any:
    """The n-th event of the bulk upload (see the module doc)."""
    from tests.factories import bulk_item

    return bulk_item(n, _START)


def emulator_missing() -> str | None:
    """Why the Firestore emulator cannot run here, or None."""
    import pytest

    from tests.firestore_emulator import emulator_command

    try:
        emulator_command()
    except (pytest.skip.Exception, pytest.fail.Exception) as outcome:
        return str(outcome).removesuffix("; CI runs these")
    return None


class _Capturing:
    """The SendGrid notifier, keeping each notification it sends for the checks."""

    def __init__(self, notifier: Any) -> None:
        self.notifier = notifier
        self.name = notifier.name
        self.max_recipients = notifier.max_recipients
        self.sent: list[Any] = []

    async def send(self, notification: Any) -> Any:
        receipt = await self.notifier.send(notification)
        self.sent.append(notification)
        return receipt


class _Timed:
    """The Firestore store as the flush uses it, timing its claim and read and keeping what the
    read gave."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.claim_seconds = self.read_seconds = float("nan")
        self.window: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def claim(self, *args: Any) -> Any:
        started = time.perf_counter()
        answer = await self.store.claim(*args)
        self.claim_seconds = time.perf_counter() - started
        return answer

    async def read(self, window_id: str) -> Any:
        started = time.perf_counter()
        self.window = await self.store.read(window_id)
        self.read_seconds = time.perf_counter() - started
        return self.window


async def _fill(store: Any, client: Any, window: str, events: int, expected: Any) -> None:
    """Events 1 .. events - 1 into the window's shards, batch after batch (a few in flight: the
    events of a batch are made when it is), each added to `expected` in arrival order."""
    from app.stores.firestore_windows import event_fields
    from app.stores.windows import change_digest

    base = time.time_ns() // 1000  # after the first event's arrival: they come after it
    expire_at = datetime.now(UTC) + timedelta(days=1)
    slots = asyncio.Semaphore(BATCHES_AT_ONCE)
    writing: list[asyncio.Task[Any]] = []

    async def commit(batch: Any) -> None:
        try:
            await batch.commit()
        finally:
            slots.release()

    for start in range(1, events, BATCH):
        await slots.acquire()
        batch = client.batch()
        for n in range(start, min(start + BATCH, events)):
            event = bulk_event(n)
            expected.add(event)
            key = change_digest(ROUTE, event.change_key).hex()
            batch.create(
                store.event_reference(client, window, key), event_fields(event, base + n, expire_at)
            )
        writing.append(asyncio.create_task(commit(batch)))
    await asyncio.gather(*writing)


def _rss_kib(field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) if found else 0


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def _measure(fake_url: str, api_key: str, events: int, url: str) -> WindowFlush:
    from pydantic import SecretStr

    from app.delivery.digests import Digests
    from app.digests.window import DigestSummary
    from app.notify.sendgrid import SendGridNotifier
    from app.rules.base import DigestRoute
    from app.stores.base import Lease
    from app.stores.firestore import FirestoreClient, FirestoreLocation
    from app.stores.firestore_windows import FirestoreDigestStore

    now = _START.timestamp()
    location = FirestoreLocation.parse(url)
    store = FirestoreDigestStore(location)
    timed = _Timed(store)
    writer = FirestoreClient(location)
    notifier = _Capturing(SendGridNotifier(api_key=SecretStr(api_key), host=fake_url, timeout=30))
    digests = Digests(
        store=timed,  # a DigestStore by delegation (__getattr__)
        notifier=notifier,  # type: ignore[arg-type]  # a Notifier by its shape
        routes={ROUTE: DigestRoute(ROUTE, ("ops@example.com",), WINDOW_SECONDS, MAX_ITEMS)},
        sender=systems.SENDER,
        dead_letters=None,
        lease_seconds=60,
        send_seconds=30,
        clock=lambda: now,
    )
    problems: list[str] = []
    expected = DigestSummary.empty(MAX_ITEMS)
    try:
        started = time.perf_counter()
        first = bulk_event(0)
        expected.add(first)
        window = (await store.add(ROUTE, WINDOW_SECONDS, MAX_ITEMS, first, now)).window_id
        await _fill(store, await writer.get(), window, events, expected)
        fill_seconds = time.perf_counter() - started

        started = time.perf_counter()
        pending = await store.pending(now)
        pending_seconds = time.perf_counter() - started
        pending_events = sum(info.events for info in pending)
        if [info.window_id for info in pending] != [window] or pending_events != events:
            problems.append(f"pending() counted {pending_events:,} events, not {events:,}")

        started = time.perf_counter()
        opened = await store.read(window)
        first_read_seconds = time.perf_counter() - started
        if opened.summary != expected:
            problems.append("the open window's summary differs from its events'")

        now += WINDOW_SECONDS + 1
        gc.collect()
        rss_before = _rss_kib("VmRSS")
        peak_known = _reset_peak_rss()
        tracemalloc.start()
        started = time.perf_counter()
        result = await digests.flush()
        flush_seconds = time.perf_counter() - started
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_peak = (_rss_kib("VmHWM") - rss_before) / 1024 if peak_known else float("nan")
        if (result.flushed, result.pending, result.failed) != (1, 0, 0):
            problems.append(f"the flush answered {result}, not one window sent")
        if timed.window is None or timed.window.summary != expected:
            problems.append("the flush's read differs from the window's events")
        if isinstance(await store.claim(window, 60, now), Lease):
            problems.append("the window was claimable again after the flush")
    finally:
        await writer.aclose()
        await store.aclose()
        session = getattr(notifier.notifier, "_session", None)
        if session is not None:
            await session.close()

    text = notifier.sent[0].text if notifier.sent else ""
    named = re.findall(r"^- \S+ gs://([^/\s]+)/(.+?)(?:,|$)", text, re.M)
    listed = len(named) if named == [(i.bucket, i.name) for i in expected.items] else 0
    if len(notifier.sent) != 1:
        problems.append(f"{len(notifier.sent)} emails sent for one window")
    if listed != MAX_ITEMS:
        problems.append(f"the email does not list exactly the first {MAX_ITEMS} objects")
    more = re.search(r"^and [\d,]+ more$", text, re.M)
    return WindowFlush(
        events=events,
        fill_seconds=fill_seconds,
        pending_seconds=pending_seconds,
        pending_events=pending_events,
        first_read_seconds=first_read_seconds,
        claim_seconds=timed.claim_seconds,
        read_seconds=timed.read_seconds,
        flush_seconds=flush_seconds,
        traced_peak_mib=traced_peak / MIB,
        rss_peak_mib=rss_peak,
        listed=listed,
        more_line=more.group(0) if more else "(none)",
        problems=tuple(problems),
    )


def run(events: int = EVENTS, logs: Path | None = None) -> WindowFlush:
    """The row against an emulator and a fake SendGrid of its own."""
    from tests.firestore_emulator import firestore_emulator_process

    with tempfile.TemporaryDirectory(prefix="bench-firestore-window-") as work:
        folder = logs or Path(work)
        with (
            firestore_emulator_process(folder / "firestore-emulator.log") as host,
            fake_sendgrid_process(folder / "fake-sendgrid-firestore.log") as (fake, api_key),
        ):
            os.environ["FIRESTORE_EMULATOR_HOST"] = host  # the client reads it when it is made
            url = "firestore://bench-project/gcs-notifier?prefix=bench"
            flushed = asyncio.run(_measure(fake.url, api_key, events, url))
            stats = fake.stats()
    problems = list(flushed.problems)
    if stats["accepted"] != 1 or stats["requests"] != 1:
        problems.append(
            f"the fake SendGrid accepted {stats['accepted']} of {stats['requests']} mail "
            "requests, not 1 of 1"
        )
    if flushed.more_line != flushed.expected_more:
        problems.append(f"the email says {flushed.more_line!r}, not {flushed.expected_more!r}")
    return dataclasses.replace(flushed, problems=tuple(problems))


def measure_in_process(logs: Path) -> tuple[WindowFlush | None, str]:
    """`run` in a process of its own (`python -m bench.firestore_window --json`), so neither
    the bench's own memory nor tracemalloc's bookkeeping is in the figures: the row, or None
    and why it was skipped (no emulator here)."""
    argv = [systems.DEV_PYTHON, "-m", "bench.firestore_window", "--json", f"--logs={logs}"]
    env = clean_environment(PYTHONPATH=str(systems.ROOT))
    completed = subprocess.run(
        argv, env=env, cwd=systems.ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the Firestore window failed:\n{completed.stderr.strip()[-2000:]}")
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    if found.get("skipped"):
        print(f"  Firestore window: skipped: {found['skipped']}", flush=True)
        return None, found["skipped"]
    flushed = WindowFlush.from_json(found["window"])
    print(describe(flushed), flush=True)
    return flushed, ""


def describe(flushed: WindowFlush) -> str:
    checks = "OK" if not flushed.problems else "!! " + "; ".join(flushed.problems)
    return (
        f"  Firestore window: {flushed.events:,} events filled in {flushed.fill_seconds:.1f} s, "
        f"pending {flushed.pending_seconds:.2f} s, first read {flushed.first_read_seconds:.2f} "
        f"s; the flush {flushed.flush_seconds:.2f} s (claim {flushed.claim_seconds:.2f} s, "
        f"read {flushed.read_seconds:.2f} s), traced peak {flushed.traced_peak_mib:.2f} MiB, "
        f"peak RSS +{flushed.rss_peak_mib:.1f} MiB, {flushed.listed} objects listed, "
        f"{flushed.more_line!r}  {checks}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.firestore_window",
        description="A digest window of 200,000 events flushed on the Firestore emulator",
    )
    parser.add_argument("--events", type=int, default=EVENTS)
    parser.add_argument("--json", action="store_true", help="one JSON line, for bench.run")
    parser.add_argument("--logs", type=Path, help="where the emulator's and the fake's logs go")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")  # as `python -m app` does
    missing = emulator_missing()
    if missing is not None:
        print(json.dumps({"skipped": missing}) if args.json else f"skipped: {missing}")
        return 0
    flushed = run(args.events, args.logs)
    if args.json:
        print(json.dumps({"window": flushed.to_json()}))
    else:
        print(describe(flushed).strip())
    return 1 if flushed.problems else 0


if __name__ == "__main__":
    sys.exit(main())
