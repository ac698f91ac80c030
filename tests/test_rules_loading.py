"""The rules file loads in a worker thread at start-up: /datetime is served at once, /healthz
(Cloud Run's start-up probe) and events wait for the rules, and a bad file leaves events and
/healthz answering 503 (under `python -m app` it also stops the process:
tests/test_rules_startup.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.main import create_app
from bench.rules_file import example_rules
from tests.conftest import outbox_settings, read_outbox
from tests.factories import EVENTARC_PATH, binary, object_data
from tests.servers import free_port


@contextmanager
def serving_without_waiting(rules: Path, tmp_path: Path) -> Iterator[str]:
    """The real server, returned as soon as it answers /datetime (not /healthz)."""
    port = free_port()
    app = create_app(outbox_settings(tmp_path, notify_rules=rules))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{url}/datetime", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_healthz_waits_for_a_large_file_rather_than_failing_the_probe(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(example_rules(1000, to=("ops@example.com",)))
    with serving_without_waiting(rules, tmp_path) as url:
        answer = httpx.get(url + "/healthz", timeout=10)
        assert answer.status_code == 200, answer.text


def test_an_event_sent_while_a_large_file_loads_waits_for_it(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(example_rules(1000, to=("ops@example.com",)))
    with serving_without_waiting(rules, tmp_path) as url:
        headers, body = binary(object_data(name="reports/7/day-7.csv", contentType="text/csv"))
        answer = httpx.post(url + EVENTARC_PATH, headers=headers, content=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "sent"
        assert httpx.get(url + "/healthz").status_code == 200
    [message] = read_outbox(tmp_path / "outbox")
    assert str(message["To"]) == "ops@example.com"


def test_a_bad_file_leaves_events_and_healthz_at_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nroutes:\n  - name: a\n    match: {sufix: .csv}\n    to: [a@b.c]\n"
    )
    with serving_without_waiting(rules, tmp_path) as url:
        health = httpx.get(url + "/healthz", timeout=10)
        assert health.status_code == 503
        assert 'did you mean \\"suffix\\"' in health.text
        headers, body = binary()
        answer = httpx.post(url + EVENTARC_PATH, headers=headers, content=body, timeout=10)
        assert answer.status_code == 503
        assert "Retry-After" in answer.headers
        assert "routing rules not ready" in answer.json()["detail"]
    [critical] = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert "rules.yaml:4" in str(getattr(critical, "error", ""))
    assert not (tmp_path / "outbox").exists() or not list((tmp_path / "outbox").iterdir())
