"""The real server on a free loopback port: uvicorn in a thread, or `python -m app` as a process.

The thread keeps tests fast and lets them hand in objects (a notifier, a store) and read logs;
the process is for what only a process shows: signals, start-up failures, several instances.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import httpx
import uvicorn

from app.config import Settings
from app.main import create_app
from app.notify.base import Notifier

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_up(
    url: str, deadline_seconds: float = 20.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"service exited with {process.returncode} before answering")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"service at {url} did not answer within {deadline_seconds} s")


class ThreadedServer:
    def __init__(self, settings: Settings, notifier: Notifier | None = None, **kwargs: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings, notifier=notifier, **kwargs)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_until_up(self.url)
        return self

    def __exit__(self, *_: object) -> None:
        # As SIGTERM does in `python -m app`: sends get their deadline, and open event streams
        # (/outbox/events) end, so uvicorn's shutdown is not held up by a page left open.
        runtime = getattr(self.app.state, "runtime", None)
        if runtime is not None:
            runtime.shutting_down(5)
        self.server.should_exit = True
        self.thread.join(timeout=15)


class ServiceProcess:
    """`python -m app` with the given environment; its stdout (the JSON log) goes to a file."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"service-{self.port}.log"
        base = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(
                ("NOTIFY", "SENDGRID", "EVENT_", "OIDC", "IDEMPOTENCY", "OUTBOX", "DEAD_LETTER")
            )
        }
        self.env = {
            **base,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "PYTHONPATH": str(ROOT),
            **env,
        }
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, wait: bool = True) -> ServiceProcess:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=self.workdir,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            wait_until_up(self.url, process=self.process)
        return self

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def refused(self, within_seconds: float = 10) -> str:
        """Start, expecting the service to refuse: it exits non-zero within `within_seconds`,
        printing no traceback. Returns everything it printed."""
        started = time.monotonic()
        self.start(wait=False)
        try:
            returncode = self.wait(timeout=within_seconds + 5)
        finally:
            self.stop()
        output = self.output()
        assert returncode != 0, output
        assert time.monotonic() - started < within_seconds
        assert "Traceback" not in output
        return output

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextlib.contextmanager
def service_process(env: Mapping[str, str], workdir: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(env, workdir) as service:
        yield service
