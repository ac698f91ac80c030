"""Issue 11's digest rows: the event load on a digest route, and one burst flushed as one email.

**Joining costs no more than an immediate email.** The service is started with a rules file of
one route, the route of the 1-route run (bench/rules_file.py) plus `digest: {window: 1h}`, so
no window closes during the run; wrk loads it exactly as the other event runs (bench/events.lua,
concurrency 80, a warm-up then the measured run, the default SQLite store in a fresh working
directory, the fake SendGrid at 0 ms). Every 2xx answer must stand for an event in the store:
`GET /digests` counts the window's events before and after each run (at least one per 2xx
answer, at most 80 more for the requests wrk left in flight), and the fake must get no mail.

**A burst flushed as one email** (`python -m bench.digests` runs it alone and prints it;
`--json` is how `make bench` reads it): in process, `Digests` with the SQLite digest store in a
temporary file, the SendGrid notifier and a clock the bench moves. 20,000 events join one
window of a `digest: {window: 5m}` route (one `Digests.join` at a time, as the pipeline awaits
each; the join rate is reported), the clock moves past the window's end, and ONE flush sends it
to the fake SendGrid (its own process, as in every other run). Before the measured bursts a
5-event window is joined and flushed, so the imports and the HTTP session of a service that has
already run are in place. Two bursts, each into its own route's window:

- the first is timed (perf_counter around `Digests.flush`), and its memory read as the peak RSS
  of the process during the flush (`VmHWM` reset through /proc/self/clear_refs just before) less
  the RSS before it: what the flush costs the OS, SQLite's page cache and aiohttp included. It
  can understate, since the flush may reuse memory the join loop freed;
- the second runs the same flush under tracemalloc, started just before the flush: the peak of
  the Python memory allocated during the flush and not freed by then. Every allocation counts,
  reused memory or not, which makes it the figure the target is checked against; tracemalloc
  slows that flush, so its time is not reported.

**The store work per event**, in the same process, beside it: what the pipeline asks of the
SQLite stores for one event of a 1-recipient route, timed over 20,000 events in 10 alternating
rounds of 2,000 (median round): the immediate email's claim and done mark
(`SqliteStore.claim` + `complete`; the SendGrid request between them is left out) against a
digest route's `Digests.join` (the event's DigestItem and `SqliteDigestStore.add`).

The email is checked as it was handed to the notifier and as the fake accepted it: one email
per burst, its text listing the first 100 objects and no other, its HTML part 100 rows, and
"and 19,900 more".
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import systems, wrk
from bench.fake import FakeSendGrid, fake_sendgrid_process, request
from bench.measure import EventSeries, LoadRun, Plan, progress
from bench.processes import Server, clean_environment

ROUTE = "reports"  # the route bench/rules_file.py's events match
WINDOW = "1h"  # longer than the runs: nothing flushes while wrk loads
BURST_EVENTS = 20_000
BURST_MAX_ITEMS = 100
BURST_WINDOW_SECONDS = 300.0
FLUSH_TARGET_SECONDS = 2.0
MEMORY_TARGET_MIB = 20.0
SETTLE_QUIET_SECONDS = 0.5
SETTLE_TIMEOUT = 30.0
MIB = 1024 * 1024


# --- the event load ---------------------------------------------------------------------------


def held_events(port: int) -> int:
    """Events in the route's pending windows (`GET /digests`; EVENT_AUTH is off in the bench)."""
    status, body = request(port, "GET", "/digests", timeout=10)
    if status != 200:
        raise RuntimeError(f"GET /digests answered {status}")
    windows: list[dict[str, Any]] = json.loads(body)["windows"]
    return sum(int(window["events"]) for window in windows if window["route"] == ROUTE)


