"""The schedule of one fault-injection run, drawn from one seed: the changes, when each is
delivered (and delivered again), the Scheduler-like flushes, and every fault, at offsets in
seconds from the start of the run. The same seed gives the same plan; only the interleavings of
the real processes vary between runs.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.factories import binary, object_data

BUCKET = "fault-bucket"
FINALIZED = "google.cloud.storage.object.v1.finalized"
DELETED = "google.cloud.storage.object.v1.deleted"

# The three routes of the rules file (harness.RULES), each on its own prefix and recipient.
NOW, BATCH, RATE = "now", "batch", "rate"
ROUTES = (NOW, BATCH, RATE)
RECIPIENTS = {route: f"{route}@example.com" for route in ROUTES}

# The service's settings the plan's times are drawn against (harness.service_env sets them).
SENDGRID_TIMEOUT = 2.0
CLAIM_LEASE_SECONDS = 8.0
# The routes' (harness.RULES): a 2 s digest window listing up to 1,000 names; 3 emails per 4 s,
# the rest of a period in its digest, which lists up to 100 names (RATE_DIGEST_ITEMS in
# app/rules/routing.py): a plan keeps well below that, so every change is listed by name.
DIGEST_WINDOW_SECONDS = 2
DIGEST_MAX_ITEMS = 1000
RATE_MAX = 3
RATE_PER_SECONDS = 4
RATE_EVENTS_PER_PERIOD = 30


@dataclass(frozen=True, slots=True)
class Change:
    """One storage change: what the judge expects to find in exactly one email of its route."""

    index: int
    route: str
    event_type: str
    name: str
    generation: int

    @property
    def short(self) -> str:
        """`finalized`, `deleted`: as the emails name the event."""
        return self.event_type.rsplit(".", 1)[1]

    @property
    def label(self) -> str:
        return f"{self.short} {self.name}"

    def request(self, event_id: str) -> tuple[dict[str, str], bytes]:
        """An Eventarc delivery of this change (binary mode), with the given CloudEvent id."""
        overrides: dict[str, Any] = {
            "generation": str(self.generation),
            "id": f"{BUCKET}/{self.name}/{self.generation}",
        }
        if self.event_type == DELETED:
            overrides["timeDeleted"] = "2020-04-23T08:00:00.000Z"
        data = object_data(bucket=BUCKET, name=self.name, **overrides)
        return binary(data, self.event_type, event_id)


# ---- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deliver:
    """POST the change to a live process, again after every answer that is not 2xx. `after_ack`:
    an extra duplicate, sent once an earlier delivery of the change was answered 2xx; else it
    goes at `at` whatever else is under way (Eventarc's own duplicates can overlap)."""

    at: float
    change: int
    event_id: str
    extra: bool = False
    after_ack: bool = False


@dataclass(frozen=True, slots=True)
class Flush:
    """Cloud Scheduler's POST /digests/flush, to each of `slots` at once."""

    at: float
    slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Kill:
    """SIGKILL, then a new process in the slot `down_for` seconds later."""

    at: float
    slot: int
    down_for: float


@dataclass(frozen=True, slots=True)
class Terminate:
    """SIGTERM (Cloud Run's scale-in: SIGKILL if it has not exited 10 s later), then a new process
    `down_for` seconds after it exited."""

    at: float
    slot: int
    down_for: float


@dataclass(frozen=True, slots=True)
class Freeze:
    """CPU throttled between requests: route nothing more to the slot, wait until it has answered
    everything, SIGSTOP it for `seconds` (longer than the lease), SIGCONT."""

    at: float
    slot: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Hiccup:
    """A short SIGSTOP (a GC pause, a noisy neighbour) at any moment, requests in flight or not."""

    at: float
    slot: int
    seconds: float


@dataclass(frozen=True, slots=True)
class PauseStore:
    """SIGSTOP the store's server (redis-server, the emulator's JVM) for `seconds`."""

    at: float
    seconds: float


@dataclass(frozen=True, slots=True)
class RefuseWrites:
    """The store refuses writes for `seconds` (Redis: maxmemory 1, noeviction)."""

    at: float
    seconds: float


Action = Deliver | Flush | Kill | Terminate | Freeze | Hiccup | PauseStore | RefuseWrites
ProcessFault = Kill | Terminate | Freeze


@dataclass(frozen=True, slots=True)
class Profile:
    """How much happens in one run. `seconds`: how long the faults go on; the run then lifts them
    and waits for every change to be answered 2xx and every window to go out."""

    events: int = 60
    seconds: float = 18.0
    slots: int = 3
    kills: int = 2
    terminations: int = 1
    freezes: int = 1
    hiccups: int = 5
    store_pauses: int = 2
    store_refusals: int = 3
    flush_gap: float = 1.5  # mean seconds between flushes
    pairs: int = 3  # objects finalized then deleted (two changes of one name)
    extra_duplicates: float = 0.25  # share of changes delivered once more
    overlapping_duplicates: float = 0.3  # share of those sent without waiting for the first

    def scaled(self, **changes: Any) -> Profile:
        return dataclasses.replace(self, **changes)


QUICK = Profile()
# make chaos: longer, more of everything; CHAOS_EVENTS and CHAOS_SECONDS size it.
CHAOS = Profile(
    events=400,
    seconds=90.0,
    kills=8,
    terminations=3,
    freezes=3,
    hiccups=24,
    store_pauses=8,
    store_refusals=8,
    pairs=15,
)


def profile_from_environment(slots: int, store_faults: frozenset[str]) -> Profile:
    """QUICK (make test) or CHAOS (FAULT_PROFILE=chaos, make chaos), sized by CHAOS_EVENTS and
    CHAOS_SECONDS, for `slots` processes and the faults this store supports."""
    chaos = os.environ.get("FAULT_PROFILE", "").lower() == "chaos"
    base = CHAOS if chaos else QUICK
    events = int(os.environ.get("CHAOS_EVENTS", base.events)) if chaos else base.events
    seconds = float(os.environ.get("CHAOS_SECONDS", base.seconds)) if chaos else base.seconds
    scale = seconds / base.seconds

    def scaled(count: int) -> int:
        return max(0, round(count * scale))

    return base.scaled(
        events=events,
        seconds=seconds,
        slots=slots,
        kills=scaled(base.kills),
        terminations=scaled(base.terminations),
        # A long freeze only matters beside another process that could take over its work.
        freezes=scaled(base.freezes) if slots > 1 else 0,
        hiccups=scaled(base.hiccups),
        store_pauses=scaled(base.store_pauses) if "pause" in store_faults else 0,
        store_refusals=scaled(base.store_refusals) if "refuse" in store_faults else 0,
        pairs=min(base.pairs, events // 4),
    )


@dataclass(frozen=True, slots=True)
class Plan:
    seed: int
    profile: Profile
    changes: tuple[Change, ...]
    actions: tuple[Action, ...]  # in order of `at`

    def of_type(self, kind: type[Any]) -> Iterator[Any]:
        return (action for action in self.actions if isinstance(action, kind))

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for action in self.actions:
            name = type(action).__name__
            if isinstance(action, Deliver) and action.extra:
                name = "Deliver (extra duplicate)"
            counts[name] = counts.get(name, 0) + 1
        by_route = {route: sum(c.route == route for c in self.changes) for route in ROUTES}
        return (
            f"seed {self.seed}: {len(self.changes)} changes {by_route} over "
            f"{self.profile.seconds:g} s on {self.profile.slots} process(es); "
            + ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
        )


def make_plan(seed: int, profile: Profile) -> Plan:
    per_period = profile.events / len(ROUTES) * RATE_PER_SECONDS / (profile.seconds * 0.85)
    if per_period > RATE_EVENTS_PER_PERIOD:
        raise ValueError(
            f"{profile.events} events in {profile.seconds:g} s make about {per_period:.0f} rate "
            f"route events a period, over {RATE_EVENTS_PER_PERIOD}: its digest could not list "
            "them all; give more seconds (CHAOS_SECONDS)"
        )
    draw = random.Random(seed)
    span = profile.seconds
    changes, deliveries = _changes(draw, profile)
    actions: list[Action] = [*deliveries, *_flushes(draw, profile)]
    actions += _process_faults(draw, profile)
    actions += [
        Hiccup(round(draw.uniform(0.5, span), 3), draw.randrange(profile.slots), _hiccup(draw))
        for _ in range(profile.hiccups)
    ]
    actions += _store_faults(draw, profile)
    actions.sort(key=lambda action: action.at)
    return Plan(seed, profile, tuple(changes), tuple(actions))


def _event_id(draw: random.Random) -> str:
    return f"{draw.getrandbits(128):032x}"


def _changes(draw: random.Random, profile: Profile) -> tuple[list[Change], list[Deliver]]:
    changes: list[Change] = []
    deliveries: list[Deliver] = []
    # Events arrive over the first 85% of the run, so the last ones meet faults too.
    last = profile.seconds * 0.85
    paired = set(draw.sample(range(profile.events), profile.pairs))
    for index in range(profile.events):
        route = draw.choice(ROUTES)
        change = Change(
            index=len(changes),
            route=route,
            event_type=FINALIZED,
            name=f"{route}/e{index:04d}.txt",
            generation=1_700_000_000_000_000 + index,
        )
        at = round(draw.uniform(0.0, last), 3)
        changes.append(change)
        deliveries.append(Deliver(at, change.index, _event_id(draw)))
        if index in paired:
            deleted = dataclasses.replace(change, index=len(changes), event_type=DELETED)
            changes.append(deleted)
            deliveries.append(Deliver(round(at + draw.uniform(0.1, 2.0), 3), deleted.index, ""))
    deliveries = [
        dataclasses.replace(d, event_id=d.event_id or _event_id(draw)) for d in deliveries
    ]
    extras: list[Deliver] = []
    for first in deliveries:
        if draw.random() >= profile.extra_duplicates:
            continue
        overlapping = draw.random() < profile.overlapping_duplicates
        later = draw.uniform(0.0, 0.3) if overlapping else draw.uniform(0.5, 6.0)
        # Cloud Storage may publish one change as two messages: sometimes another id.
        event_id = _event_id(draw) if draw.random() < 0.5 else first.event_id
        extras.append(
            Deliver(round(first.at + later, 3), first.change, event_id, True, not overlapping)
        )
    return changes, deliveries + extras


def _flushes(draw: random.Random, profile: Profile) -> list[Flush]:
    flushes: list[Flush] = []
    at = draw.uniform(0.5, profile.flush_gap)
    while at < profile.seconds:
        slots = profile.slots
        if draw.random() < 0.25:  # two at once, on two processes when there are two
            pair = draw.sample(range(slots), 2) if slots > 1 else [0, 0]
            flushes.append(Flush(round(at, 3), tuple(pair)))
        else:
            flushes.append(Flush(round(at, 3), (draw.randrange(slots),)))
        at += draw.expovariate(1 / profile.flush_gap)
    return flushes


def _hiccup(draw: random.Random) -> float:
    return round(draw.uniform(0.1, 0.5), 3)


def _process_faults(draw: random.Random, profile: Profile) -> list[ProcessFault]:
    """Kills, terminations and long freezes, at most one at a time per slot (with room for the
    restart), drawn at random times; one that finds no room is left out."""
    busy: dict[int, list[tuple[float, float]]] = {slot: [] for slot in range(profile.slots)}
    faults: list[ProcessFault] = []
    # The longest first, while there is room for them.
    wanted = ["freeze"] * profile.freezes + ["terminate"] * profile.terminations
    wanted += ["kill"] * profile.kills
    for kind in wanted:
        for _ in range(50):
            slot = draw.randrange(profile.slots)
            if kind == "freeze":
                seconds = round(CLAIM_LEASE_SECONDS + draw.uniform(1.0, 3.0), 3)
                at = round(draw.uniform(1.0, max(1.0, profile.seconds - seconds)), 3)
                fault: ProcessFault = Freeze(at, slot, seconds)
                # Draining first may take a send's timeout, and the thaw a moment.
                start, end = at, at + SENDGRID_TIMEOUT + seconds + 2.0
            else:
                at = round(draw.uniform(1.0, profile.seconds - 1.0), 3)
                down = round(draw.uniform(0.3, 2.5), 3)
                if kind == "kill":
                    fault = Kill(at, slot, down)
                    start, end = at, at + down + 4.0  # start-up of the next process
                else:
                    fault = Terminate(at, slot, down)
                    # Draining takes a send or a flush; a start-up follows.
                    start, end = at, at + 4.0 + down + 4.0
            if all(end < s or start > e for s, e in busy[slot]):
                busy[slot].append((start, end))
                faults.append(fault)
                break
    return faults


def _store_faults(draw: random.Random, profile: Profile) -> list[PauseStore | RefuseWrites]:
    """Store pauses and write refusals of 1 to 3 s, never two at once."""
    busy: list[tuple[float, float]] = []
    faults: list[PauseStore | RefuseWrites] = []
    wanted = ["pause"] * profile.store_pauses + ["refuse"] * profile.store_refusals
    for kind in wanted:
        for _ in range(50):
            seconds = round(draw.uniform(1.0, 3.0), 3)
            at = round(draw.uniform(0.5, profile.seconds - seconds), 3)
            if all(at + seconds + 0.5 < s or at > e + 0.5 for s, e in busy):
                busy.append((at, at + seconds))
                faults.append(
                    PauseStore(at, seconds) if kind == "pause" else RefuseWrites(at, seconds)
                )
                break
    return faults
