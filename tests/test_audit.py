"""The audit step fails on a known vulnerability and never reports an audit it could not run
as clean."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_audit", ROOT / ".ci" / "audit.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_known_vulnerability_fails_the_audit() -> None:
    report = {
        "dependencies": [
            {"name": "fastapi", "version": "0.165.0", "vulns": []},
            {
                "name": "aiohttp",
                "version": "3.9.0",
                "vulns": [{"id": "GHSA-xxxx", "fix_versions": ["3.9.4"]}],
            },
        ]
    }
    code, lines = load_audit().judge(report)
    assert code == 1
    assert "aiohttp 3.9.0: GHSA-xxxx (fixed in 3.9.4)" in lines


def test_an_unreachable_service_is_reported_as_skipped_not_clean() -> None:
    report = {"dependencies": [{"name": "fastapi", "skip_reason": "Dependency not found on PyPI"}]}
    code, lines = load_audit().judge(report)
    assert code == 0
    assert lines[0].startswith("skipped")


def test_a_clean_audit_counts_what_it_audited() -> None:
    report = {
        "dependencies": [
            {"name": "fastapi", "version": "0.165.0", "vulns": []},
            {"name": "odd", "skip_reason": "not on PyPI"},
        ]
    }
    assert load_audit().judge(report) == (
        0,
        ["no known vulnerabilities in 1 dependencies (1 could not be audited)"],
    )
