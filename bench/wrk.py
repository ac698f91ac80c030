"""Drive wrk and read its report: requests/s, p50, p99, non-2xx answers and socket errors."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

EVENTS_SCRIPT = Path(__file__).resolve().parent / "events.lua"

CONNECTIONS = 80  # Cloud Run's default concurrency per instance
THREADS = 2
# Longer than any answer a healthy run gives (the baseline queues 80 requests on 8 threads),
# so slow answers are measured as latency instead of being dropped as wrk timeouts.
TIMEOUT = "10s"

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_DURATION = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m),")
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_PERCENTILE = r"^\s+{}%\s+([\d.]+)(us|ms|s|m)\s*$"
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


class WrkMissing(SystemExit):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int  # answers received, whatever their status
    seconds: float
    per_second: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # wrk counts 3xx as success; none of the measured servers answer 3xx
    socket_errors: dict[str, int]
    output: str

    @property
    def succeeded(self) -> int:
        return self.requests - self.non_2xx

    @property
    def problems(self) -> list[str]:
        found = []
        if self.non_2xx:
            found.append(f"{self.non_2xx} non-2xx answers")
        errors = {kind: count for kind, count in self.socket_errors.items() if count}
        if errors:
            found.append("socket errors " + ", ".join(f"{k} {n}" for k, n in errors.items()))
        if self.requests == 0:
            found.append("no answers at all")
        return found


def ensure_wrk() -> str:
    """wrk's path; installed from Debian's package when missing and running as root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise WrkMissing(
            "wrk is not installed: run `sudo apt-get install wrk` (Debian/Ubuntu) or "
            "`brew install wrk` (macOS), then `make bench` again"
        )
    print("bench: installing wrk with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(install, env=env, capture_output=True, check=True)
    found = shutil.which("wrk")
    if not found:
        raise WrkMissing("apt-get installed wrk but it is not on PATH")
    return found


def run(
    wrk: str,
    url: str,
    seconds: float,
    *,
    events: bool,
    connections: int = CONNECTIONS,
    threads: int = THREADS,
) -> WrkResult:
    """`wrk -t2 -c80 -dNs --latency URL`; with `events`, POSTs from events.lua, each run under a
    fresh random prefix so its storage changes are new to the server."""
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={TIMEOUT}",
        "--latency",
    ]
    if events:
        argv += ["-s", str(EVENTS_SCRIPT), url, "--", str(random.randint(10_000_000, 89_999_999))]
    else:
        argv.append(url)
    completed = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()}")
    return parse(completed.stdout)


def parse(output: str) -> WrkResult:
    duration = _DURATION.search(output)
    rate = _RATE.search(output)
    if duration is None or rate is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    errors = _SOCKET_ERRORS.search(output)
    kinds = ("connect", "read", "write", "timeout")
    return WrkResult(
        requests=int(duration.group(1)),
        seconds=float(duration.group(2)) * _UNITS[duration.group(3)] / 1e3,
        per_second=float(rate.group(1)),
        p50_ms=_percentile(output, 50),
        p99_ms=_percentile(output, 99),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=dict(zip(kinds, (int(n) for n in errors.groups()), strict=True))
        if errors
        else dict.fromkeys(kinds, 0),
        output=output,
    )


def _percentile(output: str, percent: int) -> float:
    found = re.search(_PERCENTILE.format(percent), output, re.MULTILINE)
    if found is None:
        raise ValueError(f"no {percent}% latency in wrk output (run it with --latency)")
    return float(found.group(1)) * _UNITS[found.group(2)]