def settle_held(port: int) -> int:
    """The count once the server has finished what wrk left in flight (unchanged for 0.5 s)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last, since = held_events(port), time.monotonic()
    while time.monotonic() - since < SETTLE_QUIET_SECONDS and time.monotonic() < deadline:
        time.sleep(0.1)
        count = held_events(port)
        if count != last:
            last, since = count, time.monotonic()
    return last


def load_digested(
    server: Server, fake: FakeSendGrid, wrk_path: str, label: str, seconds: float
) -> LoadRun:
    """wrk's events against a digest route; valid when every 2xx answer is an event in the
    store and no mail was sent."""
    fake.reset()
    before = held_events(server.port)
    cpu_before = server.cpu_seconds()
    result = wrk.run(wrk_path, f"http://127.0.0.1:{server.port}", seconds, events=True)
    joined = settle_held(server.port) - before
    cpu = server.cpu_seconds() - cpu_before
    mails = fake.stats()["requests"]
    problems = list(result.problems)
    if mails:
        problems.append(f"{mails} mail requests reached the fake SendGrid (expected none)")
    if joined < result.succeeded:
        problems.append(
            f"MISMATCH: {result.succeeded} events answered 2xx but only {joined} joined the window"
        )
    elif joined - result.succeeded > wrk.CONNECTIONS:
        problems.append(
            f"MISMATCH: {joined} events joined for {result.succeeded} answered 2xx: more than "
            f"wrk could have had in flight ({wrk.CONNECTIONS})"
        )
    run = LoadRun(server.name, label, result, None, cpu, problems, processed=joined)
    server.check_alive()
    progress(run, f"  joined {joined:,} (+{joined - result.succeeded})")
    return run


def digest_events(
    series: EventSeries, server: Server, fake: FakeSendGrid, wrk_path: str, plan: Plan
) -> None:
    """A warm-up and a measured run at 0 ms, as `bench.measure.events_at`, then the memory."""
    fake.set_latency(0)
    warmup = load_digested(server, fake, wrk_path, "warm-up 0 ms", plan.warmup)
    run = load_digested(server, fake, wrk_path, "events 0 ms", plan.duration)
    series.warmups.append(warmup)
    series.runs[0] = run
    series.events += warmup.work_done + run.work_done
    series.pss_kib.append((series.events, server.pss_kib()))


# --- the burst --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Burst:
    events: int
    join_seconds: float  # the first burst's join loop
    flush_seconds: float  # the first burst's one flush
    rss_peak_mib: float  # the first flush: peak RSS during it less the RSS before it
    traced_peak_mib: float  # the second flush: tracemalloc's peak
    listed: int  # objects the email names
    more_line: str  # the "and N more" line of its text part
    subject: str
    problems: tuple[str, ...]

    @property
    def join_rate(self) -> float:
        return self.events / self.join_seconds if self.join_seconds else float("nan")

    @property
    def expected_more(self) -> str:
        return f"and {self.events - BURST_MAX_ITEMS:,} more"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Burst:
        return cls(**{**value, "problems": tuple(value["problems"])})


@dataclasses.dataclass(frozen=True, slots=True)
class StoreWork:
    events: int
    immediate_us: float  # SqliteStore.claim + complete, per event
    join_us: float  # Digests.join (DigestItem.of + SqliteDigestStore.add), per event

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> StoreWork:
        return cls(**value)


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


def _events(route: str, count: int, start: datetime) -> list[Any]:
    from app.events.models import EventType, StorageEvent, StorageObjectData

    events = []
    for number in range(count):
        name = f"{route}/batch-7/file-{number:05d}.csv"
        data = StorageObjectData(
            bucket="bench-burst",
            name=name,
            generation=1_700_000_000_000_000 + number,
            metageneration=1,
            size=48_213,
            content_type="text/csv",
        )
        events.append(
            StorageEvent(
                id=str(number),
                source="//storage.googleapis.com/projects/_/buckets/bench-burst",
                type=EventType.FINALIZED,
                time=start + timedelta(milliseconds=number),
                data=data,
            )
        )
    return events


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


def _listed(text: str, events: list[Any]) -> list[int]:
    """Which of the events' objects the text part names, by number."""
    return [number for number, event in enumerate(events) if f"/{event.data.name}," in text]


