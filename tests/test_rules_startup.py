"""`python -m app` with a bad NOTIFY_RULES file (issue 10, item 3): it stops, exits non-zero and
says in one message which file, line, route and field is wrong, never with a traceback. A good
file starts it, and the log says how many routes it loaded."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import EVENTARC_PATH, binary, object_data
from tests.servers import ServiceProcess


def service(tmp_path: Path, rules: Path) -> ServiceProcess:
    return ServiceProcess(
        {
            "NOTIFY_RULES": str(rules),
            "NOTIFIER": "outbox",
            "OUTBOX_DIR": str(tmp_path / "outbox"),
            "DEAD_LETTER_DIR": str(tmp_path / "dead-letter"),
            "IDEMPOTENCY_STORE": "memory",
        },
        tmp_path,
    )


def refusal(tmp_path: Path, rules: Path) -> str:
    """Start the service with this rules file; it must exit non-zero, quickly. Returns the one
    line that says why."""
    output = service(tmp_path, rules).refused()
    [line] = [line for line in output.splitlines() if line.startswith("cannot start: ")]
    assert line.startswith("cannot start: NOTIFY_RULES: ")
    # Cloud Logging gets it as a structured entry too.
    [entry] = [entry for entry in json_lines(output) if entry["severity"] == "CRITICAL"]
    assert entry["error"] == line.removeprefix("cannot start: ")
    return line.removeprefix("cannot start: NOTIFY_RULES: ")


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


# (rules file, the line, route and field it names, what it says)
BAD_FILES = {
    "misspelled-key": (
        """
        version: 1
        routes:
          - name: finance-reports
            match:
              prefix: "reports/"
              sufix: ".csv"
            to: [finance@example.com]
        """,
        ':6: route "finance-reports": match.sufix: ',
        'unknown key "sufix" (did you mean "suffix"?)',
    ),
    "bad-glob": (
        """
        version: 1
        routes:
          - name: reports
            match:
              name: "reports/[abc.csv"
            to: [finance@example.com]
        """,
        ':5: route "reports": match.name: ',
        'unclosed "["',
    ),
    "misplaced-double-star": (
        """
        version: 1
        routes:
          - name: reports
            match: {name: "reports**/*.csv"}
            to: [finance@example.com]
        """,
        ':4: route "reports": match.name: ',
        '"**" must stand alone between slashes',
    ),
    "bad-size": (
        """
        version: 1
        routes:
          - name: big-files
            match:
              min_size: 10 potatoes
            to: [ops@example.com]
        """,
        ':5: route "big-files": match.min_size: ',
        'unknown unit "potatoes"',
    ),
    "unknown-event": (
        """
        version: 1
        routes:
          - name: uploads
            match:
              events: [finalized, finalised]
            to: [ops@example.com]
        """,
        ':5: route "uploads": match.events: ',
        'unknown event "finalised" (did you mean "finalized"?)',
    ),
    "bad-address": (
        """
        version: 1
        routes:
          - name: ops
            to:
              - ops@example.com
              - not an address
        """,
        ':6: route "ops": to: ',
        "not an email address",
    ),
    "duplicate-route-names": (
        """
        version: 1
        routes:
          - name: ops
            to: [ops@example.com]
          - name: ops
            to: [dev@example.com]
        """,
        ':5: route "ops": name: ',
        "duplicate route name (first on line 3)",
    ),
    "template-does-not-parse": (
        """
        version: 1
        routes:
          - name: ops
            to: [ops@example.com]
            subject: "new {{ name "
        """,
        ':5: route "ops": subject: ',
        "line 1 of the template: unexpected end of template",
    ),
    "template-names-an-unknown-variable": (
        """
        version: 1
        routes:
          - name: ops
            to: [ops@example.com]
            text: |
              {{ name }} arrived
              in {{ buckt }}
        """,
        ':7: route "ops": text: ',
        'line 2 of the template: unknown variable "buckt" (did you mean "bucket"?)',
    ),
    "neither-to-nor-drop": (
        """
        version: 1
        routes:
          - name: reports
            match: {prefix: "reports/"}
        """,
        ':3: route "reports": to: ',
        'missing: a route needs "to" (who to email) or "drop: true"',
    ),
    "not-yaml": (
        """
        version: 1
        routes: [ {name: ops
        """,
        ":3: ",
        "YAML: ",
    ),
    "yaml-but-not-rules": (
        """
        Dear ops, please email finance about reports.
        """,
        ":1: ",
        "the top level must be a mapping",
    ),
}


@pytest.mark.parametrize(("text", "where", "says"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_rules_file_stops_start_up_naming_file_line_route_and_field(
    tmp_path: Path, text: str, where: str, says: str
) -> None:
    rules = write(tmp_path, text)
    message = refusal(tmp_path, rules)
    assert message.startswith(f"{rules}{where}"), message
    assert says in message


def test_a_missing_rules_file_stops_start_up_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "rules" / "missing.yaml"
    message = refusal(tmp_path, missing)
    assert message == f"{missing}: cannot read the rules file: No such file or directory"


def test_a_rules_file_that_is_not_text_stops_start_up(tmp_path: Path) -> None:
    rules = tmp_path / "logo.png"
    rules.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    message = refusal(tmp_path, rules)
    assert message == f"{rules}:1: not UTF-8 text (byte 0x89)"


def test_a_folder_given_as_the_rules_file_stops_start_up(tmp_path: Path) -> None:
    message = refusal(tmp_path, tmp_path)
    assert message.startswith(f"{tmp_path}: cannot read the rules file: ")


def test_a_valid_rules_file_starts_the_service_and_routes_with_it(tmp_path: Path) -> None:
    rules = write(
        tmp_path,
        """
        version: 1
        routes:
          - name: quiet-logs
            match: {prefix: "logs/"}
            drop: true
          - name: everything-else
            to: [ops@example.com]
        """,
    )
    with service(tmp_path, rules) as process:
        dropped = deliver(process.url, "logs/app.log")
        sent = deliver(process.url, "data/a.csv")
    assert dropped.json()["status"] == "dropped"
    assert sent.json()["status"] == "sent"
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 1
    lines = json_lines(process.output())
    [started] = [line for line in lines if line["message"] == "service started"]
    assert "recipients" not in started  # NOTIFY_TO plays no part with a rules file
    [loaded] = [line for line in lines if line["message"] == "routing rules loaded"]
    assert loaded["routes"] == 2
    assert loaded["rules"] == str(rules)


def deliver(url: str, name: str) -> httpx.Response:
    headers, body = binary(object_data(name=name))
    return httpx.post(url + EVENTARC_PATH, headers=headers, content=body, timeout=10)
