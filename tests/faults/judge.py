"""The verdict of one run, from the outside only: what each fake SendGrid accepted (which slot
sent it, and when) and what the service answered.

- Every change answered 2xx is in exactly one email: one immediate email (route `now`), one
  digest (route `batch`), one of the two (route `rate`); never in an email of another kind.
- No digest lists a change twice, and its footer's count is the number of changes it lists.
- A second copy is allowed only where an earlier copy was accepted by a process SIGKILLed
  shortly after (before it could mark the change done), the second copy being sent after the
  kill: at most one such copy per (kill, change). These are counted apart, not as violations.
  "Shortly": KILL_GRACE seconds, plus any time in which that process was stopped or the store
  paused or refusing writes (a done mark waits for those).
- Nothing is dead-lettered, and nothing is answered 500.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.cluster import Cluster, Incarnation, Slot, last_error
from tests.faults.driver import Answer, Driver
from tests.faults.plan import BATCH, BUCKET, NOW, RATE, RECIPIENTS, Change, Plan

KILL_GRACE = 2.0
ACCEPT_RACE = 1.0  # an answer the fake wrote as the process died counts as accepted before it

_IMMEDIATE_SUBJECT = re.compile(r"^\[gs://(?P<bucket>[^\]]+)\] (?P<event>\w+): (?P<name>\S+)$")
_DIGEST_ITEM = re.compile(r"^- (?P<event>\w+) gs://(?P<bucket>[^/\s]+)/(?P<name>[^,\s]+)")
_DIGEST_FOOTER = re.compile(r"as a digest of (?P<count>[\d,]+) changes?")
_ROUTE_OF = {address: route for route, address in RECIPIENTS.items()}


@dataclass(frozen=True, slots=True)
class Email:
    """One email a fake accepted (202)."""

    slot: int
    incarnation: Incarnation | None
    message_id: str
    received: float
    accepted: float
    route: str | None
    digest: bool
    items: tuple[tuple[str, str], ...]  # (event, object name) of each change it tells of
    count: int | None  # a digest's own count of its changes
    subject: str

    @property
    def sender(self) -> str:
        return self.incarnation.name if self.incarnation else f"slot {self.slot} (no process?)"

    def describe(self, cluster: Cluster) -> str:
        kind = f"digest of {len(self.items)}" if self.digest else "immediate email"
        return (
            f"{kind} to route {self.route}, accepted {cluster.timeline.offset(self.accepted)} "
            f"(request {cluster.timeline.offset(self.received)}) from {self.sender}, "
            f"message id {self.message_id}"
        )


@dataclass(frozen=True, slots=True)
class Excused:
    change: Change
    first: Email
    again: Email
    kill: Incarnation


@dataclass(slots=True)
class Violation:
    kind: str
    detail: str
    changes: list[Change] = field(default_factory=list)
    emails: list[Email] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)


@dataclass(slots=True)
class Verdict:
    violations: list[Violation]
    excused: list[Excused]
    emails: list[Email]
    answered: int  # changes answered 2xx
    statuses: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.violations


def judge(plan: Plan, cluster: Cluster, driver: Driver, dead_letters: Path) -> Verdict:
    emails = sorted(
        (email for slot in cluster.slots for email in _emails(slot)),
        key=lambda email: email.accepted,
    )
    violations: list[Violation] = []
    excused: list[Excused] = []
    by_item: dict[tuple[str, str], list[Email]] = defaultdict(list)
    for email in emails:
        violations += _malformed(email)
        for item in email.items:
            by_item[item].append(email)
    known = {(change.short, change.name) for change in plan.changes}
    for item, copies in sorted(by_item.items()):
        if item not in known:
            violations.append(
                Violation("unknown change", f"{item} is no change of the plan", emails=copies)
            )
    answered = 0
    for change in plan.changes:
        answers = driver.answers.get(change.index, [])
        acked = any(answer.ok for answer in answers)
        answered += acked
        copies = by_item.get((change.short, change.name), [])
        found, pardons = _judge_change(change, copies, acked, answers, cluster)
        violations += found
        excused += pardons
    for change_index, answers in sorted(driver.answers.items()):
        for answer in answers:
            if answer.status == 500 or answer.outcome == "dead-lettered":
                change = plan.changes[change_index]
                violations.append(
                    Violation(
                        f"answered {answer.status} {answer.outcome}",
                        "a bug (500) or a dead letter, neither of which these faults excuse",
                        [change],
                        answers=[answer],
                    )
                )
    for answer in driver.flushes:
        if answer.status == 500:
            violations.append(Violation("flush answered 500", answer.outcome, answers=[answer]))
    for process in driver.crashes:
        code = process.service.process.returncode if process.service.process else None
        said = last_error(process.service.output())
        violations.append(
            Violation(
                "process exited by itself",
                f"{process.name}, exit code {code}; the last error in its log: {said}",
            )
        )
    letters = sorted(path.name for path in dead_letters.glob("*")) if dead_letters.is_dir() else []
    if letters:
        violations.append(
            Violation("dead-lettered", f"{len(letters)} file(s) in DEAD_LETTER_DIR: {letters}")
        )
    statuses: dict[str, int] = defaultdict(int)
    for answers in driver.answers.values():
        for answer in answers:
            statuses[_status_key(answer)] += 1
    return Verdict(_grouped(violations), excused, emails, answered, dict(sorted(statuses.items())))


def _judge_change(
    change: Change,
    copies: Sequence[Email],
    acked: bool,
    answers: list[Answer],
    cluster: Cluster,
) -> tuple[list[Violation], list[Excused]]:
    violations: list[Violation] = []
    wrong = [
        email
        for email in copies
        if email.route != change.route
        or (change.route == NOW and email.digest)
        or (change.route == BATCH and not email.digest)
    ]
    if wrong:
        violations.append(
            Violation(
                "wrong email",
                f"a change of route {change.route} in an email of another route or kind",
                [change],
                list(wrong),
                answers,
            )
        )
    if not copies:
        if acked:
            violations.append(
                Violation("lost", "answered 2xx but in no email", [change], answers=answers)
            )
        else:
            violations.append(
                Violation("never answered 2xx", "and in no email", [change], answers=answers)
            )
        return violations, []
    if not acked:
        violations.append(
            Violation(
                "never answered 2xx",
                "emailed, but no delivery was answered 2xx",
                [change],
                list(copies),
                answers,
            )
        )
    excused: list[Excused] = []
    unexcused: list[Email] = []
    kills_used: set[int] = set()
    for position, again in enumerate(copies[1:], start=1):
        pardon = None
        for first in copies[:position]:
            kill = _killed_before_done(first, cluster)
            if (
                kill is not None
                and id(kill) not in kills_used
                and kill.ended is not None
                and again.received > kill.ended
            ):
                pardon = Excused(change, first, again, kill)
                kills_used.add(id(kill))
                break
        if pardon is None:
            unexcused.append(again)
        else:
            excused.append(pardon)
    if unexcused:
        what = {NOW: "immediate email", BATCH: "digest", RATE: "email"}[change.route]
        violations.append(
            Violation(
                "duplicate",
                f"the same change in {len(copies)} accepted emails ({what} of route "
                f"{change.route}); {len(excused)} excused by a kill",
                [change],
                list(copies),
                answers,
            )
        )
    return violations, excused


def _killed_before_done(email: Email, cluster: Cluster) -> Incarnation | None:
    """The sender's process, if it was SIGKILLed soon enough after this acceptance that it may
    not have marked the change done."""
    process = email.incarnation
    if process is None or not process.killed or process.ended is None:
        return None
    killed = process.ended
    if killed < email.accepted - ACCEPT_RACE:
        return None
    grace = KILL_GRACE + cluster.stalled(email.slot, email.accepted, killed)
    return process if killed - email.accepted <= grace else None


def _emails(slot: Slot) -> Iterable[Email]:
    """What the slot's fake accepted, read the way a person reads the emails: the route from
    the recipient, an immediate email's change from its subject, a digest's from its list."""
    for record in slot.fake.requests():
        if not record.delivered or not isinstance(record.body, dict):
            continue
        body: dict[str, Any] = record.body
        recipients = {
            to["email"]
            for personalization in body.get("personalizations", [])
            for to in personalization.get("to", [])
        }
        routes = {_ROUTE_OF.get(address) for address in recipients}
        route = routes.pop() if len(routes) == 1 else None
        text = next(
            (part["value"] for part in body.get("content", []) if part["type"] == "text/plain"),
            "",
        )
        subject = str(body.get("subject", ""))
        footer = _DIGEST_FOOTER.search(text)
        if footer is not None:
            items = tuple(
                (match["event"], match["name"])
                for line in text.splitlines()
                if (match := _DIGEST_ITEM.match(line)) and match["bucket"] == BUCKET
            )
            count: int | None = int(footer["count"].replace(",", ""))
        else:
            match = _IMMEDIATE_SUBJECT.match(subject)
            items = ((match["event"], match["name"]),) if match else ()
            count = None
        yield Email(
            slot=slot.index,
            incarnation=_sender(slot.incarnations, record.received_at),
            message_id=record.message_id or "?",
            received=record.received_at,
            accepted=record.answered_at or record.received_at,
            route=route,
            digest=footer is not None,
            items=items,
            count=count,
            subject=subject,
        )


def _sender(incarnations: list[Incarnation], received: float) -> Incarnation | None:
    """The slot's process that sent a request: the last one started before it arrived."""
    started = [one for one in incarnations if one.started <= received]
    return started[-1] if started else None


def _malformed(email: Email) -> list[Violation]:
    problems = []
    if email.route is None:
        problems.append("its recipients are not one route's")
    if not email.items:
        problems.append("it names no change the suite can read")
    if email.digest and email.count != len(email.items):
        problems.append(f"it says {email.count} changes but lists {len(email.items)}")
    if len(set(email.items)) != len(email.items):
        problems.append("it lists a change twice")
    return [Violation("malformed email", "; ".join(problems), emails=[email])] if problems else []


def _grouped(violations: list[Violation]) -> list[Violation]:
    """Duplicates of one pair of emails (a digest sent twice) are one violation listing every
    change of it, not one per change."""
    merged: dict[tuple[str, tuple[str, ...]], Violation] = {}
    rest: list[Violation] = []
    for violation in violations:
        if violation.kind != "duplicate":
            rest.append(violation)
            continue
        key = (violation.kind, tuple(email.message_id for email in violation.emails))
        if key in merged:
            merged[key].changes += violation.changes
        else:
            merged[key] = violation
    return list(merged.values()) + rest


def _status_key(answer: Answer) -> str:
    if answer.status is None:
        return f"no answer ({answer.outcome})"
    if answer.ok:
        return f"{answer.status} {answer.outcome}"
    return str(answer.status)