async def _burst(fake_url: str, api_key: str, events: int, directory: Path) -> Burst:
    from pydantic import SecretStr

    from app.delivery.digests import Digests
    from app.notify.sendgrid import SendGridNotifier
    from app.rules.base import DigestRoute
    from app.stores.sqlite_windows import SqliteDigestStore

    clock = [datetime(2026, 1, 5, 9, 0, tzinfo=UTC).timestamp()]
    notifier = _Capturing(SendGridNotifier(api_key=SecretStr(api_key), host=fake_url, timeout=30))
    routes = {
        name: DigestRoute(name, ("ops@example.com",), BURST_WINDOW_SECONDS, BURST_MAX_ITEMS)
        for name in ("warm-up", "burst-1", "burst-2")
    }
    store = SqliteDigestStore.open(str(directory / "notifier.sqlite3"))
    digests = Digests(
        store=store,
        notifier=notifier,  # type: ignore[arg-type]  # a Notifier by its shape
        routes=routes,
        sender=systems.SENDER,
        dead_letters=None,
        lease_seconds=60,
        send_seconds=30,
        clock=lambda: clock[0],
    )
    problems: list[str] = []

    async def fill(route: str, count: int) -> tuple[float, list[Any]]:
        batch = _events(route, count, datetime.fromtimestamp(clock[0], UTC))
        started = time.perf_counter()
        for event in batch:
            await digests.join(route, event)
            clock[0] += 0.001
        return time.perf_counter() - started, batch

    async def flush_one() -> None:
        clock[0] += BURST_WINDOW_SECONDS + 1
        result = await digests.flush()
        if result.flushed != 1 or result.pending != 0:
            problems.append(f"a flush sent {result.flushed} windows, {result.pending} pending")

    try:
        await fill("warm-up", 5)
        await flush_one()

        join_seconds, first = await fill("burst-1", events)
        gc.collect()
        rss_before = _rss_kib("VmRSS")
        peak_known = _reset_peak_rss()
        started = time.perf_counter()
        await flush_one()
        flush_seconds = time.perf_counter() - started
        rss_peak = (_rss_kib("VmHWM") - rss_before) / 1024 if peak_known else float("nan")

        _, second = await fill("burst-2", events)
        del second
        gc.collect()
        tracemalloc.start()
        await flush_one()
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        await store.aclose()
        session = getattr(notifier.notifier, "_session", None)
        if session is not None:
            await session.close()

    if len(notifier.sent) != 3:
        problems.append(f"{len(notifier.sent)} emails sent for 3 windows")
    email = notifier.sent[1] if len(notifier.sent) > 1 else None
    text = email.text if email is not None else ""
    listed = _listed(text, first)
    if listed != list(range(BURST_MAX_ITEMS)):
        problems.append(
            f"the email names {len(listed)} objects, not the first {BURST_MAX_ITEMS} exactly"
        )
    rows = email.html.count("<tr><td>finalized</td>") if email is not None else 0
    if rows != BURST_MAX_ITEMS:
        problems.append(f"the HTML part lists {rows} objects, not {BURST_MAX_ITEMS}")
    more = re.search(r"^and [\d,]+ more$", text, re.M)
    more_line = more.group(0) if more else "(none)"
    return Burst(
        events=events,
        join_seconds=join_seconds,
        flush_seconds=flush_seconds,
        rss_peak_mib=rss_peak,
        traced_peak_mib=traced_peak / MIB,
        listed=len(listed),
        more_line=more_line,
        subject=email.subject if email is not None else "",
        problems=tuple(problems),
    )


