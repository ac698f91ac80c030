"""The audit step fails on a known vulnerability and on any pip-audit run that produced no
trustworthy report; only an unreachable vulnerability service is reported as skipped, never as
clean."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
AUDIT = ROOT / ".ci" / "audit.py"

CLEAN_REPORT = json.dumps(
    {"dependencies": [{"name": "fastapi", "version": "0.165.0", "vulns": []}], "fixes": []}
)

# stderr of pip-audit 2.10 runs that could not reach PyPI.
CONNECT_TIMEOUT = (
    "ERROR:pip_audit._cli:Could not connect to PyPI's vulnerability feed\n"
    "ERROR:pip_audit._cli:Tip: your network may be blocking this service. "
    "Try another service with `-s SERVICE`\n"
)
DNS_FAILURE = (
    "Traceback (most recent call last):\n"
    '  File "/venv/lib/python3.11/site-packages/pip_audit/_service/pypi.py", line 64, in query\n'
    "    response: requests.Response = self.session.get(url=url, timeout=self.timeout)\n"
    "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='pypi.org', port=443): "
    "Max retries exceeded with url: /pypi/fastapi/0.165.0/json "
    "(Caused by NameResolutionError(\"Failed to resolve 'pypi.org'\"))\n"
)
# stderr of pip-audit runs that crashed for other reasons.
CRASH = (
    "Traceback (most recent call last):\n"
    '  File "/venv/lib/python3.11/site-packages/pip_audit/_cli.py", line 570, in audit\n'
    "    vulns = response_json.get('vulnerabilities')\n"
    "KeyError: 'vulnerabilities'\n"
)
BAD_REQUIREMENTS = "ERROR:pip_audit._cli:requirements.txt: Invalid requirement: 'fastapi=='\n"


def load_audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_audit", AUDIT)
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
    code, lines = load_audit().verdict(1, json.dumps(report), "")
    assert code == 1
    assert "aiohttp 3.9.0: GHSA-xxxx (fixed in 3.9.4)" in lines


def test_a_json_api_that_answers_404_for_everything_is_reported_as_skipped_not_clean() -> None:
    report = {
        "dependencies": [
            {
                "name": "fastapi",
                "skip_reason": "Dependency not found on PyPI and could not be "
                "audited: fastapi (0.165.0)",
            },
        ]
    }
    code, lines = load_audit().verdict(0, json.dumps(report), "")
    assert code == 0
    assert lines[0].startswith("skipped")


def test_a_clean_audit_counts_what_it_audited() -> None:
    report = {
        "dependencies": [
            {"name": "fastapi", "version": "0.165.0", "vulns": []},
            {"name": "odd", "skip_reason": "not on PyPI"},
        ]
    }
    assert load_audit().verdict(0, json.dumps(report), "") == (
        0,
        ["no known vulnerabilities in 1 dependencies (1 could not be audited)"],
    )


@pytest.mark.parametrize("stderr", [CONNECT_TIMEOUT, DNS_FAILURE], ids=["timeout", "dns"])
def test_an_unreachable_service_is_skipped(stderr: str) -> None:
    code, lines = load_audit().verdict(1, "", stderr)
    assert code == 0
    assert lines == [
        f"skipped, the vulnerability service could not be reached: "
        f"{stderr.strip().splitlines()[-1]}"
    ]


@pytest.mark.parametrize(
    ("returncode", "stdout", "stderr"),
    [
        (1, "", CRASH),
        (1, "", BAD_REQUIREMENTS),
        (1, "", ""),
        (2, "", "usage: pip-audit [-h] ...\npip-audit: error: unrecognized arguments: --bogus\n"),
        (0, "", ""),  # exited 0 but printed no report
        (1, "No known vulnerabilities found\n", CRASH),  # not JSON
        (1, "[]", CRASH),  # JSON, but not a report
        (-9, CLEAN_REPORT, ""),  # killed after printing
        (1, CLEAN_REPORT, CRASH),  # exit 1 with nothing vulnerable in the report
    ],
    ids=[
        "traceback",
        "bad-requirements",
        "silent",
        "usage-error",
        "no-output",
        "not-json",
        "not-a-report",
        "killed",
        "unexplained-exit-1",
    ],
)
def test_any_other_failure_fails_the_audit(returncode: int, stdout: str, stderr: str) -> None:
    code, lines = load_audit().verdict(returncode, stdout, stderr)
    assert code == 1
    assert len(lines) == 1
    assert lines[0].startswith("FAILED")


def test_a_connection_error_text_in_a_clean_exit_is_not_a_skip() -> None:
    # Only a failed run can be "unreachable": exit 0 without a report is a broken run.
    code, _ = load_audit().verdict(0, "", CONNECT_TIMEOUT)
    assert code == 1


def test_a_report_without_dependencies_fails() -> None:
    code, lines = load_audit().verdict(0, json.dumps({"dependencies": []}), "")
    assert code == 1
    assert "lists no dependencies" in lines[0]


def test_skips_for_other_reasons_than_an_unanswered_pypi_fail() -> None:
    report = {"dependencies": [{"name": "x", "skip_reason": "editable requirement"}]}
    code, lines = load_audit().verdict(0, json.dumps(report), "")
    assert code == 1
    assert "editable requirement" in lines[0]


def run_audit_with_fake_pip_audit(tmp_path: Path, main_py: str) -> subprocess.CompletedProcess[str]:
    """`.ci/audit.py` end to end, a fake `pip_audit` on PYTHONPATH in front of the real one."""
    package = tmp_path / "pip_audit"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(textwrap.dedent(main_py))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        [sys.executable, str(AUDIT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_a_crashing_pip_audit_fails_make_audit(tmp_path: Path) -> None:
    result = run_audit_with_fake_pip_audit(tmp_path, "raise KeyError('vulnerabilities')\n")
    assert result.returncode == 1
    assert (
        result.stdout == "audit: FAILED, pip-audit exited 1 without a report: "
        "KeyError: 'vulnerabilities'\n"
    )


def test_an_unreachable_pypi_is_skipped_by_make_audit(tmp_path: Path) -> None:
    result = run_audit_with_fake_pip_audit(
        tmp_path,
        """
        import sys
        sys.stderr.write("ERROR:pip_audit._cli:Could not connect to PyPI's vulnerability feed\\n")
        sys.exit(1)
        """,
    )
    assert result.returncode == 0
    assert result.stdout.startswith(
        "audit: skipped, the vulnerability service could not be reached"
    )


def test_the_fake_is_called_with_the_runtime_pins(tmp_path: Path) -> None:
    result = run_audit_with_fake_pip_audit(
        tmp_path,
        f"""
        import sys
        assert sys.argv[sys.argv.index("-r") + 1] == {str(ROOT / "requirements.txt")!r}
        assert sys.argv[sys.argv.index("--format") + 1] == "json"
        print({CLEAN_REPORT!r})
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "audit: no known vulnerabilities in 1 dependencies\n"
