"""Digests end to end (issue 11): the real server, the outbox or the strict fake SendGrid, real
stores (SQLite files, a real redis-server), real processes where a crash or a second instance is
the point.

Windows here are a few seconds long; the service's timer flushes every second, so each test waits
for the window to close and then polls for the email.
"""

from __future__ import annotations

import asyncio
import json
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from pydantic import SecretStr
from redis.asyncio import Redis as AsyncRedis

from app.config import Settings
from app.stores.base import Claim, Lease
from app.stores.redis_claims import RedisStore
from tests.conftest import outbox_settings, read_outbox
from tests.factories import EVENTARC_PATH, binary, object_data
from tests.fakes.oidc import INVOKER, SERVICE_HOST, CertsServer, SigningKey, mint_token
from tests.fakes.sendgrid import FakeSendGrid, Reply
from tests.redis_server import redis_server
from tests.servers import ServiceProcess, ThreadedServer

T = TypeVar("T")
OPS = "ops@example.com"


def rules(tmp_path: Path, route: str) -> Path:
    """A rules file with one route, `reports`, for prefix reports/ to ops@example.com."""
    path = tmp_path / "rules.yaml"
    body = textwrap.indent(textwrap.dedent(route).strip(), "    ")
    path.write_text(
        "version: 1\nroutes:\n  - name: reports\n    match: {prefix: reports/}\n"
        f"    to: [{OPS}]\n{body}\n",
        encoding="utf-8",
    )
    return path


def deliver(url: str, data: dict[str, Any], event_type: str | None = None) -> httpx.Response:
    headers, body = binary(data) if event_type is None else binary(data, event_type)
    return httpx.post(url + EVENTARC_PATH, headers=headers, content=body, timeout=15)


def eventually(probe: Callable[[], T | None], seconds: float = 20) -> T:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"nothing after {seconds} s")


def digest_emails(outbox: Path) -> list[EmailMessage]:
    return [m for m in read_outbox(outbox) if "as a digest of" in text_of(m)]


def alone_subjects(outbox: Path) -> list[str]:
    """The subjects of the emails that told one change alone, in the order they were sent."""
    return [subject(m) for m in read_outbox(outbox) if "as a digest of" not in text_of(m)]


def subject(message: EmailMessage) -> str:
    """The subject as a mail client shows it: Python folds a long one whose first word is long
    onto a continuation line ("Subject:\n [gs://..."), and its parser keeps the space."""
    return str(message["Subject"]).strip()


def text_of(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    content: str = body.get_content()
    return content


def digest_settings(tmp_path: Path, route: str, **overrides: Any) -> Settings:
    return outbox_settings(
        tmp_path,
        notify_rules=rules(tmp_path, route),
        notify_to=[],
        **{"idempotency_store": f"sqlite:///{tmp_path}/state/notifier.db", **overrides},
    )


def flush_when_due(server: ThreadedServer, seconds: float = 20) -> dict[str, int]:
    """POST /digests/flush until it sends a window (the window is due a moment after the last
    event); its answer."""

    def flushed() -> dict[str, int] | None:
        answer = httpx.post(server.url + "/digests/flush", timeout=10)
        assert answer.status_code == 200, answer.text
        counts: dict[str, int] = answer.json()
        return counts if counts["flushed"] else None

    return eventually(flushed, seconds)


# Most tests here run without the service's timer (DIGEST_FLUSH_SECONDS=0): a window stays open
# until a flush claims it, however long the events take to arrive on a busy machine, and the
# test's own POST /digests/flush sends it. The timer has its own tests below.
NO_TIMER = {"digest_flush_seconds": 0}


def test_500_events_in_one_window_become_one_email_with_the_counts_and_100_names(
    tmp_path: Path,
) -> None:
    settings = digest_settings(tmp_path, "digest: {window: 1s, max_items: 100}", **NO_TIMER)
    with ThreadedServer(settings) as server:
        kinds = ["google.cloud.storage.object.v1.finalized"] * 490 + [
            "google.cloud.storage.object.v1.deleted"
        ] * 10
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda pair: deliver(
                        server.url, object_data(name=f"reports/f{pair[0]:03}.csv"), pair[1]
                    ),
                    enumerate(kinds),
                )
            )
        assert {a.status_code for a in answers} == {200}
        assert {a.json()["status"] for a in answers} == {"digested"}
        assert read_outbox(tmp_path / "outbox") == []  # nothing until the window closes
        assert flush_when_due(server) == {
            "flushed": 1,
            "pending": 0,
            "failed": 0,
            "dead_lettered": 0,
            "left": 0,
        }
        [email] = read_outbox(tmp_path / "outbox")
        assert httpx.post(server.url + "/digests/flush", timeout=10).json()["flushed"] == 0
    assert email["To"] == OPS
    assert subject(email) == (
        "[gs://some-bucket] 500 changes under reports/ (490 finalized, 10 deleted)"
    )
    text = text_of(email)
    listed = [line for line in text.splitlines() if "reports/f" in line]
    assert len(listed) == 100
    assert "and 400 more" in text
    assert "as a digest of 500 changes" in text


