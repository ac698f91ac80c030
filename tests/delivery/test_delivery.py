"""Delivery you can trust, end to end: the real server, a strict fake SendGrid, real stores.

Eventarc delivers at least once and redelivers anything not answered 2xx; these tests play the
redeliveries and failures it produces and count the emails SendGrid accepted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import SecretStr

from app.config import Settings
from app.notify.sendgrid import SendGridNotifier
from tests.factories import EVENTARC_PATH, binary, object_data, recent
from tests.fakes.sendgrid import FakeSendGrid, Reply
from tests.redis_server import redis_server
from tests.servers import ROOT, ServiceProcess, ThreadedServer, free_port

RECIPIENTS = ["ops@example.com", "dev@example.com", "boss@example.com"]


@pytest.fixture
def fake() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as server:
        yield server


def sendgrid_settings(fake: FakeSendGrid, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "notifier": "sendgrid",
        "sendgrid_api_key": fake.api_key,
        "sendgrid_host": fake.url,
        "sendgrid_timeout": 2.0,
        "notify_to": RECIPIENTS,
        "notify_from": "notifier@example.com",
        "idempotency_store": f"sqlite:///{tmp_path}/state/notifier.db",
        "dead_letter_dir": tmp_path / "dead-letter",
        **overrides,
    }
    return Settings.model_validate(values)


@pytest.fixture
def service(fake: FakeSendGrid, tmp_path: Path) -> Iterator[ThreadedServer]:
    with ThreadedServer(sendgrid_settings(fake, tmp_path)) as server:
        yield server


def deliver(url: str, headers: dict[str, str], body: bytes, timeout: float = 15) -> httpx.Response:
    return httpx.post(url + EVENTARC_PATH, headers=headers, content=body, timeout=timeout)


def redelivery(data: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """The same storage change published again with a new message id, as Cloud Storage may."""
    return binary(data)


def test_the_same_change_delivered_twice_with_different_ids_sends_one_email(
    service: ThreadedServer, fake: FakeSendGrid
) -> None:
    data = object_data(name="reports/q3.csv")
    first = deliver(service.url, *redelivery(data))
    second = deliver(service.url, *redelivery(data))
    assert first.json()["status"] == "sent"
    assert second.status_code == 200
    assert second.json()["status"] == "duplicate"
    assert len(fake.accepted()) == 1
    assert sorted(fake.delivered_recipients()) == sorted(RECIPIENTS)


def test_a_new_generation_of_the_same_object_is_a_new_email(
    service: ThreadedServer, fake: FakeSendGrid
) -> None:
    deliver(service.url, *binary(object_data(name="same.txt")))
    deliver(service.url, *binary(object_data(name="same.txt")))  # factories give a fresh generation
    assert len(fake.accepted()) == 2


def test_ten_concurrent_copies_send_one_email(service: ThreadedServer, fake: FakeSendGrid) -> None:
    fake.latency = 0.3  # keep the first send in flight while the copies arrive
    data = object_data(name="burst.bin")
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: deliver(service.url, *redelivery(data)), range(10)))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses.count(200) >= 1
    assert set(statuses) <= {200, 409}
    assert [a.json()["status"] for a in answers if a.status_code == 200].count("sent") == 1
    conflict = next((a for a in answers if a.status_code == 409), None)
    if conflict is not None:
        assert conflict.headers["retry-after"].isdigit()
    assert len(fake.accepted()) == 1


def test_429_then_redelivery_after_recovery_sends_exactly_one_email(
    service: ThreadedServer, fake: FakeSendGrid
) -> None:
    fake.script(Reply.rate_limited(reset_in=42))
    headers, body = binary(object_data(name="limited.txt"))
    first = deliver(service.url, headers, body)
    assert first.status_code == 503
    assert 40 <= int(first.headers["retry-after"]) <= 43
    assert fake.accepted() == []
    again = deliver(service.url, headers, body)  # Eventarc's redelivery, same message
    assert again.json()["status"] == "sent"
    assert deliver(service.url, headers, body).json()["status"] == "duplicate"
    assert len(fake.accepted()) == 1


@pytest.mark.parametrize(
    "reply",
    [Reply.error(500), Reply.bad_gateway(), Reply.error(401), Reply.error(403)],
    ids=["500", "502-html", "401", "403"],
)
def test_transient_and_configuration_failures_ask_for_redelivery(
    service: ThreadedServer, fake: FakeSendGrid, reply: Reply
) -> None:
    fake.script(reply)
    headers, body = binary()
    answer = deliver(service.url, headers, body)
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert "retry-after" in answer.headers
    assert fake.api_key not in answer.text
    assert deliver(service.url, headers, body).json()["status"] == "sent"
    assert len(fake.accepted()) == 1


def test_a_hang_is_answered_503_within_the_timeout(
    service: ThreadedServer, fake: FakeSendGrid
) -> None:
    fake.script(Reply.hang())
    answer = deliver(service.url, *binary(), timeout=10)  # SENDGRID_TIMEOUT is 2 s here
    assert answer.status_code == 503
    assert "in time" in answer.json()["detail"]


def test_a_send_that_hangs_past_the_timeout_keeps_its_claim_until_the_lease_ends(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    """Issue 18: a send SendGrid never answered may have gone out; its claim was released and
    the redelivery emailed at once. Now it stands until its lease ends, then one email goes."""
    fake.script(Reply.hang())  # no answer until the fake stops: never accepted
    settings = sendgrid_settings(fake, tmp_path, claim_lease_seconds=7)  # SENDGRID_TIMEOUT 2 s
    with ThreadedServer(settings) as server:
        headers, body = binary(object_data(name="uncertain.txt"))
        claimed = time.monotonic()
        hung = deliver(server.url, headers, body)
        assert hung.status_code == 503
        assert "in time" in hung.json()["detail"]
        again = deliver(server.url, headers, body)  # right after: the claim stands
        assert again.status_code == 409, again.text
        assert again.headers["retry-after"].isdigit()
        while (answer := deliver(server.url, headers, body)).status_code == 409:
            assert time.monotonic() - claimed < 20, "the claim outlived its lease"
            time.sleep(0.25)
        assert answer.json()["status"] == "sent"
        assert time.monotonic() - claimed >= 6.5  # not before the lease (7 s) ended
        assert deliver(server.url, headers, body).json()["status"] == "duplicate"
    assert len(fake.accepted()) == 1


def test_a_refused_connection_releases_the_claim_so_the_redelivery_sends_at_once(
    tmp_path: Path,
) -> None:
    """Nothing reached SendGrid, so nothing can have gone out: no reason to hold the claim."""
    port = free_port()  # nothing listens there yet
    key = "SG.fake-sendgrid-key00.refused-connection-test-only-never-a-real-key-0"
    settings = Settings.model_validate(
        {
            "notifier": "sendgrid",
            "sendgrid_api_key": key,
            "sendgrid_host": f"http://127.0.0.1:{port}",
            "sendgrid_timeout": 2.0,
            "claim_lease_seconds": 60,
            "notify_to": RECIPIENTS,
            "notify_from": "notifier@example.com",
            "idempotency_store": f"sqlite:///{tmp_path}/state/notifier.db",
            "dead_letter_dir": tmp_path / "dead-letter",
        }
    )
    with ThreadedServer(settings) as server:
        headers, body = binary(object_data(name="refused.txt"))
        refused = deliver(server.url, headers, body)
        assert refused.status_code == 503, refused.text
        assert "SendGrid unreachable" in refused.json()["detail"]
        with FakeSendGrid(key, port=port) as fake:  # SendGrid is back
            answer = deliver(server.url, headers, body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "sent"
            assert len(fake.accepted()) == 1


def run_replay(directory: Path, url: str) -> subprocess.CompletedProcess[str]:
    """`python -m app.replay DIR --url URL`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "app.replay", str(directory), "--url", url + "/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_rejected_message_is_dead_lettered_and_replay_sends_it_once(
    service: ThreadedServer, fake: FakeSendGrid, tmp_path: Path
) -> None:
    fake.script(Reply.error(400, "The subject is invalid", field="subject"))
    # A change of a minute ago: a replay of one older than DEDUPE_RETENTION is refused.
    headers, body = binary(object_data(name="rejected.txt"), event_id="dl-1", time=recent())
    answer = deliver(service.url, headers, body)
    assert answer.status_code == 200
    assert answer.json() == {"status": "dead-lettered", "id": "dl-1"}
    [letter] = (tmp_path / "dead-letter").glob("*.json")
    document = json.loads(letter.read_text())
    assert document["id"] == "dl-1"
    assert document["type"] == "google.cloud.storage.object.v1.finalized"
    assert document["data"]["name"] == "rejected.txt"
    assert "The subject is invalid" in document["deadletterreason"]
    assert fake.accepted() == []

    replay = run_replay(tmp_path / "dead-letter", service.url)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert list((tmp_path / "dead-letter").glob("*.json")) == []
    assert len(fake.accepted()) == 1
    assert deliver(service.url, headers, body).json()["status"] == "duplicate"


