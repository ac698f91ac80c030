"""One fault-injection run, from seed to verdict: the plan, the fakes and the processes on one
store, the driver, the judge, and a report that says how to run the same schedule again.

`run(store, workdir, seed)` returns a `Run`; `Run.failure()` is the text a failing test shows
(the seed and the command first). The whole report, with the timeline, is written to
test-output/faults/ (and into the test's tmp dir beside the processes' logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.sendgrid import Chaos
from tests.faults.cluster import Cluster, Mark, Slot, StoreServer, app_root
from tests.faults.driver import SETTLE_SECONDS, WINDOWS_SECONDS, Answer, Driver
from tests.faults.judge import Email, Verdict, Violation, judge
from tests.faults.plan import (
    CLAIM_LEASE_SECONDS,
    DIGEST_MAX_ITEMS,
    DIGEST_WINDOW_SECONDS,
    RATE_MAX,
    RATE_PER_SECONDS,
    RECIPIENTS,
    SENDGRID_TIMEOUT,
    Plan,
    Profile,
    make_plan,
    profile_from_environment,
)
from tests.servers import ROOT

REPORTS = ROOT / "test-output" / "faults"
RULES = f"""\
version: 1
routes:
  - name: now
    match: {{prefix: now/}}
    to: [{RECIPIENTS["now"]}]
  - name: batch
    match: {{prefix: batch/}}
    to: [{RECIPIENTS["batch"]}]
    digest: {{window: {DIGEST_WINDOW_SECONDS}s, max_items: {DIGEST_MAX_ITEMS}}}
  - name: rate
    match: {{prefix: rate/}}
    to: [{RECIPIENTS["rate"]}]
    rate: {{max: {RATE_MAX}, per: {RATE_PER_SECONDS}s}}