def test_leading_sends_the_first_event_alone_and_the_rest_in_the_digest(tmp_path: Path) -> None:
    settings = digest_settings(tmp_path, "digest: {window: 1s, leading: true}", **NO_TIMER)
    with ThreadedServer(settings) as server:
        first_data = object_data(name="reports/first.csv")
        first = deliver(server.url, first_data)
        assert first.json()["status"] == "sent"
        [alone] = read_outbox(tmp_path / "outbox")
        assert "reports/first.csv" in subject(alone)
        rest = [deliver(server.url, object_data(name=f"reports/r{i}.csv")) for i in range(4)]
        assert [a.json()["status"] for a in rest] == ["digested"] * 4
        # The leading event's redelivery neither sends it again nor counts it in the digest.
        assert deliver(server.url, first_data).json()["status"] == "duplicate"
        flush_when_due(server)
    [digest] = digest_emails(tmp_path / "outbox")
    assert subject(digest).startswith("[gs://some-bucket] 4 changes under reports/")
    assert "reports/first.csv" not in text_of(digest)
    assert len(read_outbox(tmp_path / "outbox")) == 2


def test_the_same_change_delivered_twice_is_counted_once(tmp_path: Path) -> None:
    settings = digest_settings(tmp_path, "digest: {window: 1s}", **NO_TIMER)
    with ThreadedServer(settings) as server:
        twice = object_data(name="reports/twice.csv")
        answers = [deliver(server.url, twice) for _ in range(2)]
        answers.append(deliver(server.url, object_data(name="reports/once.csv")))
        assert [a.json()["status"] for a in answers] == ["digested", "duplicate", "digested"]
        flush_when_due(server)
        [digest] = read_outbox(tmp_path / "outbox")
    assert subject(digest).startswith("[gs://some-bucket] 2 changes under reports/")


def test_rate_overflow_is_folded_into_one_digest_when_the_period_ends(tmp_path: Path) -> None:
    settings = digest_settings(tmp_path, "rate: {max: 2, per: 2s}", **NO_TIMER)
    with ThreadedServer(settings) as server:
        changes = [object_data(name=f"reports/r{i}.csv") for i in range(5)]
        answers = [deliver(server.url, data) for data in changes]
        assert [a.json()["status"] for a in answers] == ["sent"] * 2 + ["digested"] * 3
        assert len(read_outbox(tmp_path / "outbox")) == 2
        # Redeliveries, of one sent alone and of one held: neither is emailed again nor alone.
        assert deliver(server.url, changes[0]).json()["status"] == "duplicate"
        assert deliver(server.url, changes[2]).json()["status"] == "duplicate"
        flush_when_due(server)
        [digest] = digest_emails(tmp_path / "outbox")
        assert len(read_outbox(tmp_path / "outbox")) == 3
        # The period is over: a held event's redelivery is still not emailed alone, and the
        # next new event goes out at once.
        assert deliver(server.url, changes[3]).json()["status"] == "duplicate"
        assert deliver(server.url, object_data(name="reports/new.csv")).json()["status"] == "sent"
        assert len(read_outbox(tmp_path / "outbox")) == 4
    assert subject(digest).startswith("[gs://some-bucket] 3 changes under reports/")
    for name in ("reports/r2.csv", "reports/r3.csv", "reports/r4.csv"):
        assert name in text_of(digest)


