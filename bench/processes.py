"""Servers the bench starts: each in its own session, always stopped, measured through /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

STOP_SECONDS = 10.0  # Cloud Run's own grace period between SIGTERM and SIGKILL
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcessDied(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def clean_environment(**settings: str) -> dict[str, str]:
    """Only what a process needs to run, plus `settings`: nothing of the caller's shell (a
    LOG_LEVEL or PORT exported there) leaks into a measured server."""
    kept = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")
    env = {name: os.environ[name] for name in kept if name in os.environ}
    env.update(settings)
    return env


class Server:
    """`with Server(...) as server:` runs argv until the block ends, however it ends.

    The process leads a new session, so a Ctrl-C on the terminal reaches the bench only, and
    stopping it reaches every process it forked (gunicorn's worker) and nothing else.
    `started_at` is taken just before exec, for cold-start timing.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log: Path,
        port: int,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.log = log
        self.port = port
        self.started_at = 0.0
        self._popen: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.started_at = time.perf_counter()
            self._popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._popen.pid

    def check_alive(self) -> None:
        if self._popen is not None and self._popen.poll() is not None:
            raise ProcessDied(
                f"{self.name} exited with status {self._popen.returncode}; "
                f"last lines of {self.log}:\n{tail(self.log)}"
            )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_SECONDS; forked children that outlive their parent
        are killed too (only those still in this server's process group)."""
        popen, self._popen = self._popen, None
        if popen is None:
            return
        family = [popen.pid, *descendants(popen.pid)]
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
        for pid in family[1:]:
            if _process_group(pid) == popen.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def pss_kib(self) -> int:
        """Proportional set size of the process and every descendant (gunicorn: master and
        worker), from /proc/PID/smaps_rollup: shared pages are counted once across the tree."""
        return sum(_pss_kib(pid) for pid in [self.pid, *descendants(self.pid)])

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the process and its live descendants."""
        return sum(_cpu_seconds(pid) for pid in [self.pid, *descendants(self.pid)])


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields is not None else None


def _pss_kib(pid: int) -> int:
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5); index 0 here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
