"""The fault-injection schedule on SQLite: one process (its claims live in its memory), killed,
terminated and paused at random, against a fake SendGrid that is slow, failing and hanging."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import harness
from tests.faults.cluster import SqliteFile


@pytest.mark.parametrize("seed", harness.seeds(), ids=lambda seed: f"seed{seed}")
def test_one_process_on_sqlite_emails_each_change_once_under_faults(
    seed: int, tmp_path: Path
) -> None:
    run = harness.run(SqliteFile(tmp_path / "state" / "notifier.db"), tmp_path, seed)
    assert run.ok, run.failure()