def test_overflowed_change_redelivered_during_and_after_its_period_is_in_one_digest_only(
    tmp_path: Path,
) -> None:
    """Issue 18: joining the digest and marking the change done were two steps, and every
    redelivery spent the rate budget again. A redelivery of a change held for the digest, before
    or after its period ended, neither emails it alone nor takes an email of the next period."""
    settings = digest_settings(tmp_path, "rate: {max: 1, per: 2s}", **NO_TIMER)
    with ThreadedServer(settings) as server:
        assert deliver(server.url, object_data(name="reports/first.csv")).json()["status"] == "sent"
        held = object_data(name="reports/held.csv")
        assert deliver(server.url, held).json()["status"] == "digested"
        for _ in range(3):
            assert deliver(server.url, held).json()["status"] == "duplicate"
        flush_when_due(server)  # the period has ended
        for _ in range(3):
            assert deliver(server.url, held).json()["status"] == "duplicate"
        # The next period's one email is still there for a new change.
        assert deliver(server.url, object_data(name="reports/next.csv")).json()["status"] == "sent"
        assert httpx.post(server.url + "/digests/flush", timeout=10).json()["flushed"] == 0
    [digest] = digest_emails(tmp_path / "outbox")
    assert subject(digest).startswith("[gs://some-bucket] 1 change under reports/")
    assert "reports/held.csv" in text_of(digest)
    assert alone_subjects(tmp_path / "outbox") == [
        "[gs://some-bucket] finalized: reports/first.csv",
        "[gs://some-bucket] finalized: reports/next.csv",
    ]


@pytest.fixture
def fake() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as server:
        yield server


def sendgrid_settings(fake: FakeSendGrid, tmp_path: Path, route: str, **more: Any) -> Settings:
    return digest_settings(
        tmp_path,
        route,
        notifier="sendgrid",
        sendgrid_api_key=SecretStr(fake.api_key),
        sendgrid_host=fake.url,
        sendgrid_timeout=2.0,
        **NO_TIMER,
        **more,
    )


def test_a_rate_route_s_redelivery_after_sendgrid_failed_spends_no_second_email_of_the_budget(
    tmp_path: Path, fake: FakeSendGrid
) -> None:
    """Issue 18: every redelivery spent the rate budget again, so a change SendGrid failed once
    took two of the period's emails and pushed the next change into the digest."""
    fake.script(Reply.error(503))
    settings = sendgrid_settings(fake, tmp_path, "rate: {max: 2, per: 1h}")
    with ThreadedServer(settings) as server:
        retried = object_data(name="reports/retried.csv")
        assert deliver(server.url, retried).status_code == 503
        assert deliver(server.url, retried).json()["status"] == "sent"
        assert deliver(server.url, object_data(name="reports/next.csv")).json()["status"] == "sent"
        # The budget is two emails: the third change waits for the digest.
        third = deliver(server.url, object_data(name="reports/third.csv"))
        assert third.json()["status"] == "digested"
    [retried_email, next_email] = fake.accepted()
    assert "reports/retried.csv" in retried_email["subject"]
    assert "reports/next.csv" in next_email["subject"]


