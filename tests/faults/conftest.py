"""The fault-injection suite (issue 18): each test file runs one seeded schedule of faults
against real `python -m app` processes on one store and judges the emails from the outside.

FAULT_SEED repeats a run; FAULT_PROFILE=chaos (make chaos) runs longer schedules over several
seeds (CHAOS_SEEDS, CHAOS_EVENTS, CHAOS_SECONDS); FAULTS_APP_ROOT runs another checkout's
service. The terminal summary lists every run: its seed, time and what it found.
"""

from __future__ import annotations

from typing import Any

from tests.faults import harness


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if harness.summaries:
        terminalreporter.write_sep(
            "-", f"fault-injection runs (service: {harness.app_under_test()})"
        )
        for line in harness.summaries:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"reports: {harness.REPORTS}")
