"""`python -m app.rules check` and `explain` (issue 10, item 4), run as an operator runs them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.servers import ROOT

RULES = """
    version: 1
    routes:
      - name: quiet-logs
        match: {prefix: "logs/"}
        drop: true
      - name: finance-reports
        match:
          events: [finalized]
          name: "reports/**/*.csv"
          min_size: 1KiB
        not: {suffix: ".tmp.csv"}
        to: [finance@example.com, audit@example.com]
        subject: "[{{ bucket }}] new report {{ name }} ({{ size_human }})"
        continue: true
      - name: team-files
        match:
          content_type: "text/*"
          metadata: {team: "*", reviewed: "y*"}
        to: [Audit@example.com, team@example.com]
        html: "<p>{{ metadata.team }}</p>"
      - name: everything-else
        to: [ops@example.com]
"""


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.rules", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    return write(tmp_path, RULES)


def explain(rules: Path, *args: str) -> list[str]:
    result = run("explain", rules, *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


BAD = """
    version: 1
    routes:
      - name: finance-reports
        match:
          prefix: "reports/"
          sufix: ".csv"
        to: [finance@example.com]
"""


def assert_one_line_error(result: subprocess.CompletedProcess[str], rules: Path) -> None:
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr == (
        f'{rules}:6: route "finance-reports": match.sufix: unknown key "sufix" '
        '(did you mean "suffix"?)\n'
    )


# --- check ---------------------------------------------------------------------------------


def test_check_a_valid_file_prints_one_summary_line_per_route(rules: Path) -> None:
    result = run("check", rules)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        f"{rules}: 4 routes, valid",
        "  quiet-logs: prefix logs/ -> drop",
        "  finance-reports: event finalized, name reports/**/*.csv, min_size 1 KiB, "
        "not (suffix .tmp.csv) -> finance@example.com, audit@example.com "
        "[continue; templates: subject]",
        "  team-files: content_type text/*, metadata team=* and reviewed=y* "
        "-> Audit@example.com, team@example.com [templates: html]",
        "  everything-else: every event -> ops@example.com",
    ]


def test_check_the_example_rules_file_at_the_repository_root() -> None:
    result = run("check", "rules.example.yaml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "rules.example.yaml: 5 routes, valid"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "quiet-logs",
        "quiet-temporary-files",
        "finance-reports",
        "photo-uploads",
        "everything-else",
    ]
    assert lines[4].endswith("[digest: window 1m, max_items 100]")


def test_check_a_bad_file_exits_1_with_the_one_line_error(tmp_path: Path) -> None:
    rules = write(tmp_path, BAD)
    assert_one_line_error(run("check", rules), rules)


def test_check_a_bad_template_names_its_line_in_the_file(tmp_path: Path) -> None:
    rules = write(
        tmp_path,
        """
        version: 1
        routes:
          - name: ops
            to: [ops@example.com]
            html: |
              <p>{{ name }}</p>
              <p>{{ name | upper }} {{ size_humen }}</p>
        """,
    )
    result = run("check", rules)
    assert result.returncode == 1
    assert result.stderr == (
        f'{rules}:7: route "ops": html: line 2 of the template: unknown variable "size_humen" '
        '(did you mean "size_human"?)\n'
    )


def test_check_a_missing_file_exits_1_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run("check", missing)
    assert result.returncode == 1
    assert result.stderr == f"{missing}: cannot read the rules file: No such file or directory\n"


def test_check_without_a_file_is_a_usage_error() -> None:
    result = run("check")
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


# --- explain -------------------------------------------------------------------------------


def test_explain_shows_each_route_who_is_emailed_and_the_rendered_subject(rules: Path) -> None:
    lines = explain(
        rules,
        "--event=finalized",
        "--bucket=acme",
        "--name=reports/2024/q3.csv",
        "--size=2MiB",
        "--content-type=text/csv",
        "--metadata",
        "team=finance",
        "--metadata",
        "reviewed=yes",
    )
    assert lines == [
        "finalized gs://acme/reports/2024/q3.csv",
        '  quiet-logs: no match: prefix: "reports/2024/q3.csv" does not start with "logs/"',
        "  finance-reports: matched, taken: event finalized, name reports/**/*.csv, "
        "min_size 1 KiB, not (suffix .tmp.csv)",
        "  team-files: matched, taken: content_type text/*, metadata team=* and reviewed=y*",
        "  everything-else: matched, not reached (an earlier route without continue took the "
        "event): every event",
        "email by route finance-reports to finance@example.com, audit@example.com",
        "  subject: [acme] new report reports/2024/q3.csv (2.0 MiB (2,097,152 bytes))",
        # Audit@ heard from finance-reports already: team-files emails only team@.
        "email by route team-files to team@example.com",
        "  subject: [gs://acme] finalized: reports/2024/q3.csv",
    ]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--event", "deleted"], "finance-reports: no match: event: deleted is not finalized"),
        (
            ["--name", "reports/q3.txt"],
            'finance-reports: no match: name: "reports/q3.txt" does not match "reports/**/*.csv"',
        ),
        (["--size", "1023"], "finance-reports: no match: min_size: 1023 bytes is less than 1 KiB"),
        ([], "finance-reports: no match: min_size: the event has no size"),
        (
            ["--name", "reports/q3.tmp.csv", "--size", "2048"],
            "finance-reports: no match: not: matched (suffix .tmp.csv)",
        ),
    ],
    ids=["event", "name", "size", "no-size", "not"],
)
def test_explain_names_the_first_condition_that_failed(
    rules: Path, args: list[str], reason: str
) -> None:
    given = {"--event": "finalized", "--bucket": "acme", "--name": "reports/q3.csv"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        given[flag] = value
    lines = explain(rules, *[f"{flag}={value}" for flag, value in given.items()])
    assert f"  {reason}" in lines
    assert lines[-2:] == [
        "email by route everything-else to ops@example.com",
        f"  subject: [gs://acme] {given['--event']}: {given['--name']}",
    ]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ([], "team-files: no match: content_type: the object has no content type"),
        (
            ["--content-type", "image/png"],
            'team-files: no match: content_type: "image/png" does not match "text/*"',
        ),
        (
            ["--content-type", "text/plain"],
            "team-files: no match: metadata: the object has no custom metadata",
        ),
        (
            ["--content-type", "text/plain", "--metadata", "reviewed=yes"],
            'team-files: no match: metadata: the object has no key "team"',
        ),
        (
            ["--content-type", "text/plain", "--metadata", "team=x", "--metadata", "reviewed=no"],
            'team-files: no match: metadata.reviewed: "no" does not match "y*"',
        ),
    ],
    ids=["no-content-type", "content-type", "no-metadata", "missing-key", "value"],
)
def test_explain_reads_content_type_and_metadata(rules: Path, args: list[str], reason: str) -> None:
    lines = explain(rules, "--event", "finalized", "--bucket", "b", "--name", "a.txt", *args)
    assert f"  {reason}" in lines
    assert lines[-2] == "email by route everything-else to ops@example.com"


def test_explain_takes_a_metadata_value_with_equals_signs(rules: Path) -> None:
    lines = explain(
        rules,
        *("--event", "finalized", "--bucket", "b", "--name", "a.txt"),
        *("--content-type", "text/plain; charset=utf-8"),
        *("--metadata", "team=a=b", "--metadata", "reviewed=yes"),
    )
    assert "email by route team-files to Audit@example.com, team@example.com" in lines


def test_explain_a_dropped_event(rules: Path) -> None:
    lines = explain(rules, "--event", "finalized", "--bucket", "b", "--name", "logs/app.log")
    assert lines[1] == "  quiet-logs: matched, taken: prefix logs/"
    assert lines[-1] == "result: dropped by route quiet-logs: acknowledged, nobody is emailed"
    assert not any(line.startswith("email by route") for line in lines)


def test_explain_an_event_no_route_matches(tmp_path: Path) -> None:
    rules = write(
        tmp_path,
        """
        version: 1
        routes:
          - name: reports
            match: {prefix: "reports/"}
            to: [finance@example.com]
        """,
    )
    lines = explain(rules, "--event", "deleted", "--bucket", "b", "--name", "photos/cat.jpg")
    assert lines == [
        "deleted gs://b/photos/cat.jpg",
        '  reports: no match: prefix: "photos/cat.jpg" does not start with "reports/"',
        "result: no route matched: acknowledged as ignored, nobody is emailed",
    ]


def test_explain_shows_an_object_name_with_a_line_break_on_one_line(rules: Path) -> None:
    lines = explain(rules, "--event", "finalized", "--bucket", "b", "--name", "a\nfake line")
    assert lines[0] == "finalized gs://b/a\\x0afake line"
    assert "fake line" not in lines[1:-1]
    assert lines[-1] == "  subject: [gs://b] finalized: a fake line"


def test_explain_on_a_bad_file_exits_1_with_the_one_line_error(tmp_path: Path) -> None:
    rules = write(tmp_path, BAD)
    result = run("explain", rules, "--event", "finalized", "--bucket", "b", "--name", "x")
    assert_one_line_error(result, rules)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--metadata", "team"], "argument --metadata: takes KEY=VALUE, not 'team'"),
        (["--metadata", "=finance"], "argument --metadata: takes KEY=VALUE, not '=finance'"),
        (["--size", "big"], 'argument --size: not a size: "big"'),
        (["--size", "1.5KiB"], 'argument --size: sizes are whole numbers: write "1536B"'),
        (["--size", "-1"], "argument --size: not a size"),
        (["--event", "created"], "argument --event: invalid choice: 'created'"),
        (["--name", ""], "argument --name: must not be empty"),
    ],
    ids=["metadata-no-equals", "metadata-no-key", "size", "fraction", "negative", "event", "name"],
)
def test_explain_refuses_bad_arguments_as_usage_errors(
    rules: Path, args: list[str], says: str
) -> None:
    given = {"--event": "finalized", "--bucket": "b", "--name": "x"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        given[flag] = value
    result = run("explain", rules, *[f"{flag}={value}" for flag, value in given.items()])
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "usage: python -m app.rules explain" in result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr
