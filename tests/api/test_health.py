"""GET /healthz is Cloud Run's start-up probe, so "ready" must mean "able to deliver": a revision
whose store cannot be reached answers 503 from its first probe, within 5 s, saying nothing about
the store's address or errors (those go to the log)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.servers import ServiceProcess, free_port

pytest_plugins = ["tests.firestore_emulator", "tests.store_backends"]


def probe(url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = httpx.get(url + "/healthz", timeout=30)
    return answer, time.monotonic() - started


@contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts connections and never answers a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        server.close()


def started_unready(env: dict[str, str], tmp_path: Path) -> ServiceProcess:
    service = ServiceProcess({"NOTIFIER": "outbox", **env}, tmp_path)
    return service.start(wait=False)


def wait_for_an_answer(service: ServiceProcess) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(service.url + "/healthz", timeout=30)
        except httpx.TransportError:
            assert time.monotonic() < deadline, service.output()
            time.sleep(0.05)


@pytest.mark.parametrize("how", ["refused", "silent"])
def test_a_redis_store_that_cannot_be_reached_fails_the_start_up_probe(
    tmp_path: Path, how: str
) -> None:
    with silent_listener() as silent:
        port = free_port() if how == "refused" else silent
        service = started_unready({"IDEMPOTENCY_STORE": f"redis://127.0.0.1:{port}/0"}, tmp_path)
        try:
            first = wait_for_an_answer(service)
            answer, seconds = probe(service.url)
        finally:
            service.stop()
    for reply in (first, answer):
        assert reply.status_code == 503, reply.text
        assert reply.json()["detail"] == "the delivery state store cannot be reached"
        assert str(port) not in reply.text
        assert "redis" not in reply.text.lower()
    assert seconds < 6.5  # bounded: 5 s, and the probe's own round trip
    logged = [json.loads(line) for line in service.output().splitlines() if line.startswith("{")]
    reasons = [r for r in logged if r["message"] == "health check: the store cannot be reached"]
    assert reasons
    assert all(r["severity"] == "WARNING" for r in reasons)


def test_a_firestore_that_cannot_be_reached_fails_the_start_up_probe(tmp_path: Path) -> None:
    with silent_listener() as silent:
        env = {
            "IDEMPOTENCY_STORE": "firestore://test-project/gcs-notifier",
            "FIRESTORE_EMULATOR_HOST": f"127.0.0.1:{silent}",
        }
        service = started_unready(env, tmp_path)
        try:
            answer = wait_for_an_answer(service)
            again, seconds = probe(service.url)
        finally:
            service.stop()
    assert answer.status_code == 503, answer.text
    assert again.status_code == 503, again.text
    assert again.json()["detail"] == "the delivery state store cannot be reached"
    assert seconds < 6.5


def test_every_store_that_answers_passes_the_probe(store_url: str, tmp_path: Path) -> None:
    env = {"IDEMPOTENCY_STORE": store_url}
    with ServiceProcess({"NOTIFIER": "outbox", **env}, tmp_path) as service:
        answer, _ = probe(service.url)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ok"}
