"""`make audit`: pip-audit over requirements.txt (the runtime pins that go into the image).

Fails on any known vulnerability. When the vulnerability service cannot be reached (no network
beyond package mirrors, or PyPI's JSON API is unavailable), says so and passes: an audit that
could not run is reported as skipped, never as clean.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


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
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        sys.stdout.write(f"audit: skipped, pip-audit could not run: {last}\n")
        return 0
    code, lines = judge(report)
    sys.stdout.write("".join(f"audit: {line}\n" for line in lines))
    return code


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
    if not audited:
        return 0, [
            "skipped, the vulnerability service could not be reached "
            f"({len(dependencies)} pinned dependencies not audited)"
        ]
    skipped = len(dependencies) - len(audited)
    note = f" ({skipped} could not be audited)" if skipped else ""
    return 0, [f"no known vulnerabilities in {len(audited)} dependencies{note}"]


if __name__ == "__main__":
    sys.exit(main())
