"""One measurement each: cold start, a wrk load with its mail check, memory over many events."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from bench import wrk
from bench.fake import FakeSendGrid, Mails, check_mails, request
from bench.processes import Server
from bench.systems import Command

POLL_SECONDS = 0.005  # cold start: how often to knock while the server boots
START_TIMEOUT = 60.0
DATETIME_PATH = "/datetime?requester=John"
MIB = 1024  # KiB
# Bounds `make bench` when a server is slow: 20,000 events at 100/s would take 200 s. Short of the
# count, the memory target fails on its own ("over N events").
TOPUP_BUDGET_SECONDS = 150.0


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How long each part runs; `make bench` uses the defaults."""

    duration: float = 10.0
    warmup: float = 2.0
    cold_starts: int = 5
    leak_events: int = 20_000
    latencies_ms: tuple[int, ...] = (0, 100)


@dataclasses.dataclass(slots=True)
class LoadRun:
    system: str
    label: str
    result: wrk.WrkResult
    mails: Mails | None
    cpu_seconds: float  # the server's CPU time over the run (and the drain after it)
    problems: list[str]
    processed: int | None = None  # events a digest route held in the store (no mail to count)

    @property
    def work_done(self) -> int:
        """Events the server processed (mails accepted, or events held for a digest), or
        requests answered."""
        if self.processed is not None:
            return self.processed
        return self.mails.accepted if self.mails is not None else self.result.requests

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_seconds / self.work_done if self.work_done else float("nan")


@dataclasses.dataclass(slots=True)
class EventSeries:
    """Everything measured on one server process that received events."""

    system: str
    events: int = 0  # processed so far (mails accepted)
    runs: dict[int, LoadRun] = dataclasses.field(default_factory=dict)  # by SendGrid latency
    warmups: list[LoadRun] = dataclasses.field(default_factory=list)
    topups: list[LoadRun] = dataclasses.field(default_factory=list)
    pss_kib: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (events, KiB)

    @property
    def problems(self) -> list[str]:
        return [
            f"{run.label}: {problem}"
            for run in [*self.warmups, *self.runs.values(), *self.topups]
            for problem in run.problems
        ]

    @property
    def pss_idle_mib(self) -> float:
        return self.pss_kib[0][1] / MIB

    @property
    def pss_warm(self) -> tuple[int, float]:
        """Memory after the first measured events: every code path loaded, caches filled."""
        events, kib = self.pss_kib[1] if len(self.pss_kib) > 1 else self.pss_kib[0]
        return events, kib / MIB

    @property
    def leak(self) -> tuple[int, float]:
        """Events processed after the warm reading, and how much memory grew over them: what a
        leak would show. (Idle to warm is the one-time cost of loading the event path.)"""
        warm_events, warm = self.pss_warm
        events, final = self.pss_final
        return events - warm_events, final - warm

    @property
    def pss_final(self) -> tuple[int, float]:
        events, kib = self.pss_kib[-1]
        return events, kib / MIB


def start(command: Command, cwd: Path, logs: Path, port: int) -> Server:
    return Server(
        command.name,
        command.argv,
        env=command.env,
        cwd=cwd,
        log=logs / f"{command.name}.log",
        port=port,
    )


def wait_serving(server: Server, path: str, *, any_status: bool = False) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        server.check_alive()
        try:
            status, _ = request(server.port, "GET", path, timeout=10)
        except OSError:
            status = None
        if status == 200 or (status is not None and any_status):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.name} did not answer {path} in {START_TIMEOUT:.0f} s")
        time.sleep(0.02)


def time_to_first_200(command: Command, port: int, logs: Path) -> float:
    """Seconds from exec to the first 200 on /datetime, knocking every 5 ms, in a fresh working
    directory (a new Cloud Run instance starts with an empty in-memory filesystem)."""
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-{command.name}-") as cwd,
        start(command, Path(cwd), logs, port) as server,
    ):
        while True:
            try:
                status, _ = request(port, "GET", DATETIME_PATH, timeout=30)
            except OSError:
                server.check_alive()
                if time.perf_counter() - server.started_at > START_TIMEOUT:
                    raise TimeoutError(f"{command.name} did not start") from None
                time.sleep(POLL_SECONDS)
                continue
            elapsed = time.perf_counter() - server.started_at
            if status != 200:
                raise RuntimeError(f"{command.name} answered {status} on {DATETIME_PATH}")
            return elapsed