async def _store_work(events: int, directory: Path, rounds: int = 10) -> StoreWork:
    """Median microseconds per event of each store's work, the two taking turns by rounds."""
    from app.delivery.digests import Digests
    from app.notify.outbox import OutboxNotifier
    from app.rules.base import DigestRoute
    from app.stores.base import Lease
    from app.stores.sqlite_claims import SqliteStore
    from app.stores.sqlite_windows import SqliteDigestStore

    per_round = max(1, events // rounds)
    batch = _events(ROUTE, per_round * rounds, datetime(2026, 1, 6, tzinfo=UTC))
    keys = [f"route:{ROUTE}:{event.change_key()}" for event in batch]
    immediate = SqliteStore.open(str(directory / "immediate.sqlite3"))
    store = SqliteDigestStore.open(str(directory / "digests.sqlite3"))
    route = DigestRoute(ROUTE, ("ops@example.com",), 3600.0, BURST_MAX_ITEMS)
    digests = Digests(
        store=store,
        notifier=OutboxNotifier(directory / "outbox"),  # never sends: no window closes
        routes={ROUTE: route},
        sender=systems.SENDER,
        dead_letters=None,
        lease_seconds=60,
        send_seconds=5,
    )
    immediate_rounds, join_rounds = [], []
    try:
        for number in range(rounds):
            chunk = slice(number * per_round, (number + 1) * per_round)
            started = time.perf_counter()
            for key in keys[chunk]:
                lease = await immediate.claim(key, 60)
                await immediate.complete(key, lease.token if isinstance(lease, Lease) else 0)
            immediate_rounds.append(time.perf_counter() - started)
            started = time.perf_counter()
            for event in batch[chunk]:
                await digests.join(ROUTE, event)
            join_rounds.append(time.perf_counter() - started)
    finally:
        await immediate.aclose()
        await store.aclose()
    return StoreWork(
        events=per_round * rounds,
        immediate_us=statistics.median(immediate_rounds) / per_round * 1e6,
        join_us=statistics.median(join_rounds) / per_round * 1e6,
    )


def run_burst(events: int = BURST_EVENTS, logs: Path | None = None) -> Burst:
    """The burst against a fake SendGrid process of its own; the fake must accept 3 emails."""
    with tempfile.TemporaryDirectory(prefix="bench-digest-burst-") as work:
        log = (logs or Path(work)) / "fake-sendgrid-burst.log"
        with fake_sendgrid_process(log) as (fake, api_key):
            burst = asyncio.run(_burst(fake.url, api_key, events, Path(work)))
            stats = fake.stats()
    problems = list(burst.problems)
    if stats["accepted"] != 3 or stats["requests"] != 3:
        problems.append(
            f"the fake SendGrid accepted {stats['accepted']} of {stats['requests']} mail "
            "requests, not 3 of 3"
        )
    if burst.more_line != burst.expected_more:
        problems.append(f"the email says {burst.more_line!r}, not {burst.expected_more!r}")
    return dataclasses.replace(burst, problems=tuple(problems))


def run_store_work(events: int = BURST_EVENTS) -> StoreWork:
    with tempfile.TemporaryDirectory(prefix="bench-digest-store-") as work:
        return asyncio.run(_store_work(events, Path(work)))


def measure_in_process(logs: Path) -> tuple[Burst, StoreWork]:
    """`run_burst` and `run_store_work` in a process of their own (`python -m bench.digests
    --json`), so neither the bench's own memory nor tracemalloc's bookkeeping is in the
    figures."""
    argv = [systems.DEV_PYTHON, "-m", "bench.digests", "--json", f"--logs={logs}"]
    env = clean_environment(PYTHONPATH=str(systems.ROOT))
    completed = subprocess.run(
        argv, env=env, cwd=systems.ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the digest burst failed:\n{completed.stderr.strip()[-2000:]}")
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    burst, work = Burst.from_json(found["burst"]), StoreWork.from_json(found["store_work"])
    print(describe(burst), flush=True)
    print(describe_store_work(work), flush=True)
    return burst, work


def describe(burst: Burst) -> str:
    checks = "OK" if not burst.problems else "!! " + "; ".join(burst.problems)
    return (
        f"  digest burst: {burst.events:,} events joined at {burst.join_rate:,.0f}/s, one flush "
        f"{burst.flush_seconds * 1000:,.0f} ms, peak RSS +{burst.rss_peak_mib:.1f} MiB, "
        f"traced peak {burst.traced_peak_mib:.2f} MiB, {burst.listed} objects listed, "
        f"{burst.more_line!r}  {checks}"
    )


def describe_store_work(work: StoreWork) -> str:
    return (
        f"  store work per event, in process: immediate claim + done {work.immediate_us:.1f} us, "
        f"digest join {work.join_us:.1f} us ({work.join_us / work.immediate_us:.2f}x)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.digests",
        description="20,000 events into one digest window, then one flush: time and memory",
    )
    parser.add_argument("--events", type=int, default=BURST_EVENTS)
    parser.add_argument("--json", action="store_true", help="one JSON line, for bench.run")
    parser.add_argument("--logs", type=Path, help="where the fake SendGrid's log goes")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")  # as `python -m app` does
    burst = run_burst(args.events, args.logs)
    work = run_store_work(args.events)
    if args.json:
        print(json.dumps({"burst": burst.to_json(), "store_work": work.to_json()}))
    else:
        print(describe(burst).strip())
        print(f"  subject: {burst.subject}")
        print(describe_store_work(work).strip())
    return 1 if burst.problems else 0


if __name__ == "__main__":
    sys.exit(main())