def test_a_digest_route_s_own_templates_render_the_window(tmp_path: Path) -> None:
    route = """
    digest: {window: 1s}
    subject: "{{ count }} new files in {{ prefix }}"
    text: "{% for item in items %}{{ item.name }};{% endfor %} +{{ more }}"
    """
    with ThreadedServer(digest_settings(tmp_path, route, **NO_TIMER)) as server:
        for i in range(3):
            deliver(server.url, object_data(name=f"reports/t{i}.csv"))
        flush_when_due(server)
        [digest] = read_outbox(tmp_path / "outbox")
    assert subject(digest) == "3 new files in reports/"
    assert text_of(digest).startswith("reports/t0.csv;reports/t1.csv;reports/t2.csv; +0")
    assert "Sent by route reports as a digest of 3 changes" in text_of(digest)


def test_get_digests_lists_pending_windows(tmp_path: Path) -> None:
    settings = digest_settings(tmp_path, "digest: {window: 1h}")
    with ThreadedServer(settings) as server:
        for i in range(3):
            deliver(server.url, object_data(name=f"reports/r{i}.csv"))
        answer = httpx.get(server.url + "/digests", timeout=10)
        flushed = httpx.post(server.url + "/digests/flush", timeout=10)
    assert answer.status_code == 200
    [window] = answer.json()["windows"]
    assert window["route"] == "reports"
    assert window["events"] == 3
    assert window["state"] == "open"
    assert window["opened"].endswith("Z")
    assert window["due"] > window["opened"]
    # Not due yet: a flush sends nothing, and says the window is still pending.
    assert flushed.json() == {
        "flushed": 0,
        "pending": 1,
        "failed": 0,
        "dead_lettered": 0,
        "left": 0,
    }


def process_env(tmp_path: Path, route: str, **more: str) -> dict[str, str]:
    return {
        "NOTIFY_RULES": str(rules(tmp_path, route)),
        "NOTIFIER": "outbox",
        "NOTIFY_FROM": "notifier@example.com",
        "OUTBOX_DIR": str(tmp_path / "outbox"),
        "DEAD_LETTER_DIR": str(tmp_path / "dead-letter"),
        "IDEMPOTENCY_STORE": f"sqlite:///{tmp_path}/state/notifier.db",
        **more,
    }


def test_a_pending_window_survives_sigkill_and_goes_out_after_the_restart(tmp_path: Path) -> None:
    env = process_env(tmp_path, "digest: {window: 1s}")
    # The first process has no timer, so it cannot send the window before it is killed.
    first = ServiceProcess({**env, "DIGEST_FLUSH_SECONDS": "0"}, tmp_path).start()
    try:
        for i in range(5):
            assert deliver(first.url, object_data(name=f"reports/k{i}.csv")).status_code == 200
        first.signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.stop()
    assert read_outbox(tmp_path / "outbox") == []
    time.sleep(1)  # the window is due while no process runs
    with ServiceProcess(env, tmp_path):  # no new event: the timer finds the window
        [digest] = eventually(lambda: read_outbox(tmp_path / "outbox"))
    assert subject(digest).startswith("[gs://some-bucket] 5 changes under reports/")
    for i in range(5):
        assert f"reports/k{i}.csv" in text_of(digest)


def test_k_service_with_a_sqlite_store_and_a_digest_route_warns_at_start(tmp_path: Path) -> None:
    env = process_env(tmp_path, "digest: {window: 1m}", K_SERVICE="gcs-notifier")
    with ServiceProcess(env, tmp_path) as service:
        eventually(lambda: "instance's memory" in service.output(), seconds=10)
    warning = next(line for line in service.output().splitlines() if "instance's memory" in line)
    assert '"severity": "WARNING"' in warning or '"severity":"WARNING"' in warning
    assert "firestore://" in warning


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(("tick", "warnings"), [("1", 1), ("0", 0)], ids=["timer-on", "timer-off"])
def test_k_service_with_a_digest_route_warns_once_at_start_while_the_timer_is_on(
    tmp_path: Path, tick: str, warnings: int
) -> None:
    """Issue 18: on Cloud Run, with CPU only during requests, a timer flush frozen between
    requests wakes with its claims lost; time is kept by Cloud Scheduler's POST /digests/flush."""
    env = process_env(
        tmp_path,
        "digest: {window: 1m}",
        K_SERVICE="gcs-notifier",
        IDEMPOTENCY_STORE="memory",  # no SQLite warning beside it
        DIGEST_FLUSH_SECONDS=tick,
    )
    with ServiceProcess(env, tmp_path) as service:
        # Ready once the rules loaded, and with them the digest flush and its timer.
        eventually(lambda: "event pipeline ready" in service.output(), seconds=10)
        lines = json_lines(service.output())
    timer = [line for line in lines if "DIGEST_FLUSH_SECONDS" in line["message"]]
    assert len(timer) == warnings, lines
    for line in timer:
        assert line["severity"] == "WARNING"
        assert "DIGEST_FLUSH_SECONDS=0" in line["message"]
        assert "Cloud Scheduler" in line["message"]


