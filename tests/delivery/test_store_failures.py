"""A store that fails at any step of a delivery: before the send the event is answered 503
(Eventarc delivers it again) and every claim the delivery held is released; after SendGrid
accepted the email, the claim is never released: the done mark is retried, the answer is 2xx,
and no redelivery emails again. /healthz tells when the store cannot be reached."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from app.stores.base import Claim, Lease, StoreUnavailable
from app.stores.memory import MemoryStore
from tests.conftest import outbox_settings
from tests.factories import EVENTARC_PATH, binary, object_data
from tests.fakes.sendgrid import FakeSendGrid, Reply
from tests.redis_server import redis_server
from tests.servers import ThreadedServer


class FailingStore(MemoryStore):
    """The memory store, failing the named operations the next `times` times they are called."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[str, int] = {}
        self.calls: list[str] = []

    def fail(self, operation: str, times: int = 1) -> None:
        self.failures[operation] = times

    def _maybe_fail(self, operation: str) -> None:
        self.calls.append(operation)
        if self.failures.get(operation, 0) > 0:
            self.failures[operation] -= 1
            raise StoreUnavailable(f"test: {operation} failed")

    async def claim(self, key: str, lease_seconds: float) -> Lease | Claim:
        self._maybe_fail("claim")
        return await super().claim(key, lease_seconds)

    async def renew(self, key: str, token: int, lease_seconds: float) -> Lease | None:
        self._maybe_fail("renew")
        return await super().renew(key, token, lease_seconds)

    async def complete(self, key: str, token: int) -> bool:
        self._maybe_fail("complete")
        return await super().complete(key, token)

    async def release(self, key: str, token: int) -> None:
        self._maybe_fail("release")
        await super().release(key, token)

    async def ping(self) -> None:
        self._maybe_fail("ping")


@pytest.fixture
def store() -> FailingStore:
    return FailingStore()


@pytest.fixture
def service(tmp_path: Path, store: FailingStore) -> Iterator[ThreadedServer]:
    with ThreadedServer(outbox_settings(tmp_path), store=store) as server:
        yield server


def deliver(url: str, headers: dict[str, str], body: bytes) -> httpx.Response:
    return httpx.post(url + EVENTARC_PATH, headers=headers, content=body, timeout=15)


def emails(tmp_path: Path) -> int:
    return len(list((tmp_path / "outbox").glob("*.eml")))


def assert_retry_later(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert int(answer.headers["retry-after"]) >= 1


def test_a_claim_that_fails_answers_503_and_sends_nothing(
    service: ThreadedServer, store: FailingStore, tmp_path: Path
) -> None:
    store.fail("claim")
    assert_retry_later(deliver(service.url, *binary()))
    assert emails(tmp_path) == 0


def test_a_done_mark_that_fails_once_is_retried_and_the_change_is_done(
    service: ThreadedServer, store: FailingStore, tmp_path: Path
) -> None:
    data = object_data(name="a.txt")
    store.fail("complete")
    answer = deliver(service.url, *binary(data))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "sent", "id": answer.json()["id"]}
    assert store.calls.count("complete") == 2
    assert deliver(service.url, *binary(data)).json()["status"] == "duplicate"
    assert emails(tmp_path) == 2  # one email, one file for each of its two recipients


