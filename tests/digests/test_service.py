"""Digests end to end (issue 11): the real server, the outbox or the strict fake SendGrid, real
stores (SQLite files, a real redis-server), real processes where a crash or a second instance is
the point.

Windows here are a few seconds long; the service's timer flushes every second, so each test waits
for the window to close and then polls for the email.
"""

from __future__ import annotations

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
from pydantic import SecretStr

from app.config import Settings
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
        idempotency_store=f"sqlite:///{tmp_path}/state/notifier.db",
        **overrides,
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
    assert flushed.json() == {"flushed": 0, "pending": 1, "failed": 0, "dead_lettered": 0}


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


@pytest.fixture
def fake() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as server:
        yield server


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

        failing = {"flushed": 0, "pending": 1, "failed": 1, "dead_lettered": 0}
        assert flush() == failing
        assert flush() == failing
        assert flush() == {"flushed": 1, "pending": 0, "failed": 0, "dead_lettered": 0}
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