def sendgrid_env(fake: FakeSendGrid) -> dict[str, str]:
    return {
        "NOTIFIER": "sendgrid",
        "SENDGRID_API_KEY": fake.api_key,
        "SENDGRID_HOST": fake.url,
        "SENDGRID_TIMEOUT": "2",
    }


def test_two_processes_on_one_redis_send_one_digest(tmp_path: Path, fake: FakeSendGrid) -> None:
    with redis_server(tmp_path) as redis_url:
        env = process_env(
            tmp_path,
            "digest: {window: 1s}",
            IDEMPOTENCY_STORE=redis_url,
            DIGEST_FLUSH_SECONDS="0",  # the flushes below, four at once, are the only ones
            **sendgrid_env(fake),
        )
        with ServiceProcess(env, tmp_path) as one, ServiceProcess(env, tmp_path) as two:
            for i in range(10):
                url = (one, two)[i % 2].url
                assert deliver(url, object_data(name=f"reports/r{i}.csv")).status_code == 200
            time.sleep(1)
            fake.latency = 0.3  # the first sender is still sending when the others claim
            with ThreadPoolExecutor(4) as pool:  # both processes flush at once, twice each
                flushes = list(
                    pool.map(
                        lambda url: httpx.post(url + "/digests/flush", timeout=10),
                        [one.url, two.url] * 2,
                    )
                )
            after = httpx.post(one.url + "/digests/flush", timeout=10).json()
    assert {f.status_code for f in flushes} == {200}
    assert sum(f.json()["flushed"] for f in flushes) == 1
    assert after["pending"] == 0
    [digest] = fake.accepted()
    assert digest["subject"].startswith("[gs://some-bucket] 10 changes under reports/")


class WritesRefused(RedisStore):
    """The service's Redis claims store, which makes its redis-server refuse writes (`maxmemory
    1` with noeviction, as a full Memorystore instance does; reads and deletes still pass) at a
    chosen moment of the next delivery, until `accept_writes`:
    - "claimed": as soon as the delivery's claim is granted, so the rate overflow that follows
      is refused;
    - "joined": once the event has joined its digest, right before its key is marked done by a
      write of its own (an overflow that joins and marks done in one step has no such moment).
    """

    def __init__(self, url: str) -> None:
        super().__init__(AsyncRedis.from_url(url, socket_timeout=5))
        self.admin = redis.Redis.from_url(url, socket_timeout=5)
        self.moment: str | None = None
        self.watched: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def refuse_writes(self, moment: str) -> None:
        self.moment, self.watched = moment, None

    def accept_writes(self) -> None:
        self.moment = self.watched = None
        self.admin.config_set("maxmemory", 0)

    def _refuse_now(self) -> None:
        self.admin.config_set("maxmemory-policy", "noeviction")
        self.admin.config_set("maxmemory", 1)

    async def claim(self, key: str, lease_seconds: float) -> Lease | Claim:
        answer = await super().claim(key, lease_seconds)
        if self.moment is not None and self.watched is None and isinstance(answer, Lease):
            self.watched = key
            if self.moment == "claimed":
                self._refuse_now()
        return answer

    async def complete(self, key: str, token: int) -> bool:
        if self.moment == "joined" and key == self.watched:
            self._refuse_now()
        return await super().complete(key, token)

    async def ping(self) -> None:
        self.loop = asyncio.get_running_loop()  # the server's: /healthz pings before any event
        await super().ping()

    def close(self) -> None:
        """From the test's thread, before the server stops: the client lives in its loop."""
        if self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.aclose(), self.loop).result(timeout=10)
        self.admin.close()


