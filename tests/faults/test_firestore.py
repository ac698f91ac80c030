"""The fault-injection schedule on Firestore (the emulator): three processes share one database;
the emulator's JVM is paused (SIGSTOP, never stopped: it keeps everything in memory) at random
while the processes are killed, terminated and frozen and the fake SendGrid misbehaves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import harness
from tests.faults.cluster import FirestoreEmulator

pytest_plugins = ["tests.firestore_emulator"]


@pytest.mark.parametrize("seed", harness.seeds(), ids=lambda seed: f"seed{seed}")
def test_three_processes_on_firestore_email_each_change_once_under_faults(
    seed: int, firestore_emulator: str, firestore_url: str, tmp_path: Path
) -> None:
    run = harness.run(FirestoreEmulator(firestore_emulator, firestore_url), tmp_path, seed)
    assert run.ok, run.failure()
