"""The service on Firestore end to end (issue 13): two `python -m app` processes, as two Cloud Run
instances, share one Firestore database (the emulator): a change delivered to both is emailed
once, a digest window filled through both is sent once, and /healthz reads the store."""

from __future__ import annotations

import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.factories import EVENTARC_PATH, binary, object_data
from tests.fakes.sendgrid import FakeSendGrid
from tests.servers import ServiceProcess

pytest_plugins = ["tests.firestore_emulator"]

RULES = """
version: 1
routes:
  - name: reports
    match: {prefix: reports/}
    to: [ops@example.com]
    digest: {window: 1s}
  - name: everything
    to: [ops@example.com]
"""


def environment(tmp_path: Path, store: str, fake: FakeSendGrid) -> dict[str, str]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(RULES), encoding="utf-8")
    return {
        "IDEMPOTENCY_STORE": store,
        "NOTIFY_RULES": str(rules),
        "NOTIFIER": "sendgrid",
        "SENDGRID_API_KEY": fake.api_key,
        "SENDGRID_HOST": fake.url,
        "NOTIFY_FROM": "notifier@example.com",
        "DEAD_LETTER_DIR": str(tmp_path / "dead-letter"),
        "DIGEST_FLUSH_SECONDS": "0",  # the test's flushes, two at once, are the only ones
    }


def deliver(url: str, data: dict[str, object]) -> httpx.Response:
    headers, body = binary(data)
    return httpx.post(url + EVENTARC_PATH, headers=headers, content=body, timeout=20)


def test_two_instances_on_one_firestore_email_each_change_once(
    firestore_url: str, tmp_path: Path
) -> None:
    with FakeSendGrid() as fake:
        env = environment(tmp_path, firestore_url, fake)
        with ServiceProcess(env, tmp_path) as one, ServiceProcess(env, tmp_path) as two:
            assert httpx.get(one.url + "/healthz", timeout=20).status_code == 200
            change = object_data(name="images/logo.png")
            fake.latency = 0.3  # the first send is in flight when the second instance claims
            with ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(lambda url: deliver(url, change), [one.url, two.url]))
            statuses = sorted(
                answer.json()["status"] if answer.status_code == 200 else str(answer.status_code)
                for answer in answers
            )
            # The second is a duplicate, or 409 while the first is still sending (redelivered).
            assert statuses in (["duplicate", "sent"], ["409", "sent"]), statuses
            assert deliver(two.url, change).json()["status"] == "duplicate"
            assert len(fake.accepted()) == 1
            # Redelivered to a new instance after the first two are gone: still remembered.
        fake.latency = 0.0
        with ServiceProcess(env, tmp_path) as three:
            assert deliver(three.url, change).json()["status"] == "duplicate"
    assert len(fake.accepted()) == 1


def test_a_digest_window_filled_through_two_instances_is_sent_once(
    firestore_url: str, tmp_path: Path
) -> None:
    with FakeSendGrid() as fake:
        env = environment(tmp_path, firestore_url, fake)
        with ServiceProcess(env, tmp_path) as one, ServiceProcess(env, tmp_path) as two:
            for i in range(6):
                url = (one, two)[i % 2].url
                answer = deliver(url, object_data(name=f"reports/r{i}.csv"))
                assert answer.json()["status"] == "digested", answer.text
            time.sleep(1)  # the window is due
            with ThreadPoolExecutor(4) as pool:
                flushes = list(
                    pool.map(
                        lambda url: httpx.post(url + "/digests/flush", timeout=30).json(),
                        [one.url, two.url] * 2,
                    )
                )
        assert sum(flush["flushed"] for flush in flushes) == 1
        [digest] = fake.accepted()
    assert digest["subject"].startswith("[gs://some-bucket] 6 changes under reports/")
