"""A pytest plugin: `store_url`, IDEMPOTENCY_STORE for each of the four backends (memory, a
SQLite file, a real redis-server, the Firestore emulator), for tests that must hold on all of
them. A test module says `pytest_plugins = ["tests.firestore_emulator", "tests.store_backends"]`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.stores.factory import open_digest_store
from app.stores.windows import DigestStore
from tests.redis_server import redis_server

BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis), "firestore"]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/state/notifier.db"
    elif request.param == "firestore":
        yield request.getfixturevalue("firestore_url")
    else:
        with redis_server(tmp_path) as url:
            yield url


@pytest.fixture
def open_windows(store_url: str) -> Callable[[], DigestStore]:
    """Opens a digest store on `store_url`; called again, another instance on the same storage, as
    a second process would have (for `memory`, the same object: it lives in one process)."""
    shared: list[DigestStore] = []

    def opener() -> DigestStore:
        if store_url == "memory" and shared:
            return shared[0]
        store = open_digest_store(store_url)
        shared.append(store)
        return store

    return opener
