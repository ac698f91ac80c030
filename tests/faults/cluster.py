"""What a fault-injection run acts on: the slots (one `python -m app` at a time each, with a fake
SendGrid of its own, so every accepted email names the slot that sent it), the store's server,
and the timeline of everything done to them.

The service's code is found through PYTHONPATH: FAULTS_APP_ROOT points it at another checkout (a
`git worktree` of an older commit), so the suite can run against code other than its own.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import redis

from tests.fakes.sendgrid import Chaos, FakeSendGrid
from tests.servers import ROOT, ServiceProcess

START_SECONDS = 30.0  # a process answering /healthz, on a busy two-core machine
START_ATTEMPTS = 3
TERM_SECONDS = 10.0  # Cloud Run sends SIGKILL this long after SIGTERM


def app_root() -> Path:
    """The checkout whose `app` the processes run: FAULTS_APP_ROOT, else this one."""
    return Path(os.environ.get("FAULTS_APP_ROOT") or ROOT).resolve()


# ---- timeline -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mark:
    at: float  # time.time()
    what: str
    slot: int | None = None
    detail: str = ""


class Timeline:
    """Every fault and process event, stamped with wall-clock time (the fakes' clock too)."""

    def __init__(self) -> None:
        self.started = time.time()
        self._marks: list[Mark] = []
        self._lock = threading.Lock()

    def add(self, what: str, slot: int | None = None, detail: str = "") -> Mark:
        mark = Mark(time.time(), what, slot, detail)
        with self._lock:
            self._marks.append(mark)
        return mark

    def marks(self) -> list[Mark]:
        with self._lock:
            return sorted(self._marks, key=lambda mark: mark.at)

    def offset(self, moment: float) -> str:
        return f"+{moment - self.started:7.3f}s"

    def show(self, mark: Mark) -> str:
        where = "" if mark.slot is None else f" slot {mark.slot}"
        detail = f" ({mark.detail})" if mark.detail else ""
        return f"{self.offset(mark.at)} {mark.what}{where}{detail}"


@dataclass(slots=True)
class Interval:
    what: str
    slot: int | None
    start: float
    end: float | None = None

    def overlap(self, start: float, end: float) -> float:
        stop = time.time() if self.end is None else self.end
        return max(0.0, min(end, stop) - max(start, self.start))


# ---- processes ------------------------------------------------------------------------------


class State(enum.Enum):
    STARTING = "starting"
    UP = "up"  # requests may be routed to it
    DRAINING = "draining"  # nothing new routed; waiting for its requests to be answered
    FROZEN = "frozen"  # SIGSTOP, longer than the lease
    STOPPING = "stopping"  # SIGTERM sent
    DOWN = "down"


@dataclass(slots=True)
class Incarnation:
    """One `python -m app` process of a slot, from its start to its end."""

    slot: int
    number: int
    service: ServiceProcess
    pid: int
    started: float
    ended: float | None = None
    # "SIGKILL", "SIGTERM" (it exited after it), "stop" (the run's end), "start failed",
    # "exited by itself" (a crash)
    ended_by: str | None = None
    in_flight: int = 0  # the suite's requests to it not yet answered
    stops: int = 0  # SIGSTOPs holding it (a short freeze may come during a long one)

    @property
    def name(self) -> str:
        return f"slot {self.slot} #{self.number} (pid {self.pid}, :{self.service.port})"

    @property
    def killed(self) -> bool:
        return self.ended_by == "SIGKILL"


class Slot:
    """One instance's place: a fake SendGrid of its own and the process currently in it."""

    def __init__(self, index: int, env: Mapping[str, str], workdir: Path, chaos: Chaos) -> None:
        self.index = index
        self.workdir = workdir
        self.fake = FakeSendGrid(api_key=env["SENDGRID_API_KEY"])
        self.chaos = chaos
        self._env = dict(env)
        self.state = State.DOWN
        self.incarnations: list[Incarnation] = []

    @property
    def current(self) -> Incarnation | None:
        return self.incarnations[-1] if self.incarnations else None

    def open_fake(self) -> None:
        self.fake.start()
        self.fake.chooser = self.chaos

    def start(self, timeline: Timeline) -> Incarnation:
        """Start a process and wait until it answers /healthz (blocking: run it in a thread)."""
        self.state = State.STARTING
        env = {**self._env, "SENDGRID_HOST": self.fake.url, "PYTHONPATH": str(app_root())}
        failures: list[str] = []
        for _ in range(START_ATTEMPTS):
            service = ServiceProcess(env, self.workdir)
            service.start(wait=False)
            assert service.process is not None
            incarnation = Incarnation(
                self.index, len(self.incarnations) + 1, service, service.process.pid, time.time()
            )
            self.incarnations.append(incarnation)
            timeline.add("start", self.index, incarnation.name)
            try:
                _wait_until_up(service)
            except RuntimeError as error:
                failures.append(f"{error}; its log's last error: {last_error(service.output())}")
                self.end(incarnation, "start failed", timeline, what="start failed, killed")
                if isinstance(error, BrokenService):
                    break
                continue
            self.state = State.UP
            timeline.add("up", self.index, incarnation.name)
            return incarnation
        raise RuntimeError(f"slot {self.index}: no process came up:\n" + "\n".join(failures))

    def end(
        self, incarnation: Incarnation, how: str, timeline: Timeline, *, what: str = "SIGKILL"
    ) -> None:
        """SIGKILL the incarnation (unless it is gone already) and record how it ended."""
        process = incarnation.service.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if incarnation.ended is None:
            incarnation.ended = time.time()
            incarnation.ended_by = how
            timeline.add(what, self.index, incarnation.name)
        incarnation.service.stop()  # closes its log file
        if incarnation is self.current:
            self.state = State.DOWN

    def terminate(self, timeline: Timeline) -> Incarnation:
        """SIGTERM and wait for the exit; SIGKILL after TERM_SECONDS (blocking: a thread)."""
        incarnation = self.current
        assert incarnation is not None
        assert incarnation.service.process is not None
        process = incarnation.service.process
        self.state = State.STOPPING
        timeline.add("SIGTERM", self.index, incarnation.name)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=TERM_SECONDS)
        except subprocess.TimeoutExpired:
            self.end(incarnation, "SIGKILL", timeline, what="SIGKILL after SIGTERM")
            return incarnation
        incarnation.ended = time.time()
        incarnation.ended_by = "SIGTERM"
        timeline.add("exited", self.index, f"{incarnation.name}, code {code}")
        self.end(incarnation, "SIGTERM", timeline)
        return incarnation

    def stop(self, incarnation: Incarnation) -> None:
        """SIGSTOP, counted: the process runs again once every stop is undone."""
        incarnation.stops += 1
        if incarnation.stops == 1:
            self._signal(incarnation, signal.SIGSTOP)

    def cont(self, incarnation: Incarnation) -> None:
        incarnation.stops -= 1
        if incarnation.stops == 0:
            self._signal(incarnation, signal.SIGCONT)

    def _signal(self, incarnation: Incarnation, signum: int) -> None:
        """To that incarnation only, and only while it runs (never to a successor)."""
        process = incarnation.service.process
        if process is not None and process.poll() is None:
            process.send_signal(signum)

    def close(self, timeline: Timeline) -> None:
        for incarnation in self.incarnations:
            if incarnation.stops:
                incarnation.stops = 0
                self._signal(incarnation, signal.SIGCONT)
        current = self.current
        if current is not None and current.ended is None:
            process = current.service.process
            assert process is not None
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=TERM_SECONDS)
                current.ended, current.ended_by = time.time(), "stop"
                timeline.add("stopped", self.index, current.name)
            except subprocess.TimeoutExpired:
                pass
            self.end(current, "SIGKILL", timeline)
        self.fake.stop()