def test_a_done_mark_the_store_refuses_is_answered_2xx_and_never_sent_again(
    service: ThreadedServer, store: FailingStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reproduction of issue 18: the done mark failed after SendGrid's 202, the claim was
    released and the answer 503, so the redelivery emailed again at once. Now the email has gone
    out, so the answer is 2xx, the claim stands, and the mark is retried until it is written."""
    data = object_data(name="a.txt")
    store.fail("complete", times=1000)
    answer = deliver(service.url, *binary(data))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "sent"
    assert answer.json()["unconfirmed"] == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == [
        "email sent but not marked done; its claim stands until its lease ends, and the done"
        " mark is tried again until then"
    ]
    # A redelivery while the store still refuses: the claim stands, nobody emails again.
    again = deliver(service.url, *binary(data))
    assert again.status_code == 409, again.text
    store.failures.clear()  # the store heals: the retry in the background writes the mark
    deadline = time.monotonic() + 15
    while deliver(service.url, *binary(data)).status_code == 409:
        assert time.monotonic() < deadline, "the done mark was never written"
        time.sleep(0.2)
    assert deliver(service.url, *binary(data)).json()["status"] == "duplicate"
    assert emails(tmp_path) == 2  # one email, one file for each of its two recipients


def test_a_release_that_fails_still_answers_503_with_what_went_wrong_first(
    tmp_path: Path, store: FailingStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A send that fails (SendGrid 500), then a release that fails too.
    with FakeSendGrid() as fake:
        fake.script(Reply.error(500))
        settings = outbox_settings(
            tmp_path,
            notifier="sendgrid",
            sendgrid_api_key=fake.api_key,
            sendgrid_host=fake.url,
        )
        store.fail("release")
        with ThreadedServer(settings, store=store) as server:
            answer = deliver(server.url, *binary())
    assert_retry_later(answer)
    assert "SendGrid answered 500" in answer.json()["detail"]
    assert "could not release a claim; it ends with its lease" in caplog.messages


def test_a_store_failure_is_never_a_500(
    service: ThreadedServer, store: FailingStore, tmp_path: Path
) -> None:
    store.fail("claim")
    answer = deliver(service.url, *binary(object_data(name="claim.txt")))
    assert answer.status_code == 503
    store.fail("complete", times=1000)
    answer = deliver(service.url, *binary(object_data(name="complete.txt")))
    assert answer.status_code == 200


def test_healthz_checks_the_store_before_the_first_event(
    service: ThreadedServer, store: FailingStore
) -> None:
    assert "ping" in store.calls  # the server only counted as up once /healthz passed
    store.fail("ping", times=100)
    answer = httpx.get(service.url + "/healthz")
    assert answer.status_code == 503
    assert answer.json()["detail"] == "the delivery state store cannot be reached"
    assert "test: ping failed" not in answer.text  # the reason goes to the log only
    assert httpx.head(service.url + "/healthz").status_code == 503


@pytest.mark.redis
def test_a_redis_store_that_goes_away_answers_503_and_healthz_says_so(tmp_path: Path) -> None:
    redis = ExitStack()
    url = redis.enter_context(redis_server(tmp_path))
    with ThreadedServer(outbox_settings(tmp_path, idempotency_store=url)) as server:
        try:
            assert deliver(server.url, *binary()).status_code == 200
            assert httpx.get(server.url + "/healthz").status_code == 200
        finally:
            redis.close()  # redis-server stops; the service goes on
        assert_retry_later(deliver(server.url, *binary()))
        assert httpx.get(server.url + "/healthz").status_code == 503


def test_a_dead_letter_write_that_fails_is_logged_with_its_path_and_answered_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeSendGrid() as fake:
        fake.script(Reply.error(400, "invalid address", field="personalizations.0.to.0.email"))
        dead_letters = tmp_path / "dead-letter"
        settings = outbox_settings(
            tmp_path,
            notifier="sendgrid",
            sendgrid_api_key=fake.api_key,
            sendgrid_host=fake.url,
            dead_letter_dir=dead_letters,
        )
        with ThreadedServer(settings) as server:
            # The folder start-up checked becomes a file while the service runs.
            dead_letters.rmdir()
            dead_letters.write_text("not a folder any more")
            answer = deliver(server.url, *binary())
    assert_retry_later(answer)
    assert "DEAD_LETTER_DIR" in answer.json()["detail"]
    [record] = [r for r in caplog.records if r.getMessage().startswith("could not write the dead")]
    assert record.levelname == "ERROR"
    assert getattr(record, "path", None) == str(dead_letters)
