"""The side-by-side table, the targets of issues 6, 10, 11 and 18 with PASS/FAIL, and the run's
details."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable

from bench import wrk
from bench.digests import (
    BURST_MAX_ITEMS,
    FLUSH_TARGET_SECONDS,
    MEMORY_TARGET_MIB,
    WINDOW,
    Burst,
    StoreWork,
)
from bench.firestore_window import FLUSH_TARGET_SECONDS as WINDOW_FLUSH_TARGET_SECONDS
from bench.firestore_window import MAX_ITEMS as WINDOW_MAX_ITEMS
from bench.firestore_window import MEMORY_TARGET_MIB as WINDOW_MEMORY_TARGET_MIB
from bench.firestore_window import WindowFlush
from bench.measure import EventSeries, LoadRun, Plan

SERVICE, BASELINE, MINIMAL, QUIET = "service", "ff", "minimal", "service-warning"
RULES_ROUTES = 1000  # issue 10: the large rules file
ONE_ROUTE, MANY_ROUTES = "service-1-route", f"service-{RULES_ROUTES}-routes"
DIGEST_ROUTE = "service-digest-route"  # issue 11: the 1-route file's route with a digest
TIMES = "\N{MULTIPLICATION SIGN}"
CEILING = wrk.CONNECTIONS / 0.1  # 80 requests in flight, each waiting 100 ms on SendGrid


@dataclasses.dataclass(slots=True)
class Figures:
    plan: Plan
    machine: dict[str, str]
    cold_starts: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    events: dict[str, EventSeries] = dataclasses.field(default_factory=dict)
    datetime: dict[str, LoadRun] = dataclasses.field(default_factory=dict)
    idle_pss_mib: dict[str, float] = dataclasses.field(default_factory=dict)  # minimal app
    rules_load_ms: float = float("nan")  # parse + validate + index the large file, in process
    glob_worst_us: float = float("nan")  # issue 19: the slowest hostile glob match, in process
    glob_worst_case: str = ""  # which glob and value that was
    burst: Burst | None = None  # issue 11: 20,000 events in one window, one flush
    store_work: StoreWork | None = None  # issue 11: per event, in process
    firestore_window: WindowFlush | None = None  # issue 18: 200,000 events on the emulator
    firestore_window_note: str = ""  # why that row is missing (no emulator here)
    wall_seconds: float = 0.0

    def cold(self, system: str) -> float:
        return statistics.median(self.cold_starts[system])

    def rate(self, system: str, latency: int) -> float:
        return self.events[system].runs[latency].result.per_second

    def problems(self) -> list[str]:
        found = [f"{name}: {p}" for name, series in self.events.items() for p in series.problems]
        found += [
            f"{name} /datetime: {p}" for name, run in self.datetime.items() for p in run.problems
        ]
        if self.burst is not None:
            found += [f"digest burst: {p}" for p in self.burst.problems]
        if self.firestore_window is not None:
            found += [f"Firestore window: {p}" for p in self.firestore_window.problems]
        return found


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    text: str
    measured: str
    passed: bool
    valid: bool = True

    @property
    def verdict(self) -> str:
        if not self.valid:
            return "FAIL (invalid run)"
        return "PASS" if self.passed else "FAIL"


def _ratio(numerator: float, denominator: float) -> str:
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return "—"
    return f"{numerator / denominator:.2f}{TIMES}"


def _safe(getter: Callable[[], float]) -> float:
    try:
        return getter()
    except (KeyError, IndexError, statistics.StatisticsError):
        return float("nan")


def _fmt(value: float, pattern: str) -> str:
    return "—" if math.isnan(value) else format(value, pattern)


def side_by_side(f: Figures) -> str:
    service, baseline = f.events.get(SERVICE), f.events.get(BASELINE)
    rows: list[tuple[str, float, float, float, str]] = []  # label, svc, ff, minimal, format

    def run_value(series: EventSeries | None, latency: int, pick: str) -> float:
        if series is None or latency not in series.runs:
            return float("nan")
        run = series.runs[latency]
        if pick == "cpu":
            return run.cpu_ms_per_request
        value: float = getattr(run.result, pick)
        return value

    def add(label: str, svc: float, ff: float, floor: float, pattern: str) -> None:
        rows.append((label, svc, ff, floor, pattern))

    add(
        f"cold start, exec → first 200 on /datetime (s, median of {f.plan.cold_starts})",
        _safe(lambda: f.cold(SERVICE)),
        _safe(lambda: f.cold(BASELINE)),
        _safe(lambda: f.cold(MINIMAL)),
        ".3f",
    )
    per_latency = (
        ("events/s, SendGrid {} ms", "per_second", ",.0f"),
        ("p50 latency at {} ms (ms)", "p50_ms", ".1f"),
        ("p99 latency at {} ms (ms)", "p99_ms", ".1f"),
        ("server CPU per event at {} ms (ms)", "cpu", ".2f"),
    )
    for latency in f.plan.latencies_ms:
        for label, pick, pattern in per_latency:
            svc, ff = run_value(service, latency, pick), run_value(baseline, latency, pick)
            add(label.format(latency), svc, ff, float("nan"), pattern)
    add(
        f"share of the concurrency ceiling at 100 ms (events/s ÷ {CEILING:.0f})",
        run_value(service, 100, "per_second") / CEILING,
        run_value(baseline, 100, "per_second") / CEILING,
        float("nan"),
        ".1%",
    )
    dt = f.datetime
    add(
        "/datetime requests/s",
        dt[SERVICE].result.per_second if SERVICE in dt else float("nan"),
        dt[BASELINE].result.per_second if BASELINE in dt else float("nan"),
        dt[MINIMAL].result.per_second if MINIMAL in dt else float("nan"),
        ",.0f",
    )
    add(
        "PSS idle (MiB)",
        service.pss_idle_mib if service else float("nan"),
        baseline.pss_idle_mib if baseline else float("nan"),
        f.idle_pss_mib.get(MINIMAL, float("nan")),
        ".1f",
    )
    nan_pair = (0, float("nan"))
    svc_warm_events, svc_warm = service.pss_warm if service else nan_pair
    ff_warm_events, ff_warm = baseline.pss_warm if baseline else nan_pair
    add(
        f"PSS warm (MiB; after the first {svc_warm_events:,} / {ff_warm_events:,} events)",
        svc_warm,
        ff_warm,
        float("nan"),
        ".1f",
    )
    svc_leak_events, svc_growth = service.leak if service else nan_pair
    ff_leak_events, ff_growth = baseline.leak if baseline else nan_pair
    add(
        f"PSS growth from warm over the next {svc_leak_events:,} / {ff_leak_events:,} events (MiB)",
        svc_growth,
        ff_growth,
        float("nan"),
        "+.1f",
    )
    lines = [
        "Ratios above 1 favour the service for events/s and requests/s; below 1 for cold start, "
        "latency, CPU and memory.",
        "",
        "| | this service | functions-framework | service ÷ baseline | minimal FastAPI |",
        "|---|--:|--:|--:|--:|",
    ]
    for label, svc, ff, floor, pattern in rows:
        ratio = _ratio(svc, ff) if "%" not in pattern else "—"
        lines.append(
            f"| {label} | {_fmt(svc, pattern)} | {_fmt(ff, pattern)} | {ratio} "
            f"| {_fmt(floor, pattern)} |"
        )
    return "\n".join(lines)


def targets(f: Figures) -> list[Target]:
    found: list[Target] = []
    service, baseline = f.events.get(SERVICE), f.events.get(BASELINE)

    def valid(*runs: LoadRun | None) -> bool:
        return all(run is not None and not run.problems for run in runs)

    def run(series: EventSeries | None, latency: int) -> LoadRun | None:
        return series.runs.get(latency) if series is not None else None

    for latency, factor in ((0, 3.0), (100, 8.0)):
        svc_run, ff_run = run(service, latency), run(baseline, latency)
        if svc_run and ff_run:
            ratio = svc_run.result.per_second / ff_run.result.per_second
            found.append(
                Target(
                    f"events/s at {latency} ms ≥ {factor:.0f}{TIMES} the baseline",
                    f"{ratio:.2f}{TIMES} ({svc_run.result.per_second:,.0f} vs "
                    f"{ff_run.result.per_second:,.0f})",
                    ratio >= factor,
                    valid(svc_run, ff_run),
                )
            )
    svc_100 = run(service, 100)
    if svc_100:
        share = svc_100.result.per_second / CEILING
        found.append(
            Target(
                f"events/s at 100 ms ≥ 90 % of the concurrency ceiling ({0.9 * CEILING:.0f}/s)",
                f"{share:.1%} ({svc_100.result.per_second:,.0f}/s)",
                share >= 0.9,
                valid(svc_100),
            )
        )
        found.append(
            Target(
                "p99 at 100 ms ≤ 150 ms",
                f"{svc_100.result.p99_ms:.1f} ms",
                svc_100.result.p99_ms <= 150,
                valid(svc_100),
            )
        )
    if SERVICE in f.cold_starts and MINIMAL in f.cold_starts:
        ratio = f.cold(SERVICE) / f.cold(MINIMAL)
        versus_ff = (
            f", {f.cold(SERVICE) / f.cold(BASELINE):.2f}{TIMES} the baseline"
            if BASELINE in f.cold_starts
            else ""
        )
        found.append(
            Target(
                "cold start within 10 % of the minimal FastAPI app",
                f"{ratio:.2f}{TIMES} ({f.cold(SERVICE):.3f} s vs {f.cold(MINIMAL):.3f} s"
                f"{versus_ff})",
                ratio <= 1.10,
            )
        )
    if service and baseline:
        found.append(
            Target(
                "PSS idle ≤ the baseline's",
                f"{service.pss_idle_mib:.1f} MiB vs {baseline.pss_idle_mib:.1f} MiB",
                service.pss_idle_mib <= baseline.pss_idle_mib,
            )
        )
        events, growth = service.leak
        found.append(
            Target(
                f"PSS growth ≤ 5 MiB over {f.plan.leak_events:,} events (from warm)",
                f"{growth:+.1f} MiB over {events:,} events",
                growth <= 5.0 and events >= f.plan.leak_events,
                not service.problems,
            )
        )
    return found


def rules_table(f: Figures) -> str:
    """Issue 10: what a rules file costs at start-up and per event."""
    one, many = f.events.get(ONE_ROUTE), f.events.get(MANY_ROUTES)
    lines = [
        f"| | no rules file | 1 route | {RULES_ROUTES:,} routes | "
        f"{RULES_ROUTES:,} ÷ 1 or ÷ no rules |",
        "|---|--:|--:|--:|--:|",
    ]
    cold_none = _safe(lambda: f.cold(SERVICE))
    cold_many = _safe(lambda: f.cold(MANY_ROUTES))
    lines.append(
        f"| cold start, exec → first 200 on /datetime (s, median of {f.plan.cold_starts}) | "
        f"{_fmt(cold_none, '.3f')} | — | {_fmt(cold_many, '.3f')} | "
        f"{_ratio(cold_many, cold_none)} |"
    )
    for label, pick, pattern in (
        ("events/s, SendGrid 0 ms", "per_second", ",.0f"),
        ("p99 latency at 0 ms (ms)", "p99_ms", ".1f"),
    ):
        a, b = _at_zero(one, pick), _at_zero(many, pick)
        lines.append(f"| {label} | — | {_fmt(a, pattern)} | {_fmt(b, pattern)} | {_ratio(b, a)} |")
    lines.append(
        f"| parse, validate and index the {RULES_ROUTES:,}-route file, in process (ms) | — | — | "
        f"{_fmt(f.rules_load_ms, '.1f')} | — |"
    )
    lines.append(
        "| the slowest glob match of a hostile corpus, in process (µs; issue 19: "
        f"{f.glob_worst_case or 'not run'}) | — | {_fmt(f.glob_worst_us, '.1f')} | — | — |"
    )
    return "\n".join(lines)


def _at_zero(series: EventSeries | None, pick: str) -> float:
    if series is None or 0 not in series.runs:
        return float("nan")
    value: float = getattr(series.runs[0].result, pick)
    return value


def rules_targets(f: Figures) -> list[Target]:
    found: list[Target] = []
    one, many = f.events.get(ONE_ROUTE), f.events.get(MANY_ROUTES)
    if one and many and 0 in one.runs and 0 in many.runs:
        a, b = one.runs[0], many.runs[0]
        ratio = b.result.per_second / a.result.per_second
        found.append(
            Target(
                f"events/s at 0 ms with {RULES_ROUTES:,} routes within 10 % of 1 route",
                f"{ratio:.2f}{TIMES} ({b.result.per_second:,.0f} vs {a.result.per_second:,.0f})",
                ratio >= 0.90,
                not a.problems and not b.problems,
            )
        )
    if not math.isnan(f.glob_worst_us):
        found.append(
            Target(
                "the slowest glob match, any glob of a hostile corpus against any 1,024-byte "
                "name or 8 KiB metadata value, ≤ 1 ms (issue 19)",
                f"{f.glob_worst_us:.1f} µs ({f.glob_worst_case})",
                f.glob_worst_us <= 1000,
            )
        )
    if MANY_ROUTES in f.cold_starts and MINIMAL in f.cold_starts:
        ratio = f.cold(MANY_ROUTES) / f.cold(MINIMAL)
        found.append(
            Target(
                f"cold start with a {RULES_ROUTES:,}-route file within 10 % of the minimal "
                "FastAPI app",
                f"{ratio:.2f}{TIMES} ({f.cold(MANY_ROUTES):.3f} s vs {f.cold(MINIMAL):.3f} s)",
                ratio <= 1.10,
            )
        )
    return found


def digest_table(f: Figures) -> str:
    """Issue 11: a digest route's events against the same route's immediate emails, and the
    burst flushed as one email."""
    immediate, digest = f.events.get(ONE_ROUTE), f.events.get(DIGEST_ROUTE)
    lines = [
        f"| 1 route, SendGrid 0 ms | immediate (an email per event) | digest (window {WINDOW}) "
        "| digest ÷ immediate |",
        "|---|--:|--:|--:|",
    ]
    for label, pick, pattern in (
        ("events/s", "per_second", ",.0f"),
        ("p50 latency (ms)", "p50_ms", ".1f"),
        ("p99 latency (ms)", "p99_ms", ".1f"),
    ):
        a, b = _at_zero(immediate, pick), _at_zero(digest, pick)
        lines.append(f"| {label} | {_fmt(a, pattern)} | {_fmt(b, pattern)} | {_ratio(b, a)} |")
    a, b = _cpu_at_zero(immediate), _cpu_at_zero(digest)
    lines.append(
        f"| server CPU per event (ms) | {_fmt(a, '.2f')} | {_fmt(b, '.2f')} | {_ratio(b, a)} |"
    )
    work = f.store_work
    if work is not None:
        lines.append(
            "| store work per event, in process (µs): claim + done mark, or `Digests.join` | "
            f"{work.immediate_us:.1f} | {work.join_us:.1f} | "
            f"{_ratio(work.join_us, work.immediate_us)} |"
        )
    burst = f.burst
    if burst is None:
        return "\n".join(lines)
    lines += [
        "",
        f"| {burst.events:,} events into one window, then one flush (in process) | measured |",
        "|---|--:|",
        f"| joins, one at a time (events/s) | {burst.join_rate:,.0f} |",
        f"| the flush: read, render, send one email (ms) | {burst.flush_seconds * 1000:,.1f} |",
        f"| the flush's peak RSS over the RSS before it (MiB) | {burst.rss_peak_mib:.2f} |",
        f"| the flush's tracemalloc peak (MiB) | {burst.traced_peak_mib:.2f} |",
        f"| the email | {burst.listed} objects listed, “{burst.more_line}” |",
    ]
    return "\n".join(lines)


def _cpu_at_zero(series: EventSeries | None) -> float:
    if series is None or 0 not in series.runs:
        return float("nan")
    return series.runs[0].cpu_ms_per_request


def digest_targets(f: Figures) -> list[Target]:
    found: list[Target] = []
    immediate, digest = f.events.get(ONE_ROUTE), f.events.get(DIGEST_ROUTE)
    if immediate and digest and 0 in immediate.runs and 0 in digest.runs:
        a, b = immediate.runs[0], digest.runs[0]
        ratio = b.result.per_second / a.result.per_second
        found.append(
            Target(
                "events/s at 0 ms on a digest route ≥ the same route emailing each event",
                f"{ratio:.2f}{TIMES} ({b.result.per_second:,.0f} vs {a.result.per_second:,.0f})",
                ratio >= 1.0,
                not a.problems and not b.problems,
            )
        )
    burst = f.burst
    if burst is not None:
        valid = not burst.problems
        found.append(
            Target(
                f"one flush of {burst.events:,} events in one window < "
                f"{FLUSH_TARGET_SECONDS:.0f} s",
                f"{burst.flush_seconds * 1000:,.1f} ms",
                burst.flush_seconds < FLUSH_TARGET_SECONDS,
                valid,
            )
        )
        extra = max(burst.traced_peak_mib, burst.rss_peak_mib)
        found.append(
            Target(
                f"extra memory of that flush < {MEMORY_TARGET_MIB:.0f} MiB",
                f"{burst.traced_peak_mib:.2f} MiB traced, +{burst.rss_peak_mib:.2f} MiB peak RSS",
                extra < MEMORY_TARGET_MIB,
                valid,
            )
        )
        found.append(
            Target(
                f"that flush sends one email listing {BURST_MAX_ITEMS} objects, "
                f"“{burst.expected_more}”",
                f"{burst.listed} listed, “{burst.more_line}”",
                burst.listed == BURST_MAX_ITEMS and burst.more_line == burst.expected_more,
                valid,
            )
        )
    return found


def firestore_window_table(f: Figures) -> str:
    """Issue 18: one digest window of many events, flushed on the Firestore emulator."""
    window = f.firestore_window
    if window is None:
        return f"Skipped: {f.firestore_window_note or 'not run'}."
    return "\n".join(
        [
            f"| {window.events:,} events in one window, the Firestore emulator | measured |",
            "|---|--:|",
            f"| writing the events, 500 to a batch (s) | {window.fill_seconds:.1f} |",
            f"| `pending()`: the window and its count (s) | {window.pending_seconds:.2f} |",
            "| a first read of the open window, the emulator compiling its queries (s) | "
            f"{window.first_read_seconds:.2f} |",
            f"| the flush: claim, read, render, send one email (s) | {window.flush_seconds:.2f} |",
            f"| … its claim, closing the window (s) | {window.claim_seconds:.2f} |",
            f"| … its read of the closed window (s) | {window.read_seconds:.2f} |",
            f"| the flush's tracemalloc peak (MiB) | {window.traced_peak_mib:.2f} |",
            f"| the flush's peak RSS over the RSS before it (MiB) | {window.rss_peak_mib:.2f} |",
            f"| the email | {window.listed} objects listed, “{window.more_line}” |",
        ]
    )


def firestore_window_targets(f: Figures) -> list[Target]:
    window = f.firestore_window
    if window is None:
        return []
    valid = not window.problems
    return [
        Target(
            f"one flush of a {window.events:,}-event window on the Firestore emulator (claim, "
            f"read, send) < {WINDOW_FLUSH_TARGET_SECONDS:.0f} s",
            f"{window.flush_seconds:.2f} s (read {window.read_seconds:.2f} s)",
            window.flush_seconds < WINDOW_FLUSH_TARGET_SECONDS,
            valid,
        ),
        Target(
            f"extra memory of that flush < {WINDOW_MEMORY_TARGET_MIB:.0f} MiB",
            f"{window.traced_peak_mib:.2f} MiB traced, +{window.rss_peak_mib:.2f} MiB peak RSS",
            window.extra_mib < WINDOW_MEMORY_TARGET_MIB,
            valid,
        ),
        Target(
            "exact: pending() counts every event, the read's summary is the events', the email "
            f"lists the first {WINDOW_MAX_ITEMS} objects, “{window.expected_more}”",
            f"{window.pending_events:,} counted, {window.listed} listed, “{window.more_line}”",
            valid,
        ),
    ]


def all_targets(f: Figures) -> list[Target]:
    return targets(f) + rules_targets(f) + digest_targets(f) + firestore_window_targets(f)


def targets_table(found: list[Target]) -> str:
    lines = ["| target (issues 6, 10, 11, 18 and 19) | measured | result |", "|---|---|---|"]
    lines += [f"| {t.text} | {t.measured} | {t.verdict} |" for t in found]
    return "\n".join(lines)


def log_level_table(f: Figures) -> str:
    default, quiet = f.events.get(SERVICE), f.events.get(QUIET)
    if default is None or quiet is None:
        return ""
    lines = [
        "| service | LOG_LEVEL=INFO (default) | LOG_LEVEL=WARNING | WARNING ÷ INFO |",
        "|---|--:|--:|--:|",
    ]
    for latency in f.plan.latencies_ms:
        if latency not in default.runs or latency not in quiet.runs:
            continue
        a, b = default.runs[latency], quiet.runs[latency]
        lines.append(
            f"| events/s at {latency} ms | {a.result.per_second:,.0f} | "
            f"{b.result.per_second:,.0f} | {_ratio(b.result.per_second, a.result.per_second)} |"
        )
        lines.append(
            f"| p99 at {latency} ms (ms) | {a.result.p99_ms:.1f} | {b.result.p99_ms:.1f} | "
            f"{_ratio(b.result.p99_ms, a.result.p99_ms)} |"
        )
        lines.append(
            f"| server CPU per event at {latency} ms (ms) | {a.cpu_ms_per_request:.2f} | "
            f"{b.cpu_ms_per_request:.2f} | "
            f"{_ratio(b.cpu_ms_per_request, a.cpu_ms_per_request)} |"
        )
    return "\n".join(lines)


def details(f: Figures) -> str:
    lines = ["Cold starts (s, every run):"]
    for system, values in f.cold_starts.items():
        lines.append(f"- {system}: " + ", ".join(f"{v:.3f}" for v in values))
    lines.append("")
    lines.append("PSS along the runs (events processed so far → MiB):")
    for system, series in f.events.items():
        samples = ", ".join(f"{events:,} → {kib / 1024:.1f}" for events, kib in series.pss_kib)
        lines.append(f"- {system}: {samples}")
    lines.append("")
    problems = f.problems()
    if problems:
        lines.append("**INVALID RUNS** (a run with errors is not a result):")
        lines += [f"- {problem}" for problem in problems]
    else:
        lines.append(
            "Checks: every run answered 2xx only, with no socket errors, and the fake SendGrid "
            f"accepted one mail per 2xx answer (plus at most {wrk.CONNECTIONS} for the requests "
            "in flight when wrk stopped counting); on the digest route, every 2xx answer was an "
            "event in its window and no mail was sent."
        )
    if f.burst is not None and not f.burst.problems:
        lines.append("")
        lines.append(
            "Digest burst: the fake SendGrid accepted one email per window; the burst's email "
            f"names the first {BURST_MAX_ITEMS} objects in its text and HTML parts and no other; "
            f"subject “{f.burst.subject}”."
        )
    if f.firestore_window is not None and not f.firestore_window.problems:
        lines.append("")
        lines.append(
            f"Firestore window: pending() counted all {f.firestore_window.events:,} events; the "
            "open window's read and the flush's read of the closed one both equal the summary "
            "of the events written; the fake SendGrid accepted one email."
        )
    return "\n".join(lines)


def machine_line(f: Figures) -> str:
    m = f.machine
    return (
        f"{m['date']} · {m['nproc']} CPUs ({m['cpu']}) · Linux {m['kernel']} · "
        f"Python {m['python']} · {m['wrk']} · functions-framework {m['ff']} · "
        f"load average at start {m['load']} · the bench took {f.wall_seconds / 60:.1f} min"
    )


def render(f: Figures) -> str:
    quick = (
        "" if f.plan == Plan() else "\n**Quick run: shorter than `make bench`, not comparable.**\n"
    )
    parts = [
        "## Latest run",
        "",
        machine_line(f),
        quick,
        side_by_side(f),
        "",
        "### Targets",
        "",
        targets_table(all_targets(f)),
        "",
        "### Routing rules (issue 10)",
        "",
        rules_table(f),
        "",
        "### Digests (issue 11)",
        "",
        digest_table(f),
        "",
        "### A digest window in Firestore (issue 18)",
        "",
        firestore_window_table(f),
        "",
    ]
    levels = log_level_table(f)
    if levels:
        parts += ["### What LOG_LEVEL=WARNING changes", "", levels, ""]
    parts += ["### Details", "", details(f), ""]
    return "\n".join(parts)