def load(
    server: Server,
    wrk_path: str,
    label: str,
    seconds: float,
    *,
    fake: FakeSendGrid | None = None,
    latency_ms: int = 0,
) -> LoadRun:
    """wrk against the server: events (POST /, checked against the fake) or GET /datetime."""
    if fake is not None:
        fake.reset()
    cpu_before = server.cpu_seconds()
    if fake is not None:
        result = wrk.run(wrk_path, f"http://127.0.0.1:{server.port}", seconds, events=True)
        mails: Mails | None = fake.settle(latency_ms)
    else:
        url = f"http://127.0.0.1:{server.port}{DATETIME_PATH}"
        result = wrk.run(wrk_path, url, seconds, events=False)
        mails = None
    run = LoadRun(
        system=server.name,
        label=label,
        result=result,
        mails=mails,
        cpu_seconds=server.cpu_seconds() - cpu_before,
        problems=list(result.problems),
    )
    if mails is not None:
        run.problems += check_mails(result.succeeded, mails, wrk.CONNECTIONS)
    server.check_alive()
    progress(run)
    return run


def idle(server: Server) -> EventSeries:
    """A series for a server that has not seen an event yet, with its idle memory."""
    return EventSeries(server.name, pss_kib=[(0, server.pss_kib())])


def events_at(
    series: EventSeries,
    server: Server,
    fake: FakeSendGrid,
    wrk_path: str,
    plan: Plan,
    latency_ms: int,
) -> None:
    """A warm-up and a measured run at one SendGrid latency, then the memory so far."""
    fake.set_latency(latency_ms)
    warmup = load(
        server, wrk_path, f"warm-up {latency_ms} ms", plan.warmup, fake=fake, latency_ms=latency_ms
    )
    run = load(
        server, wrk_path, f"events {latency_ms} ms", plan.duration, fake=fake, latency_ms=latency_ms
    )
    series.warmups.append(warmup)
    series.runs[latency_ms] = run
    series.events += warmup.work_done + run.work_done
    series.pss_kib.append((series.events, server.pss_kib()))


def top_up(
    series: EventSeries, server: Server, fake: FakeSendGrid, wrk_path: str, plan: Plan
) -> None:
    """More events at 0 ms until `plan.leak_events` were processed after the warm reading (the
    first one after events), then memory again."""
    fake.set_latency(0)
    rate = max(series.runs[0].result.per_second if 0 in series.runs else 100.0, 50.0)
    budget = TOPUP_BUDGET_SECONDS
    target = series.pss_warm[0] + plan.leak_events
    while series.events < target and budget >= 1.0:
        seconds = min(budget, max(1.0, (target - series.events) / rate * 1.05 + 0.5))
        budget -= seconds
        topup = load(server, wrk_path, "more events 0 ms", seconds, fake=fake)
        series.topups.append(topup)
        series.events += topup.work_done
    time.sleep(1.0)  # as for the idle reading
    series.pss_kib.append((series.events, server.pss_kib()))


def progress(run: LoadRun, extra: str = "") -> None:
    result = run.result
    line = (
        f"  {run.system:<16} {run.label:<18} {result.seconds:5.1f} s "
        f"{result.per_second:9,.0f}/s  p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms"
        f"  cpu {run.cpu_ms_per_request:5.2f} ms/req"
    )
    if run.mails is not None:
        line += f"  mails {run.mails.accepted:,} (+{run.mails.accepted - result.succeeded})"
    line += extra
    line += "  OK" if not run.problems else "  !! " + "; ".join(run.problems)
    print(line, flush=True)