@pytest.fixture
def refusing(tmp_path: Path) -> Iterator[tuple[str, WritesRefused]]:
    with redis_server(tmp_path) as url:
        yield url, WritesRefused(url)


def redeliver_until_answered(url: str, data: dict[str, Any], seconds: float = 20) -> str:
    """Eventarc's redeliveries of a change answered 409 (in flight), until one is 2xx: its
    status."""

    def answered() -> str | None:
        answer = deliver(url, data)
        if answer.status_code == 409:
            time.sleep(0.4)
            return None
        assert answer.status_code == 200, answer.text
        status: str = answer.json()["status"]
        return status

    return eventually(answered, seconds)


@pytest.mark.redis
def test_a_rate_overflow_the_store_refuses_answers_503_and_the_redelivery_folds_it_in_once(
    tmp_path: Path, refusing: tuple[str, WritesRefused]
) -> None:
    """A rate route's overflow joins the period's digest and marks the change done in one step:
    Redis refusing it (the period's budget is read without a write, so the overflow is the first
    write refused) leaves neither, and the redelivery joins the digest once."""
    url, store = refusing
    settings = digest_settings(
        tmp_path, "rate: {max: 1, per: 4s}", idempotency_store=url, **NO_TIMER
    )
    with ThreadedServer(settings, store=store) as server:
        try:
            first = deliver(server.url, object_data(name="reports/first.csv"))
            assert first.json()["status"] == "sent"
            held = object_data(name="reports/held.csv")
            store.refuse_writes("claimed")
            try:
                refused = deliver(server.url, held)
            finally:
                store.accept_writes()
            assert refused.status_code == 503, refused.text
            # Neither written: no digest holds the change, and it is not marked done.
            assert httpx.get(server.url + "/digests", timeout=10).json()["windows"] == []
            assert deliver(server.url, held).json()["status"] == "digested"
            flush_when_due(server)
            assert deliver(server.url, held).json()["status"] == "duplicate"
        finally:
            store.close()
    [alone, digest] = read_outbox(tmp_path / "outbox")
    assert "reports/first.csv" in subject(alone)
    assert subject(digest).startswith("[gs://some-bucket] 1 change under reports/")
    assert "reports/held.csv" in text_of(digest)


@pytest.mark.redis
def test_a_store_failing_after_a_rate_overflow_joined_never_lets_the_change_go_out_alone(
    tmp_path: Path, refusing: tuple[str, WritesRefused]
) -> None:
    """Issue 18: joining the period's digest and marking the change done were two writes; Redis
    refusing the second left the change in the digest with its claim held, and the redelivery
    after the period and the lease emailed it alone as well."""
    url, store = refusing
    settings = digest_settings(
        tmp_path,
        "rate: {max: 1, per: 2s}",
        idempotency_store=url,
        claim_lease_seconds=10,  # the least the outbox's 5 s send allows
        sendgrid_timeout=5,  # unused by the outbox, but checked against the lease
        **NO_TIMER,
    )
    with ThreadedServer(settings, store=store) as server:
        try:
            first = deliver(server.url, object_data(name="reports/first.csv"))
            assert first.json()["status"] == "sent"
            held = object_data(name="reports/held.csv")
            store.refuse_writes("joined")
            try:
                answer = deliver(server.url, held)
            finally:
                store.accept_writes()
            assert answer.status_code in (200, 503), answer.text
            if answer.status_code == 503:
                # Eventarc's first retry comes after its backoff (10 s at least): by then the
                # claim's lease and the rate period are over.
                time.sleep(10.5)
                redeliver_until_answered(server.url, held)
            flush_when_due(server)  # the period has ended (and any lease with it)
            for _ in range(3):
                assert redeliver_until_answered(server.url, held) == "duplicate"
        finally:
            store.close()
    [digest] = digest_emails(tmp_path / "outbox")
    assert subject(digest).startswith("[gs://some-bucket] 1 change under reports/")
    assert "reports/held.csv" in text_of(digest)
    assert alone_subjects(tmp_path / "outbox") == [
        "[gs://some-bucket] finalized: reports/first.csv"
    ]


