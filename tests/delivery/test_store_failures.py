"""A store that fails at any step of a delivery: the event is answered 503 (Eventarc delivers it
again), every claim the delivery held is completed or released, and /healthz tells."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from app.stores.base import Claim, StoreUnavailable
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

    async def claim(self, key: str, owner: str, lease_seconds: float) -> Claim:
        self._maybe_fail("claim")
        return await super().claim(key, owner, lease_seconds)

    async def complete(self, key: str, owner: str, keep_seconds: float) -> None:
        self._maybe_fail("complete")
        await super().complete(key, owner, keep_seconds)

    async def release(self, key: str, owner: str) -> None:
        self._maybe_fail("release")
        await super().release(key, owner)

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


def test_a_complete_that_fails_after_the_send_releases_the_claim_and_answers_503(
    service: ThreadedServer, store: FailingStore, tmp_path: Path
) -> None:
    data = object_data(name="a.txt")
    store.fail("complete")
    assert_retry_later(deliver(service.url, *binary(data)))
    sent_before = emails(tmp_path)
    assert sent_before >= 1
    # The claim was given back: the redelivery is not "in flight" (409) for a whole lease.
    again = deliver(service.url, *binary(data))
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "sent"
    # And now it is done for good.
    assert deliver(service.url, *binary(data)).json()["status"] == "duplicate"


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
    for operation in ("claim", "complete"):
        store.fail(operation)
        answer = deliver(service.url, *binary(object_data(name=f"{operation}.txt")))
        assert answer.status_code == 503


def test_healthz_reports_a_store_that_cannot_be_reached_once_it_is_open(
    service: ThreadedServer, store: FailingStore
) -> None:
    store.fail("ping", times=100)
    # Before the first event the store is not open: nothing to report.
    assert httpx.get(service.url + "/healthz").status_code == 200
    assert "ping" not in store.calls
    deliver(service.url, *binary())
    answer = httpx.get(service.url + "/healthz")
    assert answer.status_code == 503
    assert "idempotency store unavailable" in answer.json()["detail"]
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