class BrokenService(RuntimeError):
    """/healthz answered 500: a bug, which starting again will not mend."""


def _wait_until_up(service: ServiceProcess) -> None:
    """/healthz answers 200 (503 while the store is paused: wait; 500: give up at once)."""
    deadline = time.monotonic() + START_SECONDS
    process = service.process
    assert process is not None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode} before answering")
        try:
            status = httpx.get(f"{service.url}/healthz", timeout=2).status_code
        except httpx.TransportError:
            status = None
        if status == 200:
            return
        if status == 500:
            raise BrokenService("/healthz answered 500")
        time.sleep(0.05)
    raise RuntimeError(f"the service did not answer /healthz within {START_SECONDS:g} s")


def last_error(log: str) -> str:
    """The last ERROR or CRITICAL line of a JSON log: its message and exception's last line."""
    for line in reversed(log.splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("severity") in ("ERROR", "CRITICAL"):
            exception = str(entry.get("exception", "")).strip().splitlines()
            return f"{entry.get('message')!r} {exception[-1] if exception else ''}".strip()
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(empty log)"


# ---- the store's server ---------------------------------------------------------------------


class StoreServer(Protocol):
    """What the suite may do to the store: pause its server, make it refuse writes."""

    name: str
    url: str
    faults: frozenset[str]  # "pause", "refuse"

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def refuse_writes(self) -> None: ...
    def accept_writes(self) -> None: ...


class SqliteFile:
    """SQLite: a file of the one process, nothing to pause from outside."""

    name = "sqlite"
    faults: frozenset[str] = frozenset()

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path}"

    def pause(self) -> None:
        raise NotImplementedError

    def resume(self) -> None:
        raise NotImplementedError

    def refuse_writes(self) -> None:
        raise NotImplementedError

    def accept_writes(self) -> None:
        raise NotImplementedError