"""
RUN_BOUND_SECONDS = SETTLE_SECONDS + WINDOWS_SECONDS + 120.0
LOG_AFTER_SECONDS = 3.0  # of a sender's log shown after an acceptance it did not log as sent
TIMELINE_AROUND = 6.0  # seconds of timeline shown either side of a violation's emails
SHOWN_VIOLATIONS = 8  # in the failure message; the report file has all of them

# Each run's one-line summary, for the terminal summary (conftest.py).
summaries: list[str] = []


def seeds() -> list[int]:
    """FAULT_SEED (one, or a comma-separated list) to repeat a run; else fresh seeds: one, or
    CHAOS_SEEDS of them under FAULT_PROFILE=chaos."""
    given = os.environ.get("FAULT_SEED", "").strip()
    if given:
        return [int(part) for part in given.split(",") if part.strip()]
    chaos = os.environ.get("FAULT_PROFILE", "").lower() == "chaos"
    count = int(os.environ.get("CHAOS_SEEDS", "5")) if chaos else 1
    return [secrets.randbelow(2**31) for _ in range(count)]


def service_env(store: StoreServer, workdir: Path, api_key: str) -> dict[str, str]:
    rules = workdir / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    return {
        "NOTIFIER": "sendgrid",
        "SENDGRID_API_KEY": api_key,
        "SENDGRID_TIMEOUT": f"{SENDGRID_TIMEOUT:g}",
        "NOTIFY_FROM": "notifier@example.com",
        "NOTIFY_RULES": str(rules),
        "IDEMPOTENCY_STORE": store.url,
        "CLAIM_LEASE_SECONDS": f"{CLAIM_LEASE_SECONDS:g}",
        # As on Cloud Run: windows go out only by the suite's Scheduler-like flushes.
        "DIGEST_FLUSH_SECONDS": "0",
        "DEAD_LETTER_DIR": str(workdir / "dead-letter"),
        "OUTBOX_DIR": str(workdir / "outbox"),
        "LOG_LEVEL": "INFO",
    }


def chaos_for(seed: int, slot: int) -> Chaos:
    """The fake SendGrid's fates: latency 0 to 1 s for what it accepts, and nothing answered
    later than 1.5 s after the request (so a short freeze of the sender, or a busy machine, never
    turns an accepted send into the sender's timeout); 5xx, 429, a proxy's 502, hangs past the
    2 s client timeout and answers that come too late (2 to 3 s, dropped)."""
    return Chaos(
        f"{seed}:{slot}",
        latency=(0.0, 1.0),
        error=0.08,
        rate_limited=0.05,
        bad_gateway=0.02,
        hang=0.05,
        slow=0.05,
        slow_seconds=(SENDGRID_TIMEOUT, 3.0),
        answer_within=SENDGRID_TIMEOUT - 0.5,
    )


@dataclass(slots=True)
class Run:
    store: str
    plan: Plan
    cluster: Cluster
    driver: Driver
    verdict: Verdict | None
    seconds: float
    workdir: Path
    problems: list[str] = field(default_factory=list)
    report_path: Path | None = None
    saved_logs: dict[Path, Path] = field(default_factory=dict)  # a failed run's, kept

    @property
    def ok(self) -> bool:
        return not self.problems and self.verdict is not None and self.verdict.ok

    def rerun(self) -> str:
        test = f"tests/faults/test_{self.store}.py"
        env = [f"FAULT_SEED={self.plan.seed}"]
        for name in ("FAULTS_APP_ROOT", "FAULT_PROFILE", "CHAOS_EVENTS", "CHAOS_SECONDS"):
            if os.environ.get(name):
                env.append(f"{name}={shlex.quote(os.environ[name])}")
        return f"{' '.join(env)} .venv/bin/python -m pytest {test}"

    def summary(self) -> str:
        verdict = self.verdict
        counts = (
            f"{len(verdict.emails)} emails, {verdict.answered}/{len(self.plan.changes)} changes "
            f"answered 2xx, {len(verdict.excused)} duplicate(s) excused by a kill, "
            f"{len(verdict.violations)} violation(s)"
            if verdict
            else "not judged"
        )
        phases = ", ".join(f"{name} at {value:.1f} s" for name, value in self.driver.phases.items())
        problems = f", {len(self.problems)} harness problem(s)" if self.problems else ""
        return (
            f"{self.store} seed {self.plan.seed}: {'ok' if self.ok else 'FAILED'} in "
            f"{self.seconds:.1f} s ({phases}); {counts}{problems}"
        )

    def failure(self, shown: int | None = SHOWN_VIOLATIONS) -> str:
        lines = [
            f"fault-injection run FAILED, seed {self.plan.seed}; run it again with:",
            f"  {self.rerun()}",
            self.summary(),
        ]
        if self.report_path is not None and shown is not None:
            lines.append(f"full report: {self.report_path}")
        if self.problems:
            lines.append("harness problems (not the service's violations):")
            lines += [f"  {problem}" for problem in self.problems[:20]]
        if self.verdict is not None:
            violations = self.verdict.violations[:shown]
            lines += [self._violation(violation) for violation in violations]
            if len(self.verdict.violations) > len(violations):
                lines.append(f"... and {len(self.verdict.violations) - len(violations)} more")
        return "\n".join(lines)

    def report(self) -> str:
        timeline = self.cluster.timeline
        lines = [self.failure(None) if not self.ok else self.summary(), "", self.plan.describe()]
        if self.verdict is not None:
            lines.append("answers: " + str(self.verdict.statuses))
            for slot in self.cluster.slots:
                lines.append(f"fake SendGrid of slot {slot.index}: {dict(slot.chaos.fates)}")
            if self.verdict.excused:
                lines.append("duplicates excused by a kill:")
                lines += [
                    f"  {pardon.change.label}: {pardon.first.describe(self.cluster)}; killed "
                    f"{timeline.offset(pardon.kill.ended or 0)}; again: "
                    f"{pardon.again.describe(self.cluster)}"
                    for pardon in self.verdict.excused
                ]
        lines += ["", "timeline:"] + [timeline.show(mark) for mark in timeline.marks()]
        lines += ["", "process logs:"] + [
            f"  {incarnation.name}: "
            f"{self.saved_logs.get(incarnation.service.log_path, incarnation.service.log_path)}"
            for slot in self.cluster.slots
            for incarnation in slot.incarnations
        ]
        return "\n".join(lines) + "\n"

    def _violation(self, violation: Violation) -> str:
        timeline = self.cluster.timeline
        lines = [f"- {violation.kind.upper()}: {violation.detail}"]
        if violation.changes:
            labels = ", ".join(change.label for change in violation.changes[:12])
            more = len(violation.changes) - 12
            lines.append(f"    changes: {labels}" + (f" and {more} more" if more > 0 else ""))
        for number, email in enumerate(violation.emails, start=1):
            lines.append(f"    copy {number}: {email.describe(self.cluster)}")
            lines.append(f"      sender's log: {_logged(email)}")
        lines += [f"    {line}" for line in self._answers(violation.answers)]
        moments = [email.accepted for email in violation.emails] or [
            answer.answered for answer in violation.answers
        ]
        if moments:
            start, end = min(moments) - TIMELINE_AROUND, max(moments) + TIMELINE_AROUND
            near = [mark for mark in timeline.marks() if start <= mark.at <= end]
            lines.append("    timeline around it:")
            lines += [f"      {timeline.show(mark)}" for mark in _faults_only(near)]
        return "\n".join(lines)

    def _answers(self, answers: list[Answer]) -> list[str]:
        """Every answer, in order; a run of 409s (another delivery holds the claim) as one line."""
        offset = self.cluster.timeline.offset
        lines: list[str] = []
        busy: list[Answer] = []
        for answer in [*sorted(answers, key=lambda answer: answer.answered), None]:
            if answer is not None and answer.status == 409:
                busy.append(answer)
                continue
            if busy:
                lines.append(
                    f"answers {offset(busy[0].answered)} to {offset(busy[-1].answered)}: "
                    f"{len(busy)} x 409 ({busy[0].outcome})"
                )
                busy = []
            if answer is not None:
                extra = " (extra duplicate)" if answer.extra else ""
                lines.append(
                    f"answer {offset(answer.answered)} (sent {offset(answer.sent)}) by "
                    f"{answer.incarnation}: {answer.status} {answer.outcome}{extra}"
                )
        return lines


def _faults_only(marks: list[Mark]) -> list[Mark]:
    return [mark for mark in marks if not mark.what.startswith("faults begin")]


def _logged(email: Email) -> str:
    """What the sending process logged about this message id: whether its done mark was
    written (the service logs "notification sent"/"digest sent" after it), a warning, nothing."""
    if email.incarnation is None:
        return "no process"
    try:
        text = email.incarnation.service.output()
    except OSError:
        return "log unreadable"
    lines = [line for line in text.splitlines() if email.message_id in line]
    if lines:
        return " | ".join(textwrap.shorten(line, 300) for line in lines[:3])
    # Not logged as sent: what went wrong in that process just after SendGrid accepted.
    after = [
        f"{entry.get('severity')} {entry.get('message')!r} {entry.get('reason', '')}".strip()
        for entry in _log_entries(text)
        if entry.get("severity") in ("WARNING", "ERROR", "CRITICAL")
        and email.accepted - 0.2 <= _moment(entry) <= email.accepted + LOG_AFTER_SECONDS
    ]
    said = "; ".join(after[:4]) if after else "no warning"
    return f"the message id is not in its log (no done mark logged); then: {said}"


def _log_entries(text: str) -> list[dict[str, Any]]:
    entries = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def _moment(entry: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(entry.get("time"))).timestamp()
    except ValueError:
        return 0.0


def run(store: StoreServer, workdir: Path, seed: int, profile: Profile | None = None) -> Run:
    slots_wanted = 1 if store.name == "sqlite" else 3
    profile = profile or profile_from_environment(slots_wanted, store.faults)
    plan = make_plan(seed, profile)
    api_key = f"SG.{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(32)}"
    env = service_env(store, workdir, api_key)
    slots = [Slot(index, env, workdir, chaos_for(seed, index)) for index in range(profile.slots)]
    cluster = Cluster(slots, store)
    started = time.monotonic()
    problems: list[str] = []
    verdict = None
    driver = Driver(plan, cluster)
    try:
        for slot in slots:
            slot.open_fake()
        with ThreadPoolExecutor(len(slots)) as pool:
            list(pool.map(lambda slot: slot.start(cluster.timeline), slots))
        asyncio.run(_drive(driver))
    except Exception as error:
        problems.append(f"the run stopped: {type(error).__name__}: {error}")
    finally:
        _lift_everything(cluster)
    problems += driver.problems
    if driver.phases:
        verdict = judge(plan, cluster, driver, workdir / "dead-letter")
    result = Run(
        store.name, plan, cluster, driver, verdict, time.monotonic() - started, workdir, problems
    )
    result.report_path = _write_report(result)
    summaries.append(result.summary())
    return result


async def _drive(driver: Driver) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(limits=limits) as client:
        driver.client = client
        # Every wait of the driver has its own bound; this one keeps a bug of the harness from
        # holding the test suite up.
        await asyncio.wait_for(driver.run(), driver.plan.profile.seconds + RUN_BOUND_SECONDS)


def _lift_everything(cluster: Cluster) -> None:
    """Whatever happened: the store runs and takes writes, every process is stopped."""
    store = cluster.store
    if "pause" in store.faults:
        with contextlib.suppress(OSError):
            store.resume()
    if "refuse" in store.faults:
        with contextlib.suppress(Exception):  # the store may be gone already
            store.accept_writes()
    for slot in cluster.slots:
        slot.close(cluster.timeline)


def _write_report(result: Run) -> Path:
    """test-output/faults/STORE-seedN-TIME.txt; a failed run's process logs beside it (pytest
    keeps only its last few tmp dirs)."""
    stem = f"{result.store}-seed{result.plan.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    REPORTS.mkdir(parents=True, exist_ok=True)
    if not result.ok:
        logs = REPORTS / f"{stem}-logs"
        logs.mkdir(exist_ok=True)
        for slot in result.cluster.slots:
            for incarnation in slot.incarnations:
                source = incarnation.service.log_path
                if source.is_file():
                    target = (
                        logs / f"slot{slot.index}-{incarnation.number}-pid{incarnation.pid}.log"
                    )
                    shutil.copyfile(source, target)
                    result.saved_logs[source] = target
    text = result.report()
    (result.workdir / "fault-report.txt").write_text(text, encoding="utf-8")
    path = REPORTS / f"{stem}.txt"
    path.write_text(text, encoding="utf-8")
    return path


def app_under_test() -> str:
    root = app_root()
    return "this checkout" if root == ROOT.resolve() else str(root)
