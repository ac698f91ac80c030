"""The fake SendGrid both systems send to (tests/fakes/sendgrid.py, as its own process), driven
through its control endpoints, and the check that every 2xx answer stands for a delivered mail."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import systems
from bench.processes import Server, clean_environment, free_port


@dataclasses.dataclass(frozen=True, slots=True)
class Mails:
    received: int  # mail send requests the fake got
    accepted: int  # of which answered 202 and counted as delivered
    by_status: dict[str, int]


def request(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class FakeSendGrid:
    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def stats(self) -> dict[str, Any]:
        status, body = request(self.server.port, "GET", "/__fake/stats")
        if status != 200:
            raise RuntimeError(f"fake SendGrid stats answered {status}")
        stats: dict[str, Any] = json.loads(body)
        return stats

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.server.check_alive()
            try:
                self.stats()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def set_latency(self, milliseconds: float) -> None:
        body = json.dumps({"latency_ms": milliseconds}).encode()
        status, _ = request(self.server.port, "POST", "/__fake/config", body)
        if status != 204:
            raise RuntimeError(f"fake SendGrid config answered {status}")

    def reset(self) -> None:
        status, _ = request(self.server.port, "POST", "/__fake/reset")
        if status != 204:
            raise RuntimeError(f"fake SendGrid reset answered {status}")

    def settle(self, latency_ms: float, timeout: float = 30.0) -> Mails:
        """Counts once the server has finished what wrk left in flight at its stop.

        wrk stops counting at the end of its duration, but the requests it had sent are still
        processed (and emailed) by the server: wait until every mail request is answered and no
        new one has arrived for a while (the baseline drains up to 80 queued requests 8 at a
        time, one SendGrid latency each).
        """
        quiet = max(1.0, 4 * latency_ms / 1000)
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        last_change = time.monotonic()
        while True:
            stats = self.stats()
            answered = sum(stats["by_status"].values())
            if last is None or stats["requests"] != last["requests"]:
                last_change = time.monotonic()
            last = stats
            if answered == stats["requests"] and time.monotonic() - last_change >= quiet:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return Mails(
            received=last["requests"], accepted=last["accepted"], by_status=last["by_status"]
        )


@contextlib.contextmanager
def fake_sendgrid_process(log: Path) -> Iterator[tuple[FakeSendGrid, str]]:
    """A fake SendGrid of its own (no latency, a fresh API key), for the rows measured in
    process: the fake, ready, and the key it accepts. Stopped on the way out."""
    api_key = f"SG.{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(32)}"
    port = free_port()
    argv = [
        systems.DEV_PYTHON,
        "-m",
        "tests.fakes.sendgrid",
        f"--port={port}",
        "--latency-ms=0",
        f"--api-key={api_key}",
    ]
    env = clean_environment(PYTHONPATH=str(systems.ROOT))
    with Server("fake-sendgrid", argv, env=env, cwd=systems.ROOT, log=log, port=port) as server:
        fake = FakeSendGrid(server)
        fake.wait_ready()
        yield fake, api_key


def check_mails(succeeded: int, mails: Mails, in_flight_limit: int) -> list[str]:
    """Every 2xx answer must stand for an accepted mail; at most `in_flight_limit` more mails
    (the requests wrk abandoned at its stop, answered after it stopped counting)."""
    problems = []
    if mails.received != mails.accepted:
        problems.append(
            f"the fake SendGrid refused {mails.received - mails.accepted} of "
            f"{mails.received} mail requests (by status: {mails.by_status})"
        )
    extra = mails.accepted - succeeded
    if extra < 0:
        problems.append(
            f"MISMATCH: {succeeded} events answered 2xx but only {mails.accepted} mails "
            f"accepted ({-extra} answered 2xx without a mail)"
        )
    elif extra > in_flight_limit:
        problems.append(
            f"MISMATCH: {mails.accepted} mails accepted for {succeeded} events answered 2xx: "
            f"{extra} more than wrk could have had in flight ({in_flight_limit})"
        )
    return problems