class Stoppable:
    """A server paused by SIGSTOP and resumed by SIGCONT (a network partition, a long GC)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


class RedisServer(Stoppable):
    """redis-server: paused with SIGSTOP; refusing writes with `maxmemory 1` and noeviction
    (deletes and reads still served), as a full Memorystore instance does."""

    name = "redis"
    faults = frozenset({"pause", "refuse"})

    def __init__(self, url: str) -> None:
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        super().__init__(listener_pid(port))
        self.url = url
        self._client = redis.Redis.from_url(url, socket_timeout=10)

    def refuse_writes(self) -> None:
        self._client.config_set("maxmemory-policy", "noeviction")
        self._client.config_set("maxmemory", 1)

    def accept_writes(self) -> None:
        self._client.config_set("maxmemory", 0)

    def close(self) -> None:
        self._client.close()


class FirestoreEmulator(Stoppable):
    """The emulator's JVM, paused with SIGSTOP (never stopped: it keeps everything in memory)."""

    name = "firestore"
    faults = frozenset({"pause"})

    def __init__(self, host: str, url: str) -> None:
        super().__init__(listener_pid(int(host.rsplit(":", 1)[1])))
        self.url = url

    def refuse_writes(self) -> None:
        raise NotImplementedError

    def accept_writes(self) -> None:
        raise NotImplementedError


def listener_pid(port: int) -> int:
    """The process listening on a loopback TCP port, from /proc (Linux)."""
    inodes = set(_listening_inodes(port))
    if not inodes:
        raise RuntimeError(f"nothing listens on port {port}")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return int(entry.name)
    raise RuntimeError(f"no process found holding the socket on port {port}")


def _listening_inodes(port: int) -> Iterator[str]:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    yield inode


@dataclass(slots=True)
class Cluster:
    """The slots, the store's server and the timeline of one run."""

    slots: list[Slot]
    store: StoreServer
    timeline: Timeline = field(default_factory=Timeline)
    intervals: list[Interval] = field(default_factory=list)  # freezes and store faults

    def stalled(self, slot: int, start: float, end: float) -> float:
        """Seconds of [start, end] in which the slot's process or the store was stopped or the
        store refused writes: time in which a done mark could not be written."""
        return sum(
            interval.overlap(start, end)
            for interval in self.intervals
            if interval.slot is None or interval.slot == slot
        )