def test_replay_keeps_files_the_service_does_not_accept(
    service: ThreadedServer, fake: FakeSendGrid, tmp_path: Path
) -> None:
    fake.script(Reply.error(400, "bad", field="subject"), Reply.error(500))
    deliver(service.url, *binary(time=recent()))
    replay = run_replay(tmp_path / "dead-letter", service.url)
    assert replay.returncode == 1
    assert "503" in replay.stdout
    assert "(kept)" in replay.stdout
    assert len(list((tmp_path / "dead-letter").glob("*.json"))) == 1


def test_a_400_naming_the_recipient_address_dead_letters_the_event(
    service: ThreadedServer, fake: FakeSendGrid, tmp_path: Path
) -> None:
    field = "personalizations.0.to.0.email"
    fake.script(Reply.error(400, "Does not contain a valid address.", field=field))
    answer = deliver(service.url, *binary(event_id="bad-address"))
    assert answer.json() == {"status": "dead-lettered", "id": "bad-address"}
    [letter] = (tmp_path / "dead-letter").glob("*.json")
    assert f"{field}: Does not contain a valid address." in letter.read_text()


@pytest.mark.parametrize(
    "reply",
    [Reply.error(400), Reply.error(400, "Content-Type should be application/json.")],
    ids=["body-not-json", "content-type"],
)
def test_a_400_naming_no_field_of_the_message_is_retried_not_dead_lettered(
    service: ThreadedServer, fake: FakeSendGrid, tmp_path: Path, reply: Reply
) -> None:
    # A request this service framed wrongly fails for every event alike: dead-lettering it
    # (answered 2xx) would empty the queue into the instance's disk and retry nothing.
    fake.script(reply)
    headers, body = binary()
    answer = deliver(service.url, headers, body)
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["retry-after"].isdigit()
    assert fake.api_key not in answer.text
    assert list((tmp_path / "dead-letter").glob("*")) == []
    assert deliver(service.url, headers, body).json()["status"] == "sent"
    assert len(fake.accepted()) == 1