@pytest.mark.redis
def test_a_digested_change_is_remembered_in_redis_for_the_dedupe_retention(
    tmp_path: Path,
) -> None:
    """Issue 18: digest dedupe was kept 25 h, but a dead-letter replay reaches back 7 days; the
    default retention (DEDUPE_RETENTION) is 8 days."""
    with redis_server(tmp_path) as url:
        settings = digest_settings(tmp_path, "digest: {window: 1h}", idempotency_store=url)
        with ThreadedServer(settings) as server:
            data = object_data(name="reports/kept.csv")
            assert deliver(server.url, data).json()["status"] == "digested"
        client = redis.Redis.from_url(url)
        try:
            [change] = client.keys("gcs-notifier:digest:change:*")
            kept = client.pttl(change) / 1000
        finally:
            client.close()
    eight_days = 8 * 86400
    assert eight_days - 60 < kept <= eight_days


def test_sendgrid_failing_during_a_flush_leaves_the_window_for_the_next_one(
    tmp_path: Path, fake: FakeSendGrid
) -> None:
    settings = digest_settings(
        tmp_path,
        "digest: {window: 1s}",
        notifier="sendgrid",
        sendgrid_api_key=SecretStr(fake.api_key),
        sendgrid_host=fake.url,
        sendgrid_timeout=2.0,
        **NO_TIMER,
    )
    fake.script(Reply.error(500), Reply.error(503))
    with ThreadedServer(settings) as server:
        for i in range(3):
            deliver(server.url, object_data(name=f"reports/r{i}.csv"))
        time.sleep(1)

        def flush() -> Any:
            return httpx.post(server.url + "/digests/flush", timeout=10).json()

        failing = {"flushed": 0, "pending": 1, "failed": 1, "dead_lettered": 0, "left": 0}
        assert flush() == failing
        assert flush() == failing
        assert flush() == {"flushed": 1, "pending": 0, "failed": 0, "dead_lettered": 0, "left": 0}
        assert flush()["flushed"] == 0
    [digest] = fake.accepted()
    assert digest["subject"].startswith("[gs://some-bucket] 3 changes under reports/")
    assert len(fake.requests()) == 3  # two failed flushes, then the one that sent it


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("key-1")


@pytest.fixture
def protected(key: SigningKey, tmp_path: Path) -> Iterator[ThreadedServer]:
    with CertsServer(key) as certs:
        settings = digest_settings(
            tmp_path,
            "digest: {window: 1h}",
            event_auth="oidc",
            event_invokers=[INVOKER],
            oidc_certs_url=certs.url,
        )
        with ThreadedServer(settings) as server:
            yield server


class TestFlushIsProtectedLikeEvents:
    @pytest.mark.parametrize(("method", "path"), [("POST", "/digests/flush"), ("GET", "/digests")])
    def test_without_a_token_401(self, protected: ThreadedServer, method: str, path: str) -> None:
        answer = httpx.request(method, protected.url + path, headers={"host": SERVICE_HOST})
        assert answer.status_code == 401
        assert answer.headers["content-type"] == "application/problem+json"

    @pytest.mark.parametrize(("method", "path"), [("POST", "/digests/flush"), ("GET", "/digests")])
    def test_a_stranger_403(
        self, protected: ThreadedServer, key: SigningKey, method: str, path: str
    ) -> None:
        token = mint_token(key, email="stranger@example.iam.gserviceaccount.com")
        headers = {"host": SERVICE_HOST, "authorization": f"Bearer {token}"}
        assert httpx.request(method, protected.url + path, headers=headers).status_code == 403

    def test_the_invoker_flushes(self, protected: ThreadedServer, key: SigningKey) -> None:
        headers = {"host": SERVICE_HOST, "authorization": f"Bearer {mint_token(key)}"}
        answer = httpx.post(protected.url + "/digests/flush", headers=headers)
        assert answer.status_code == 200
        assert answer.json()["flushed"] == 0


