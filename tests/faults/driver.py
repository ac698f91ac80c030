"""Plays a plan against the cluster: deliveries redelivered like Eventarc until answered 2xx,
Scheduler-like flushes, and every fault at its offset; then lifts the faults, waits for every
change to be answered 2xx and for every digest window to go out.

Everything runs in one asyncio loop; process starts and SIGTERM waits run in threads. Which
process a delivery goes to is drawn from the seed, the delivery and the attempt number, among
the processes that are up at that moment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.factories import EVENTARC_PATH
from tests.faults.cluster import Cluster, Incarnation, Interval, Slot, State
from tests.faults.plan import (
    Action,
    Deliver,
    Flush,
    Freeze,
    Hiccup,
    Kill,
    PauseStore,
    Plan,
    RefuseWrites,
    Terminate,
)

EVENT_TIMEOUT = 30.0  # the suite's wait for one answer (Eventarc's is the service's timeout)
FLUSH_TIMEOUT = 60.0  # a flush sends window after window; Cloud Run's request timeout
DRAIN_SECONDS = 30.0  # how long a freeze waits for the process's requests to be answered
SETTLE_SECONDS = 120.0  # after the faults: every change answered 2xx within this
WINDOWS_SECONDS = 90.0  # then every digest window sent within this
BACKOFF = (0.2, 2.0)  # seconds before a redelivery: a seeded draw between the two


@dataclass(frozen=True, slots=True)
class Answer:
    """One request of the suite and what came back (`status` None: no answer at all)."""

    sent: float
    answered: float
    slot: int
    incarnation: str
    status: int | None
    outcome: str  # the JSON `status` of a 2xx, else the problem's detail or the transport error
    event_id: str = ""
    extra: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(slots=True)
class Driver:
    plan: Plan
    cluster: Cluster
    client: httpx.AsyncClient | None = None
    answers: dict[int, list[Answer]] = field(default_factory=lambda: defaultdict(list))
    flushes: list[Answer] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the harness's own, not the service's
    crashes: list[Incarnation] = field(default_factory=list)  # processes that exited by themselves
    phases: dict[str, float] = field(default_factory=dict)
    _acked: dict[int, asyncio.Event] = field(default_factory=dict)
    _settled: dict[int, asyncio.Event] = field(default_factory=dict)  # acked, or given up
    _start: float = 0.0
    _give_up: float | None = None
    _restarts: list[asyncio.Task[Incarnation]] = field(default_factory=list)

    @property
    def slots(self) -> list[Slot]:
        return self.cluster.slots

    async def run(self) -> None:
        timeline = self.cluster.timeline
        timeline.started = time.time()
        self._acked = {change.index: asyncio.Event() for change in self.plan.changes}
        self._settled = {change.index: asyncio.Event() for change in self.plan.changes}
        self._start = time.monotonic()
        timeline.add("faults begin", detail=self.plan.describe())
        deliveries = [
            asyncio.create_task(self._deliver(action)) for action in self.plan.of_type(Deliver)
        ]
        faults = [
            asyncio.create_task(self._guarded(action))
            for action in self.plan.actions
            if not isinstance(action, Deliver)
        ]
        try:
            await asyncio.gather(*faults)
            self.phases["faults"] = time.monotonic() - self._start
            await self._lift()
            self._give_up = time.monotonic() + SETTLE_SECONDS
            await asyncio.gather(*deliveries)
            self.phases["answered"] = time.monotonic() - self._start
            await self._flush_until_no_window_is_left()
            self.phases["windows sent"] = time.monotonic() - self._start
        finally:
            for task in (*deliveries, *faults):
                task.cancel()
            await asyncio.gather(*deliveries, *faults, *self._restarts, return_exceptions=True)

    # ---- deliveries -------------------------------------------------------------------------

    async def _deliver(self, action: Deliver) -> None:
        await self._until(action.at)
        if action.after_ack:
            await self._settled[action.change].wait()
            if not self._acked[action.change].is_set():
                return
        try:
            await self._redeliver(action)
        finally:
            if not action.extra:
                self._settled[action.change].set()

    async def _redeliver(self, action: Deliver) -> None:
        change = self.plan.changes[action.change]
        headers, body = change.request(action.event_id)
        key = f"deliver:{action.change}:{action.event_id}:{action.at}"
        attempt = 0
        while True:
            slot = await self._pick(key, attempt)
            if slot is None:
                self.problems.append(f"{change.label}: no process up to deliver it to")
                return
            answer = await self._request(
                slot, "POST", EVENTARC_PATH, EVENT_TIMEOUT, headers=headers, content=body
            )
            answer = _with(answer, event_id=action.event_id, extra=action.extra)
            self.answers[action.change].append(answer)
            if answer.ok:
                self._acked[action.change].set()
                return
            attempt += 1
            if self._give_up is not None and time.monotonic() > self._give_up:
                return  # judged: never answered 2xx
            low, high = BACKOFF
            await asyncio.sleep(random.Random(f"{key}:{attempt}").uniform(low, high))

    async def _pick(self, key: str, attempt: int, prefer: int | None = None) -> Slot | None:
        """A process that is up: `prefer`'s if it is, else the first of a seeded order."""
        order = list(range(len(self.slots)))
        random.Random(f"{self.plan.seed}:{key}:{attempt}").shuffle(order)
        if prefer is not None:
            order.insert(0, prefer)
        while True:
            for index in order:
                slot = self.slots[index]
                if slot.state is State.UP and not self._crashed(slot):
                    return slot
            if self._give_up is not None and time.monotonic() > self._give_up:
                return None
            await asyncio.sleep(0.05)

    def _crashed(self, slot: Slot) -> bool:
        """A process that exited by itself (nobody signalled it) is noted, and replaced as Cloud
        Run would replace it."""
        incarnation = slot.current
        process = None if incarnation is None else incarnation.service.process
        if incarnation is None or process is None or process.poll() is None:
            return False
        slot.end(incarnation, "exited by itself", self.cluster.timeline, what="exited by itself")
        self.crashes.append(incarnation)
        restart = asyncio.create_task(asyncio.to_thread(slot.start, self.cluster.timeline))
        self._restarts.append(restart)
        return True

    async def _request(
        self, slot: Slot, method: str, path: str, timeout: float, **kwargs: Any
    ) -> Answer:
        incarnation = slot.current
        assert incarnation is not None
        assert self.client is not None
        incarnation.in_flight += 1
        sent = time.time()
        try:
            response = await self.client.request(
                method, incarnation.service.url + path, timeout=timeout, **kwargs
            )
        except httpx.HTTPError as error:
            return Answer(
                sent, time.time(), slot.index, incarnation.name, None, type(error).__name__
            )
        finally:
            incarnation.in_flight -= 1
        return Answer(
            sent,
            time.time(),
            slot.index,
            incarnation.name,
            response.status_code,
            _outcome(response),
        )

    # ---- flushes and faults -----------------------------------------------------------------

    async def _guarded(self, action: Action) -> None:
        """One fault or flush; a failure of the harness's own is recorded, never raised."""
        try:
            await self._until(action.at)
            await self._act(action)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.problems.append(f"{action}: {type(error).__name__}: {error}")
            self.cluster.timeline.add("harness error", detail=f"{action}: {error}")

    async def _act(self, action: Action) -> None:
        if isinstance(action, Flush):
            await asyncio.gather(
                *(self._flush(action, n, slot) for n, slot in enumerate(action.slots))
            )
        elif isinstance(action, Kill):
            await self._kill(action)
        elif isinstance(action, Terminate):
            await self._terminate(action)
        elif isinstance(action, Freeze):
            await self._freeze(action)
        elif isinstance(action, Hiccup):
            await self._hiccup(action)
        elif isinstance(action, PauseStore):
            await self._store_fault(
                "store paused", action.seconds, self.cluster.store.pause, self.cluster.store.resume
            )
        elif isinstance(action, RefuseWrites):
            store = self.cluster.store
            await self._store_fault(
                "store refuses writes", action.seconds, store.refuse_writes, store.accept_writes
            )

    async def _flush(self, action: Flush, n: int, prefer: int) -> None:
        slot = await self._pick(f"flush:{action.at}:{n}", 0, prefer)
        if slot is None:
            return
        answer = await self._request(slot, "POST", "/digests/flush", FLUSH_TIMEOUT)
        self.flushes.append(answer)

    def _skip(self, action: Action, slot: Slot) -> None:
        self.cluster.timeline.add(
            f"{type(action).__name__} left out", slot.index, f"the slot is {slot.state.value}"
        )

    async def _kill(self, action: Kill) -> None:
        slot = self.slots[action.slot]
        incarnation = slot.current
        if slot.state is not State.UP or incarnation is None:
            self._skip(action, slot)
            return
        slot.end(incarnation, "SIGKILL", self.cluster.timeline)
        await asyncio.sleep(action.down_for)
        await asyncio.to_thread(slot.start, self.cluster.timeline)

    async def _terminate(self, action: Terminate) -> None:
        slot = self.slots[action.slot]
        if slot.state is not State.UP:
            self._skip(action, slot)
            return
        await asyncio.to_thread(slot.terminate, self.cluster.timeline)
        await asyncio.sleep(action.down_for)
        await asyncio.to_thread(slot.start, self.cluster.timeline)

    async def _freeze(self, action: Freeze) -> None:
        """Cloud Run throttles CPU only between requests: stop routing to the process, wait
        until it has answered everything, then freeze it for longer than its lease."""
        slot, timeline = self.slots[action.slot], self.cluster.timeline
        incarnation = slot.current
        if slot.state is not State.UP or incarnation is None:
            self._skip(action, slot)
            return
        slot.state = State.DRAINING
        timeline.add("draining", slot.index, incarnation.name)
        deadline = time.monotonic() + DRAIN_SECONDS
        while incarnation.in_flight > 0:
            if time.monotonic() > deadline or incarnation.ended is not None:
                timeline.add("freeze left out", slot.index, "its requests did not end")
                if slot.current is incarnation and slot.state is State.DRAINING:
                    slot.state = State.UP
                return
            await asyncio.sleep(0.02)
        await self._stopped(slot, incarnation, action.seconds, "frozen", State.FROZEN)

    async def _hiccup(self, action: Hiccup) -> None:
        slot = self.slots[action.slot]
        incarnation = slot.current
        if slot.state is not State.UP or incarnation is None:
            self._skip(action, slot)
            return
        await self._stopped(slot, incarnation, action.seconds, "hiccup", None)

    async def _stopped(
        self,
        slot: Slot,
        incarnation: Incarnation,
        seconds: float,
        what: str,
        state: State | None,
    ) -> None:
        timeline = self.cluster.timeline
        slot.stop(incarnation)
        interval = Interval(what, slot.index, time.time())
        self.cluster.intervals.append(interval)
        if state is not None:
            slot.state = state
        timeline.add(f"SIGSTOP ({what}, {seconds:.2f} s)", slot.index, incarnation.name)
        try:
            await asyncio.sleep(seconds)
        finally:
            slot.cont(incarnation)
            interval.end = time.time()
            timeline.add(f"SIGCONT ({what})", slot.index, incarnation.name)
            if state is not None and slot.current is incarnation and slot.state is state:
                slot.state = State.UP

    async def _store_fault(
        self, what: str, seconds: float, begin: Callable[[], None], end: Callable[[], None]
    ) -> None:
        timeline = self.cluster.timeline
        interval = Interval(what, None, time.time())
        begin()
        self.cluster.intervals.append(interval)
        timeline.add(what, detail=f"{seconds:.2f} s")
        try:
            await asyncio.sleep(seconds)
        finally:
            end()
            interval.end = time.time()
            timeline.add(f"{what}: over")

    # ---- the end ------------------------------------------------------------------------------

    async def _lift(self) -> None:
        """Every fault is over by now (its task restored what it did); SendGrid behaves from
        here on, and every slot has a process."""
        self.cluster.timeline.add("faults lifted; SendGrid answers 202 from now on")
        for slot in self.slots:
            slot.chaos.enabled = False
        await asyncio.gather(
            *(
                asyncio.to_thread(slot.start, self.cluster.timeline)
                for slot in self.slots
                if slot.state is State.DOWN
            )
        )

    async def _flush_until_no_window_is_left(self) -> None:
        """Flush, as Scheduler would, until GET /digests lists nothing: windows come due, and
        windows claimed by a killed process come back when its lease runs out."""
        deadline = time.monotonic() + WINDOWS_SECONDS
        rounds = 0
        while True:
            slot = await self._pick(f"final flush:{rounds}", 0, rounds % len(self.slots))
            rounds += 1
            if slot is None:
                self.problems.append("no process up to flush the last digest windows")
                return
            flushed = await self._request(slot, "POST", "/digests/flush", FLUSH_TIMEOUT)
            self.flushes.append(flushed)
            listed = await self._request(slot, "GET", "/digests", FLUSH_TIMEOUT)
            if flushed.ok and listed.ok and listed.outcome == "[]":
                self.cluster.timeline.add("no digest window left", slot.index)
                return
            if time.monotonic() > deadline:
                self.problems.append(
                    f"digest windows still pending {WINDOWS_SECONDS:g} s after every change was"
                    f" answered: {listed.status} {listed.outcome[:1000]}"
                )
                return
            await asyncio.sleep(0.5)

    async def _until(self, offset: float) -> None:
        delay = self._start + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def _outcome(response: httpx.Response) -> str:
    try:
        document = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(document, dict):
        if "windows" in document:
            windows = document["windows"]
            return str([(w.get("route"), w.get("events"), w.get("state")) for w in windows])
        if "flushed" in document:
            return ", ".join(f"{k} {v}" for k, v in document.items())
        value = document.get("status") if response.is_success else document.get("detail")
        return str(value)
    return str(document)[:200]


def _with(answer: Answer, **changes: Any) -> Answer:
    return dataclasses.replace(answer, **changes)