@pytest.mark.parametrize("suffix", ["\n", "\r\n"])
def test_a_key_with_a_trailing_newline_is_answered_503_never_sent_nor_dead_lettered(
    fake: FakeSendGrid, tmp_path: Path, suffix: str
) -> None:
    # Issue 9: `echo "$KEY" | gcloud secrets create ...` keeps the newline; it ended the request
    # head early, SendGrid answered 400 and every event was answered `200 dead-lettered`.
    # Settings strip it; the notifier, handed such a key directly, still never sends it.
    notifier = SendGridNotifier(
        api_key=SecretStr(fake.api_key + suffix), host=fake.url, timeout=2.0
    )
    with ThreadedServer(sendgrid_settings(fake, tmp_path), notifier=notifier) as server:
        answer = deliver(server.url, *binary())
    assert answer.status_code == 503
    assert answer.headers["retry-after"].isdigit()
    assert "SENDGRID_API_KEY" in answer.json()["detail"]
    assert fake.api_key not in answer.text
    assert fake.requests() == []
    assert list((tmp_path / "dead-letter").glob("*")) == []


def test_1500_recipients_go_out_in_two_requests_each_address_once(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    many = [f"user{i}@example.com" for i in range(1500)]
    with ThreadedServer(sendgrid_settings(fake, tmp_path, notify_to=many)) as server:
        assert deliver(server.url, *binary()).json()["status"] == "sent"
    assert len(fake.accepted()) == 2
    delivered = fake.delivered_recipients()
    assert len(delivered) == 1500
    assert sorted(delivered) == sorted(many)


def test_redelivery_after_the_second_batch_failed_sends_only_that_batch(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    many = [f"user{i}@example.com" for i in range(1500)]
    fake.script(Reply.normal(), Reply.error(500))
    with ThreadedServer(sendgrid_settings(fake, tmp_path, notify_to=many)) as server:
        headers, body = binary()
        assert deliver(server.url, headers, body).status_code == 503
        assert len(fake.accepted()) == 1
        assert deliver(server.url, headers, body).json()["status"] == "sent"
        assert deliver(server.url, headers, body).json()["status"] == "duplicate"
    delivered = fake.delivered_recipients()
    assert len(fake.accepted()) == 2
    assert len(delivered) == 1500
    assert len(set(delivered)) == 1500


def service_env(fake: FakeSendGrid, store: str, **extra: str) -> dict[str, str]:
    return {
        "NOTIFIER": "sendgrid",
        "SENDGRID_API_KEY": fake.api_key,
        "SENDGRID_HOST": fake.url,
        "SENDGRID_TIMEOUT": "10",
        "NOTIFY_TO": ",".join(RECIPIENTS),
        "NOTIFY_FROM": "notifier@example.com",
        "IDEMPOTENCY_STORE": store,
        **extra,
    }


def test_sigterm_during_a_slow_send_still_answers_2xx_after_the_email_is_accepted(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    fake.script(Reply.hang(seconds=2.0))  # then accepted normally
    with ServiceProcess(service_env(fake, "memory"), tmp_path) as service:
        answers: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: answers.append(deliver(service.url, *binary())))
        sender.start()
        assert fake.wait_for_requests(1, timeout=10)
        service.signal(signal.SIGTERM)
        sender.join(timeout=15)
        # uvicorn re-raises the signal once it has shut down gracefully, so the exit status
        # says "terminated by SIGTERM", as it should.
        assert service.wait(timeout=10) in (0, -signal.SIGTERM)
    [answer] = answers
    assert answer.status_code == 200
    assert answer.json()["status"] == "sent"
    assert len(fake.accepted()) == 1


def test_two_instances_sharing_redis_send_one_email_for_one_change(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    fake.latency = 0.3
    with redis_server(tmp_path) as url:
        env = service_env(fake, url)
        with ServiceProcess(env, tmp_path) as first, ServiceProcess(env, tmp_path) as second:
            data = object_data(name="shared.txt")
            with ThreadPoolExecutor(6) as pool:
                answers = list(
                    pool.map(
                        lambda i: deliver((first, second)[i % 2].url, *redelivery(data)), range(6)
                    )
                )
            assert {answer.status_code for answer in answers} <= {200, 409}
            # Eventarc redelivers the 409s later; by then the first send is done.
            for answer in answers:
                if answer.status_code == 409:
                    assert deliver(first.url, *redelivery(data)).json()["status"] == "duplicate"
    assert len(fake.accepted()) == 1


def routes_file(tmp_path: Path, count: int) -> Path:
    """`count` routes for every change under reports/, each to its own recipient, all matched
    (`continue`)."""
    route = textwrap.dedent("""
        - name: route-{n}
          match: {{prefix: reports/}}
          to: [route{n}@example.com]
          continue: true
    """)
    routes = "".join(textwrap.indent(route.format(n=n), "  ") for n in range(count))
    path = tmp_path / "rules.yaml"
    path.write_text(f"version: 1\nroutes:{routes}", encoding="utf-8")
    return path


@pytest.mark.redis
def test_an_event_for_many_slow_routes_emails_each_route_once_while_another_instance_retries(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    """Issue 18: every route's claim was taken up front with one lease; sends slow enough that
    the later claims' leases ran out before their turn let a second instance, given the
    redelivery, claim and send them too. A claim is now renewed (or claimed anew) right before
    its send."""
    routes, latency, lease = 10, 1.0, 8.0  # the 10th send starts 9 s after the claims
    fake.latency = latency
    with redis_server(tmp_path) as url:
        env = service_env(
            fake,
            url,
            NOTIFY_RULES=str(routes_file(tmp_path, routes)),
            SENDGRID_TIMEOUT="3",  # each send takes 1 s: none times out
            CLAIM_LEASE_SECONDS=f"{lease:g}",  # the least SENDGRID_TIMEOUT allows
        )
        with ServiceProcess(env, tmp_path) as first, ServiceProcess(env, tmp_path) as second:
            data = object_data(name="reports/q3.csv")
            answers: list[httpx.Response] = []
            sending = threading.Thread(
                target=lambda: answers.append(deliver(first.url, *redelivery(data), timeout=30))
            )
            sending.start()
            assert fake.wait_for_requests(1, timeout=10)  # the first route's send: claims taken
            claimed = time.monotonic()
            retries: list[int] = []
            # Eventarc's redelivery reaches the other instance, again and again, from before
            # the up-front leases run out until the first instance has answered.
            while sending.is_alive():
                if time.monotonic() - claimed > lease - 0.5:
                    retries.append(deliver(second.url, *redelivery(data), timeout=30).status_code)
                time.sleep(0.2)
            sending.join()
            assert retries
            assert set(retries) <= {200, 409}, retries
            # Then until one is answered 2xx: every route is done.
            while (last := deliver(second.url, *redelivery(data), timeout=30)).status_code == 409:
                assert time.monotonic() - claimed < 30
                time.sleep(0.2)
            assert last.json()["status"] in ("duplicate", "sent")
    [answer] = answers
    assert answer.status_code in (200, 409), answer.text
    assert Counter(fake.delivered_recipients()) == {
        f"route{n}@example.com": 1 for n in range(routes)
    }


@pytest.mark.redis
def test_a_sent_change_is_remembered_in_redis_for_the_dedupe_retention(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    """Issue 18: done marks were kept 25 h, but a dead-letter replay reaches back 7 days: a
    replayed event that had partly gone out emailed again. The default DEDUPE_RETENTION is 8
    days."""
    with redis_server(tmp_path) as url:
        with ThreadedServer(sendgrid_settings(fake, tmp_path, idempotency_store=url)) as server:
            assert deliver(server.url, *binary()).json()["status"] == "sent"
        client = redis.Redis.from_url(url)
        try:
            [done] = client.keys("gcs-notifier:delivery:*")
            value = client.get(done)
            assert isinstance(value, bytes)
            assert value.startswith(b"done")
            kept = client.pttl(done) / 1000
        finally:
            client.close()
    eight_days = 8 * 86400
    assert eight_days - 60 < kept <= eight_days
