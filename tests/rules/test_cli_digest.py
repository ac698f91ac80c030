"""`python -m app.rules check` and `explain` with digest and rate routes (issue 11), run as an
operator runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.rules.test_cli import run, write

RULES = """
    version: 1
    routes:
      - name: reports
        match: {prefix: "reports/"}
        to: [finance@example.com, audit@example.com]
        digest:
          window: 5m
          leading: true
        subject: "{{ count }} changes under {{ prefix }}"
        text: |
          {% for item in items %}
          {{ item.name }}
          {% endfor %}
        continue: true
      - name: uploads
        match: {events: [finalized]}
        to: [ops@example.com]
        rate: {max: 20, per: 1h}
        subject: "new: {{ name }}"
      - name: quiet
        match: {prefix: "logs/"}
        to: [ops@example.com]
        digest: {window: 1d, max_items: 0}
"""


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    return write(tmp_path, RULES)


def test_check_shows_each_routes_digest_or_rate(rules: Path) -> None:
    result = run("check", rules)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{rules}: 3 routes, valid",
        "  reports: prefix reports/ -> finance@example.com, audit@example.com "
        "[continue; templates: subject/text; digest: window 5m, max_items 100, leading]",
        "  uploads: event finalized -> ops@example.com [templates: subject; rate: max 20 per 1h]",
        "  quiet: prefix logs/ -> ops@example.com [digest: window 1d, max_items 0]",
    ]


def test_check_a_bad_digest_key_exits_1_with_the_one_line_error(tmp_path: Path) -> None:
    rules = write(tmp_path, RULES.replace("window: 5m", "window: 5 minutes"))
    result = run("check", rules)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f'{rules}:7: route "reports": digest.window: write "5m" for "5 minutes"\n'
    )


def test_check_a_bad_digest_template_names_its_line_in_the_file(tmp_path: Path) -> None:
    rules = write(tmp_path, RULES.replace("{{ item.name }}", "{{ item.name }} {{ item.sise }}"))
    result = run("check", rules)
    assert result.returncode == 1
    assert result.stderr == (
        f'{rules}:12: route "reports": text: line 2 of the template: rendering a sample window '
        "failed: 'dict object' has no attribute 'sise' (did you mean \"size\"?)\n"
    )


def test_check_reads_a_digest_routes_templates_as_digest_templates(tmp_path: Path) -> None:
    # `name` is an event template's variable; a digest template tells a window.
    rules = write(tmp_path, RULES.replace("{{ count }} changes", "{{ name }} changes"))
    result = run("check", rules)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f'{rules}:9: route "reports": subject: line 1 of the template: unknown variable "name"'
    )


def test_explain_tells_which_routes_hold_the_event_for_a_digest(rules: Path) -> None:
    result = run("explain", rules, "--event=finalized", "--bucket=acme", "--name=reports/q3.csv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "finalized gs://acme/reports/q3.csv",
        "  reports: matched, taken: prefix reports/",
        "  uploads: matched, taken: event finalized",
        '  quiet: no match: prefix: "reports/q3.csv" does not start with "logs/"',
        "digest by route reports to finance@example.com, audit@example.com "
        "(digest: window 5m, max_items 100, leading)",
        "  the event joins the route's window: one email when it closes",
        "  or, as the first event after a quiet window, it goes at once, alone: "
        "subject: [gs://acme] finalized: reports/q3.csv",
        "email by route uploads to ops@example.com (rate: max 20 per 1h)",
        "  subject: new: reports/q3.csv",
        "  past the limit, the event joins the period's digest instead",
    ]


def test_explain_a_digest_route_without_leading_says_only_that_it_joins(rules: Path) -> None:
    result = run("explain", rules, "--event=deleted", "--bucket=acme", "--name=logs/a.log")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        "digest by route quiet to ops@example.com (digest: window 1d, max_items 0)",
        "  the event joins the route's window: one email when it closes",
    ]
