"""The suite's own promises, without a service: a seed always gives the same schedule, the fake
SendGrid never accepts what its client gave up on, and the judge tells an excused duplicate (its
sender SIGKILLed right after SendGrid accepted) from any other."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.sendgrid import Chaos, FakeSendGrid, RecordedRequest, Reply
from tests.faults.cluster import Cluster, Incarnation, Slot, SqliteFile
from tests.faults.driver import Answer, Driver
from tests.faults.judge import judge
from tests.faults.plan import QUICK, Deliver, Kill, PauseStore, make_plan
from tests.servers import ServiceProcess


def test_a_seed_gives_the_same_plan_every_time() -> None:
    assert make_plan(7, QUICK) == make_plan(7, QUICK)
    assert make_plan(7, QUICK) != make_plan(8, QUICK)


def test_a_plan_holds_what_the_profile_asks_for() -> None:
    plan = make_plan(3, QUICK.scaled(store_refusals=0))
    assert len([d for d in plan.of_type(Deliver) if not d.extra]) == QUICK.events + QUICK.pairs
    assert len(list(plan.of_type(Kill))) == QUICK.kills
    assert len(list(plan.of_type(PauseStore))) == QUICK.store_pauses
    assert [action.at for action in plan.actions] == sorted(a.at for a in plan.actions)
    names = [change.name for change in plan.changes]
    assert len(set(names)) == QUICK.events  # the pairs: one name, finalized then deleted


def _record(subject: str) -> RecordedRequest:
    return RecordedRequest("POST", "/v3/mail/send", {}, True, {"subject": subject}, 0)


def test_chaos_gives_one_email_s_attempts_the_same_fates_whatever_the_order() -> None:
    def fates(subjects: list[str]) -> dict[str, list[Reply | None]]:
        chaos = Chaos(5, error=0.3, hang=0.2, slow=0.2)
        replies: dict[str, list[Reply | None]] = {}
        for subject in subjects:
            replies.setdefault(subject, []).append(chaos(_record(subject)))
        return replies

    subjects = [f"s{n}" for n in range(20)] * 3
    assert fates(subjects) == fates(list(reversed(subjects)))
    kinds = {reply.kind for replies in fates(subjects).values() for reply in replies if reply}
    assert len(kinds) > 2


def test_a_reply_whose_client_left_during_its_latency_is_never_accepted() -> None:
    with FakeSendGrid() as fake:
        fake.script(
            Reply.normal().after(1.0),
            Reply.drop(0.1),
            Reply.normal().after(0.3).answered_within(0.1),  # a busy machine: too late
        )
        body = {"subject": "x"}
        with pytest.raises(httpx.TimeoutException):
            _send(fake, body, timeout=0.2)
        for _ in range(2):
            with pytest.raises(httpx.RemoteProtocolError):
                _send(fake, body, timeout=5)
        deadline = time.monotonic() + 5
        while any(r.status is None and not r.gone for r in fake.requests()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        records = fake.requests()
    assert fake.accepted() == []
    assert [(r.gone, r.delivered, r.answered_at) for r in records] == [(True, False, None)] * 3


def _send(fake: FakeSendGrid, body: dict[str, Any], timeout: float) -> httpx.Response:
    return httpx.post(
        fake.url + "/v3/mail/send",
        json=body,
        headers={"Authorization": f"Bearer {fake.api_key}"},
        timeout=timeout,
    )


def _mail(fake: FakeSendGrid, to: str, subject: str, text: str) -> None:
    body = {
        "from": {"email": "notifier@example.com"},
        "subject": subject,
        "personalizations": [{"to": [{"email": to}]}],
        "content": [
            {"type": "text/plain", "value": text},
            {"type": "text/html", "value": "<p>x</p>"},
        ],
    }
    assert _send(fake, body, timeout=5).status_code == 202


IMMEDIATE = "gs://fault-bucket/{name} was uploaded.\n\nSent by route now because it matched: x"
DIGEST = (
    "2 changes in gs://fault-bucket under batch/.\n\nObjects:\n"
    "- finalized gs://fault-bucket/batch/x1.txt, 352 bytes, 2020-09-29T11:32:00.123Z\n"
    "- finalized gs://fault-bucket/batch/x2.txt, 352 bytes, 2020-09-29T11:32:00.123Z\n"
    "\nSent by route batch as a digest of 2 changes"
)


def test_the_judge_excuses_a_copy_after_a_kill_once_and_flags_every_other(
    tmp_path: Path,
) -> None:
    plan = make_plan(1, QUICK.scaled(events=12, pairs=0))
    now = [change for change in plan.changes if change.route == "now"]
    assert now
    env = {"SENDGRID_API_KEY": "SG.k.k"}
    slots = [Slot(n, env, tmp_path, Chaos(n)) for n in range(2)]
    cluster = Cluster(slots, SqliteFile(tmp_path / "db"))
    driver = Driver(plan, cluster)
    for slot in slots:
        slot.fake.start()
        service = ServiceProcess({}, tmp_path)
        slot.incarnations.append(Incarnation(slot.index, 1, service, 1000 + slot.index, 0.0))
    try:
        subject = "[gs://fault-bucket] finalized: {name}"
        for change in plan.changes:
            driver.answers[change.index].append(Answer(0, 0, 0, "-", 200, "sent"))
        # Slot 0 sends a change and is killed at once: its one resend by slot 1 is excused.
        for change in now[:1]:
            text = IMMEDIATE.format(name=change.name)
            _mail(slots[0].fake, "now@example.com", subject.format(name=change.name), text)
        slots[0].incarnations[0].ended, slots[0].incarnations[0].ended_by = time.time(), "SIGKILL"
        time.sleep(0.01)
        for _ in range(2):  # a second resend of it is not excused: one per (kill, change)
            for change in now[:1]:
                text = IMMEDIATE.format(name=change.name)
                _mail(slots[1].fake, "now@example.com", subject.format(name=change.name), text)
        _mail(slots[1].fake, "batch@example.com", "[gs://fault-bucket] 2 changes", DIGEST)
    finally:
        for slot in slots:
            slot.fake.stop()
    verdict = judge(plan, cluster, driver, tmp_path / "dead-letter")
    kinds = sorted(violation.kind for violation in verdict.violations)
    assert [pardon.change for pardon in verdict.excused] == now[:1]
    assert "duplicate" in kinds
    [duplicate] = [v for v in verdict.violations if v.kind == "duplicate"]
    assert len(duplicate.emails) == 3
    # Every change of the plan missing from the emails is lost; the digest's unknown names too.
    assert "lost" in kinds
    assert "unknown change" in kinds
