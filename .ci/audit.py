"""`make audit`: pip-audit over requirements.txt (the runtime pins that go into the image).

Fails on any known vulnerability, and on any run that produced no trustworthy report: pip-audit
crashing, printing no JSON, or exiting with a code its report does not explain. One failure is
reported as skipped instead: the vulnerability service could not be reached (no network beyond
package mirrors, or a proxy that answers 404 for PyPI's JSON API). An audit that could not run is
reported as skipped, never as clean.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# What pip-audit 2.x leaves on stderr when PyPI cannot be reached: its own ConnectionError
# (connect timeout, redirect loop), logged before it exits 1, or a requests exception it does not
# catch (DNS failure, refused or reset connection, proxy error, read timeout) as the last line of
# a traceback. Anything else without a report is a crash.
_UNREACHABLE = re.compile(
    r"Could not connect to PyPI's vulnerability feed"
    r"|PyPI is not redirecting properly"
    r"|Tip: your network may be blocking this service"
    r"|^requests\.exceptions\.(?:ConnectionError|ConnectTimeout|ReadTimeout|ProxyError)\b",
    re.MULTILINE,
)

# pip-audit's skip reason when PyPI's JSON API answers 404 for a pinned release.
_NOT_ON_PYPI = "not found on PyPI"


def main() -> int:
    command = [
        sys.executable,
        "-m",
        "pip_audit",
        "-r",
        str(ROOT / "requirements.txt"),
        "--no-deps",
        "--disable-pip",
        "--progress-spinner",
        "off",
        "--format",
        "json",
        "--timeout",
        "20",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        code, lines = 1, ["FAILED, pip-audit did not finish within 600 s"]
    else:
        code, lines = verdict(result.returncode, result.stdout, result.stderr)
    sys.stdout.write("".join(f"audit: {line}\n" for line in lines))
    return code


def verdict(returncode: int, stdout: str, stderr: str) -> tuple[int, list[str]]:
    """How one pip-audit run ends the audit: exit code and what to say."""
    last = _last_line(stderr)
    try:
        report = json.loads(stdout)
    except ValueError:
        report = None
    if not isinstance(report, dict) or not isinstance(report.get("dependencies"), list):
        if returncode != 0 and _UNREACHABLE.search(stderr):
            return 0, [f"skipped, the vulnerability service could not be reached: {last}"]
        return 1, [f"FAILED, pip-audit exited {returncode} without a report: {last}"]
    if returncode not in (0, 1):
        return 1, [f"FAILED, pip-audit exited {returncode}: {last}"]
    code, lines = judge(report)
    if returncode == 1 and code == 0:
        # pip-audit exits 1 for vulnerabilities; with none in the report, something else failed.
        return 1, [f"FAILED, pip-audit exited 1 but reported no vulnerability: {last}"]
    return code, lines


def judge(report: dict[str, Any]) -> tuple[int, list[str]]:
    """pip-audit's JSON report -> exit code and what to say."""
    dependencies = report.get("dependencies", [])
    vulnerable = [d for d in dependencies if d.get("vulns")]
    audited = [d for d in dependencies if "skip_reason" not in d]
    lines = [
        f"{d['name']} {d['version']}: {vuln['id']} "
        f"(fixed in {', '.join(vuln.get('fix_versions', [])) or 'no release yet'})"
        for d in vulnerable
        for vuln in d["vulns"]
    ]
    if vulnerable:
        return 1, [*lines, f"FAILED, {len(vulnerable)} vulnerable dependencies"]
    if not dependencies:
        return 1, ["FAILED, the report lists no dependencies: requirements.txt was not read"]
    if not audited:
        # Every pinned release "not found on PyPI" means PyPI's JSON API did not answer (a mirror
        # or proxy in between), not that fastapi vanished; any other skip reason is not that.
        if all(_NOT_ON_PYPI in str(d.get("skip_reason")) for d in dependencies):
            return 0, [
                "skipped, the vulnerability service could not be reached "
                f"({len(dependencies)} pinned dependencies not audited)"
            ]
        reasons = sorted({str(d.get("skip_reason")) for d in dependencies})
        return 1, [f"FAILED, no dependency could be audited: {'; '.join(reasons)}"]
    skipped = len(dependencies) - len(audited)
    note = f" ({skipped} could not be audited)" if skipped else ""
    return 0, [f"no known vulnerabilities in {len(audited)} dependencies{note}"]


def _last_line(stderr: str) -> str:
    return (stderr.strip().splitlines() or ["no output"])[-1]


if __name__ == "__main__":
    sys.exit(main())
