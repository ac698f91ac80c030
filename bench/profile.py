"""Where the service spends its CPU under the bench's event load, sampled with py-spy.

Only samples of a thread holding the GIL are kept (`py-spy --gil`): Python's CPU time, not threads
waiting on a lock or the event loop waiting on its sockets (use --all-samples to see the time
sqlite3 spends with the GIL released). py-spy pauses the process for each sample, which slows it by
about a sixth but keeps every stack whole; the shares, not the rate, are the result.

    python -m bench.profile --py-spy /path/to/py-spy [--latency-ms 0] [--seconds 10]
                            [--log-level WARNING]

py-spy is not a project dependency: install it into a throwaway virtual environment
(`python3 -m venv /tmp/py-spy && /tmp/py-spy/bin/pip install py-spy`). The service runs as
`make bench` runs it, against the fake SendGrid, with wrk at concurrency 80; the collapsed stacks
go to bench/results/profile-*.txt (open them with speedscope or flamegraph.pl) and the functions
with the most samples, by own time and including callees, are printed.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench import systems, wrk
from bench.fake import FakeSendGrid
from bench.measure import start, wait_serving
from bench.processes import Server, clean_environment, free_port

RESULTS = systems.BENCH / "results"
_LINE = re.compile(r":\d+\)$")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    wrk_path = wrk.ensure_wrk()
    RESULTS.mkdir(exist_ok=True)
    label = f"{args.latency_ms}ms" + (f"-{args.log_level.lower()}" if args.log_level else "")
    stacks = RESULTS / f"profile-{label}.txt"
    logs = RESULTS / "logs"
    logs.mkdir(exist_ok=True)
    api_key = "SG.profile-fake-key-0000.profile-only-never-a-real-key-000000000000"
    fake_port, port = free_port(), free_port()
    fake_argv = [
        systems.DEV_PYTHON,
        "-m",
        "tests.fakes.sendgrid",
        f"--port={fake_port}",
        f"--latency-ms={args.latency_ms}",
        f"--api-key={api_key}",
    ]
    fake_env = clean_environment(PYTHONPATH=str(systems.ROOT))
    command = systems.service(
        port, systems.SendGridTarget(f"http://127.0.0.1:{fake_port}", api_key), args.log_level
    )
    with (
        Server(
            "fake-sendgrid",
            fake_argv,
            env=fake_env,
            cwd=systems.ROOT,
            log=logs / "profile-fake.log",
            port=fake_port,
        ) as fake_server,
        tempfile.TemporaryDirectory(prefix="bench-profile-") as cwd,
        start(command, Path(cwd), logs, port) as service,
    ):
        FakeSendGrid(fake_server).wait_ready()
        wait_serving(service, command.ready_path)
        url = f"http://127.0.0.1:{port}"
        wrk.run(wrk_path, url, 2, events=True)  # warm-up
        load: list[wrk.WrkResult] = []
        runner = threading.Thread(
            target=lambda: load.append(wrk.run(wrk_path, url, args.seconds + 1, events=True))
        )
        runner.start()
        time.sleep(0.5)
        subprocess.run(
            [
                args.py_spy,
                "record",
                "--pid",
                str(service.pid),
                "--duration",
                str(args.seconds),
                "--format",
                "raw",
                *([] if args.all_samples else ["--gil"]),
                "--output",
                str(stacks),
            ],
            check=True,
            capture_output=True,
        )
        runner.join()
    result = load[0]
    print(
        f"service under load: {result.per_second:,.0f} events/s, p99 {result.p99_ms:.1f} ms, "
        f"SendGrid {args.latency_ms} ms, {result.non_2xx} non-2xx"
    )
    print(f"collapsed stacks: {stacks.relative_to(systems.ROOT)}")
    print(summarize(stacks.read_text(), args.top))
    return 0


def summarize(collapsed: str, top: int) -> str:
    """Functions by own samples and by samples including their callees, in % of all samples."""
    own: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_function(frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        by_package[_package(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "own time by package:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_package.most_common(top)]
    lines += ["", f"top {top} by own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", f"top {top} including callees:"]
    shown = [(name, n) for name, n in inclusive.most_common() if not _is_plumbing(name)]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in shown[:top]]
    lines += ["", "the service's own functions (app/), including callees:"]
    ours = [(name, n) for name, n in inclusive.most_common() if "(app/" in name]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in ours[:top]]
    return "\n".join(lines)


def _function(frame: str) -> str:
    """`handle (app/delivery/pipeline.py:71)` -> `handle (app/delivery/pipeline.py)`."""
    name = _LINE.sub(")", frame.strip())
    return name.replace(str(systems.ROOT) + "/", "").replace(
        str(Path(sys.prefix) / "lib") + "/", ""
    )


def _package(function: str) -> str:
    """`send (app/notify/sendgrid.py)` -> `app/notify`; `send (uvicorn/protocols/x.py)` ->
    `uvicorn`; `wait (threading.py)` -> `threading`."""
    path = function[function.rfind("(") + 1 : -1]
    parts = path.split("/")
    if parts[0] == "app" and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py")


def _is_plumbing(name: str) -> bool:
    """Frames every sample passes through (the event loop, the interpreter's entry points)."""
    return any(
        part in name
        for part in ("<module>", "run_forever", "_run_once", "runpy.py", "asyncio/runners.py")
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--py-spy", required=True, help="path of a py-spy executable")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--log-level", default=None, help="e.g. WARNING (default: the service's)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--all-samples",
        action="store_true",
        help="keep samples of threads not holding the GIL (sqlite3 releases it while it runs)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
