"""A real `redis-server` on a free loopback port, for the tests that need a shared store.

Outside CI a machine without redis-server skips those tests with a clear reason; under CI=true
(where .ci/run installs it) a missing binary is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from tests.servers import free_port


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required under CI=true (.ci/run installs it)")
        pytest.skip("redis-server not installed (apt-get install redis-server); CI runs these")
    return binary


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """Start redis-server without persistence; yields its URL, stops it afterwards."""
    port = free_port()
    process = subprocess.Popen(
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
