"""The fault-injection schedule on Redis: three processes share a real redis-server, which is
paused (SIGSTOP) and made to refuse writes (maxmemory 1) at random while the processes are
killed, terminated and frozen and the fake SendGrid is slow, failing and hanging."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import harness
from tests.faults.cluster import RedisServer
from tests.redis_server import redis_server


@pytest.mark.redis
@pytest.mark.parametrize("seed", harness.seeds(), ids=lambda seed: f"seed{seed}")
def test_three_processes_on_redis_email_each_change_once_under_faults(
    seed: int, tmp_path: Path
) -> None:
    with redis_server(tmp_path) as url:
        store = RedisServer(url)
        try:
            run = harness.run(store, tmp_path, seed)
        finally:
            store.close()
    assert run.ok, run.failure()