def test_sigterm_sends_the_due_windows_and_keeps_the_others_pending(tmp_path: Path) -> None:
    path = tmp_path / "two-routes.yaml"
    path.write_text(
        textwrap.dedent(f"""
        version: 1
        routes:
          - name: reports
            match: {{prefix: reports/}}
            to: [{OPS}]
            digest: {{window: 1s}}
          - name: later
            match: {{prefix: later/}}
            to: [{OPS}]
            digest: {{window: 1h}}
        """),
        encoding="utf-8",
    )
    # No timer: only the shutdown can send the due window.
    env = process_env(tmp_path, "", NOTIFY_RULES=str(path), DIGEST_FLUSH_SECONDS="0")
    with ServiceProcess(env, tmp_path) as service:
        for name in ("reports/a.csv", "reports/b.csv", "later/c.csv"):
            assert deliver(service.url, object_data(name=name)).json()["status"] == "digested"
        time.sleep(1.5)  # the reports window is due; nothing sends it yet
        assert read_outbox(tmp_path / "outbox") == []
        service.signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down cleanly: "terminated by SIGTERM".
        assert service.wait(timeout=15) in (0, -signal.SIGTERM)
    [digest] = read_outbox(tmp_path / "outbox")
    assert subject(digest).startswith("[gs://some-bucket] 2 changes under reports/")
    with ServiceProcess(env, tmp_path) as again:
        windows = httpx.get(again.url + "/digests", timeout=10).json()["windows"]
    assert [(w["route"], w["events"]) for w in windows] == [("later", 1)]


def test_sigterm_while_the_timer_s_digest_is_in_flight_sends_it_once_and_exits_in_time(
    tmp_path: Path, fake: FakeSendGrid
) -> None:
    """Issue 18: shutdown cancelled the timer at once; the cancelled flush released its window
    although SendGrid may have accepted it, and the last flush sent it again."""
    env = process_env(
        tmp_path,
        "digest: {window: 2s}",
        DIGEST_FLUSH_SECONDS="0.2",
        **{**sendgrid_env(fake), "SENDGRID_TIMEOUT": "5"},
    )
    fake.latency = 2.0  # SendGrid takes 2 s to accept: the digest is in flight at SIGTERM
    with ServiceProcess(env, tmp_path) as service:
        for i in range(3):
            data = object_data(name=f"reports/r{i}.csv")
            assert deliver(service.url, data).json()["status"] == "digested"
        assert fake.wait_for_requests(1, timeout=20)  # the timer's flush is sending the window
        signalled = time.monotonic()
        service.signal(signal.SIGTERM)
        assert service.wait(timeout=15) in (0, -signal.SIGTERM)
        waited = time.monotonic() - signalled
    assert waited < 10  # Cloud Run sends SIGKILL 10 s after SIGTERM
    # Every request the fake received has its answer (a send cut short is accepted all the
    # same, 2 s after it arrived, as SendGrid would).
    eventually(lambda: all(r.status is not None or r.gone for r in fake.requests()), seconds=10)
    assert [body["subject"] for body in fake.accepted()] == [
        "[gs://some-bucket] 3 changes under reports/ (3 finalized)"
    ]
    with ServiceProcess({**env, "DIGEST_FLUSH_SECONDS": "0"}, tmp_path) as again:
        assert httpx.get(again.url + "/digests", timeout=10).json()["windows"] == []
