"""`make bench`: this service against functions-framework running the book's functions.

One run, one machine, side by side (absolute numbers drift on shared machines; ratios in one run
hold). Every server started here runs in its own session and is stopped on the way out, on
success, failure, Ctrl-C or SIGTERM alike. See BENCHMARKS.md for the method.

    .venv/bin/python -m bench.run [--quick] [--strict] [--update-benchmarks-md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from bench import digests, firestore_window, report, rules_file, systems
from bench.fake import FakeSendGrid
from bench.measure import (
    Plan,
    events_at,
    idle,
    load,
    start,
    time_to_first_200,
    top_up,
    wait_serving,
)
from bench.processes import ProcessDied, Server, clean_environment, free_port
from bench.wrk import ensure_wrk

RESULTS = systems.BENCH / "results"
LOGS = RESULTS / "logs"
BENCHMARKS_MD = systems.ROOT / "BENCHMARKS.md"
MARK_START = "<!-- bench:latest:start -->"
MARK_END = "<!-- bench:latest:end -->"
QUICK = Plan(duration=3.0, warmup=1.0, cold_starts=3, leak_events=3_000)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    began = time.monotonic()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # run the finally blocks, stop the servers
    plan = QUICK if args.quick else Plan()
    wrk_path = ensure_wrk()
    systems.ensure_ff_venv()
    if LOGS.exists():
        shutil.rmtree(LOGS)
    LOGS.mkdir(parents=True)

    figures = report.Figures(plan=plan, machine=_machine(wrk_path))
    figures.rules_load_ms = rules_file.load_ms(report.RULES_ROUTES)
    figures.glob_worst_us, figures.glob_worst_case = rules_file.worst_glob_us()
    print(f"bench: {report.machine_line(figures).rsplit(' · ', 1)[0]}", flush=True)
    try:
        measure_cold_starts(figures)
        measure_loads(figures, wrk_path)
        print("bench: a digest burst, in process", flush=True)
        figures.burst, figures.store_work = digests.measure_in_process(LOGS)
        print("bench: a digest window of 200,000 events, on the Firestore emulator", flush=True)
        window, note = firestore_window.measure_in_process(LOGS)
        figures.firestore_window, figures.firestore_window_note = window, note
    except KeyboardInterrupt:
        print("bench: interrupted; every server it started is stopped", file=sys.stderr)
        return 130
    except (ProcessDied, TimeoutError, RuntimeError, ValueError) as error:
        print(f"bench: FAILED, no table: {error}", file=sys.stderr)
        print(f"bench: server logs are in {LOGS.relative_to(systems.ROOT)}", file=sys.stderr)
        return 3
    figures.wall_seconds = time.monotonic() - began

    text = report.render(figures)
    print()
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text(text)
    print(f"bench: table written to {(RESULTS / 'latest.md').relative_to(systems.ROOT)}")
    if args.update_benchmarks_md:
        _update_benchmarks_md(text)
    if figures.problems():
        print("bench: INVALID: some runs had errors or mail mismatches (see Details)")
        return 2
    found = report.all_targets(figures)
    failed = [t for t in found if t.verdict != "PASS"]
    print(f"bench: {len(failed)} target(s) failed" if failed else "bench: every target passes")
    return 1 if failed and args.strict else 0


def measure_cold_starts(figures: report.Figures) -> None:
    """Round-robin over the systems (one discarded run each first, to warm the page cache), so
    that drift on a shared machine spreads over all of them."""
    fake_target = systems.SendGridTarget("http://127.0.0.1:9", _fake_api_key())
    makers: dict[str, Callable[[int], systems.Command]] = {
        report.MINIMAL: systems.minimal,
        report.BASELINE: systems.ff_datetime,
        report.SERVICE: lambda port: systems.service(port, fake_target),
        report.MANY_ROUTES: lambda port: systems.service(
            port, fake_target, rules=_rules(report.RULES_ROUTES), name=report.MANY_ROUTES
        ),
    }
    logs = LOGS / "cold-start"
    logs.mkdir()
    print("bench: cold starts (exec → first 200 on /datetime)", flush=True)
    for round_number in range(figures.plan.cold_starts + 1):
        for system, make in makers.items():
            port = free_port()
            seconds = time_to_first_200(make(port), port, logs)
            if round_number > 0:
                figures.cold_starts.setdefault(system, []).append(seconds)
    for system, values in figures.cold_starts.items():
        print(f"  {system:<16} " + "  ".join(f"{v:.3f}" for v in values), flush=True)


def measure_loads(figures: report.Figures, wrk_path: str) -> None:
    plan = figures.plan
    api_key = _fake_api_key()
    fake_port = free_port()
    fake_argv = [
        systems.DEV_PYTHON,
        "-m",
        "tests.fakes.sendgrid",
        f"--port={fake_port}",
        "--latency-ms=0",
        f"--api-key={api_key}",
    ]
    fake_env = clean_environment(PYTHONPATH=str(systems.ROOT))
    log = LOGS / "fake-sendgrid.log"
    with Server(
        "fake-sendgrid", fake_argv, env=fake_env, cwd=systems.ROOT, log=log, port=fake_port
    ) as fake_server:
        fake = FakeSendGrid(fake_server)
        fake.wait_ready()
        target = systems.SendGridTarget(fake.url, api_key)
        print(f"bench: events at concurrency 80, fake SendGrid at {fake.url}", flush=True)

        # The service and the baseline run side by side and take turns at each latency, so a
        # burst of other work on a shared machine hits both rather than one of them.
        service_port, baseline_port = free_port(), free_port()
        with (
            _serving(systems.service(service_port, target), service_port) as service,
            _serving(systems.ff_notify(baseline_port, target), baseline_port) as baseline,
        ):
            time.sleep(1.0)  # let start-up garbage settle before the idle reading
            pair = {
                report.SERVICE: (service, idle(service)),
                report.BASELINE: (baseline, idle(baseline)),
            }
            for latency in plan.latencies_ms:
                for server, series in pair.values():
                    events_at(series, server, fake, wrk_path, plan, latency)
            for name, (server, series) in pair.items():
                top_up(series, server, fake, wrk_path, plan)
                figures.events[name] = series
            figures.datetime[report.SERVICE] = load(service, wrk_path, "/datetime", plan.duration)

        # Alone: two copies of the service would share their libraries' pages, halving the
        # memory of each (PSS).
        port = free_port()
        with _serving(systems.service(port, target, "WARNING"), port) as quiet:
            time.sleep(1.0)
            figures.events[report.QUIET] = quiet_series = idle(quiet)
            for latency in plan.latencies_ms:
                events_at(quiet_series, quiet, fake, wrk_path, plan, latency)

        # Issue 10: the same events through a 1-route and a 1,000-route rules file, taking turns.
        # The events match the last route of each file, so an unindexed matcher would pay for
        # every route.
        one_port, many_port = free_port(), free_port()
        one = systems.service(one_port, target, rules=_rules(1), name=report.ONE_ROUTE)
        many = systems.service(
            many_port, target, rules=_rules(report.RULES_ROUTES), name=report.MANY_ROUTES
        )
        with _serving(one, one_port) as one_server, _serving(many, many_port) as many_server:
            time.sleep(1.0)
            routed = {
                report.ONE_ROUTE: (one_server, idle(one_server)),
                report.MANY_ROUTES: (many_server, idle(many_server)),
            }
            for server, series in routed.values():
                events_at(series, server, fake, wrk_path, plan, 0)
            for name, (_, series) in routed.items():
                figures.events[name] = series

        # Issue 11: the 1-route file's route with a digest (a window longer than the run), loaded
        # as the 1-route run was; alone, so the PSS of the runs above reads as it did.
        port = free_port()
        command = systems.service(port, target, rules=_digest_rules(), name=report.DIGEST_ROUTE)
        with _serving(command, port) as digest_server:
            time.sleep(1.0)
            figures.events[report.DIGEST_ROUTE] = series = idle(digest_server)
            digests.digest_events(series, digest_server, fake, wrk_path, plan)

    port = free_port()
    with _serving(systems.ff_datetime(port), port) as ff_datetime:
        load(ff_datetime, wrk_path, "warm-up", plan.warmup)
        figures.datetime[report.BASELINE] = load(ff_datetime, wrk_path, "/datetime", plan.duration)

    port = free_port()
    with _serving(systems.minimal(port), port) as minimal:
        time.sleep(1.0)
        figures.idle_pss_mib[report.MINIMAL] = minimal.pss_kib() / 1024
        load(minimal, wrk_path, "warm-up", plan.warmup)
        figures.datetime[report.MINIMAL] = load(minimal, wrk_path, "/datetime", plan.duration)


@contextlib.contextmanager
def _serving(command: systems.Command, port: int) -> Iterator[Server]:
    """The server, started in a fresh temporary working directory and ready for requests."""
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-{command.name}-") as cwd,
        start(command, Path(cwd), LOGS, port) as server,
    ):
        wait_serving(server, command.ready_path, any_status=command.ready_any_status)
        yield server


def _rules(routes: int) -> Path:
    """A rules file of `routes` routes (bench/rules_file.py) whose last route the events match,
    emailing the same recipients as the runs without rules."""
    path = RESULTS / f"rules-{routes}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rules_file.example_rules(routes, to=systems.RECIPIENTS.split(",")))
    return path


def _digest_rules() -> Path:
    """The 1-route file of `_rules(1)`, its route gathering events in a digest window."""
    path = RESULTS / "rules-1-digest.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    to = systems.RECIPIENTS.split(",")
    path.write_text(rules_file.example_rules(1, to=to, digest_window=digests.WINDOW))
    return path


def _fake_api_key() -> str:
    """Shaped like a SendGrid key ("SG.<22>.<43>"), new for every run."""
    return f"SG.{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(32)}"


def _machine(wrk_path: str) -> dict[str, str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    wrk_version = subprocess.run([wrk_path, "-v"], capture_output=True, text=True, check=False)
    wrk_line = (wrk_version.stdout or wrk_version.stderr).splitlines()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": " ".join(wrk_line[0].split()[:2]) if wrk_line else "wrk",
        "ff": systems.ff_version(),
        # Other work on a shared machine moves absolute numbers (ratios in one run hold).
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def _update_benchmarks_md(text: str) -> None:
    current = BENCHMARKS_MD.read_text()
    start_at, end_at = current.find(MARK_START), current.find(MARK_END)
    if start_at < 0 or end_at < start_at:
        print(f"bench: {BENCHMARKS_MD.name} has no {MARK_START} … {MARK_END} section; not updated")
        return
    updated = current[: start_at + len(MARK_START)] + "\n" + text + "\n" + current[end_at:]
    BENCHMARKS_MD.write_text(updated)
    print(f"bench: {BENCHMARKS_MD.name} updated")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 s runs, 3 cold starts, 3,000 events for memory: for developing the bench only",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    parser.add_argument(
        "--update-benchmarks-md",
        action="store_true",
        help="replace the latest-run section of BENCHMARKS.md with this run's tables",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
