"""The rules file: the format of issue 10 read into routes, and every bad file refused with one
RulesError naming the file, the line, the route and the field (never another exception)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.events.models import EventType
from app.rules.model import (
    Conditions,
    RouteSpec,
    RulesError,
    glob_parts,
    load_rules,
    parse_rules,
    parse_size,
    size_text,
)

# The example of the issue, as a user would write it.
EXAMPLE = """\
version: 1
routes:                        # in order
  - name: finance-reports
    match:
      events: [finalized]
      bucket: "acme-*"
      name: "reports/**/*.csv"
      prefix: "reports/"
      suffix: ".csv"
      min_size: 1KiB
      max_size: 2GiB
      content_type: "text/*"
      metadata: {team: finance, reviewed: "*"}
    not: {suffix: ".tmp"}
    to: [alice@example.com, bob@example.com]
    subject: "[{{ bucket }}] new report {{ name }}"
    text: |
      A new report: {{ name }}
      Size: {{ size_human }}
    html: '<p>{{ name }}</p>'
    continue: false
  - name: quiet-logs
    match: {prefix: "logs/"}
    drop: true
"""


def one_route(body: str) -> str:
    """A file whose only route is `body` (indented under `  - `), starting on line 3."""
    lines = body.strip("\n").split("\n")
    indented = ["  - " + lines[0]] + ["    " + line for line in lines[1:]]
    return "version: 1\nroutes:\n" + "\n".join(indented) + "\n"


def error_of(text: str) -> str:
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "rules.yaml")
    return str(caught.value)


def outcome(text: str, path: str) -> str | None:
    """None when the text reads as rules, else the one-line error; any other exception fails."""
    try:
        parse_rules(text, path)
    except RulesError as error:
        return str(error)
    return None


def only_route(text: str) -> RouteSpec:
    (route,) = parse_rules(text, "rules.yaml").routes
    return route


# --- the format ----------------------------------------------------------------------------


def test_the_issue_example_reads_into_normalised_routes() -> None:
    rules = parse_rules(EXAMPLE, "rules.yaml")

    assert rules.path == "rules.yaml"
    finance, logs = rules.routes
    assert finance == RouteSpec(
        name="finance-reports",
        index=0,
        line=3,
        match=Conditions(
            events=frozenset({EventType.FINALIZED}),
            bucket=("acme-*",),
            name=("reports/**/*.csv",),
            prefix=("reports/",),
            suffix=(".csv",),
            min_size=1024,
            max_size=2 * 1024**3,
            content_type=("text/*",),
            metadata=(("team", "finance"), ("reviewed", "*")),
            order=CONDITION_ORDER,
        ),
        exclude=Conditions(suffix=(".tmp",), order=("suffix",)),
        to=("alice@example.com", "bob@example.com"),
        drop=False,
        continue_=False,
        subject="[{{ bucket }}] new report {{ name }}",
        text="A new report: {{ name }}\nSize: {{ size_human }}\n",
        html="<p>{{ name }}</p>",
        template_lines={"subject": 16, "text": 18, "html": 20},
    )
    assert logs == RouteSpec(
        name="quiet-logs",
        index=1,
        line=22,
        match=Conditions(prefix=("logs/",), order=("prefix",)),
        drop=True,
    )


CONDITION_ORDER = (
    "events",
    "bucket",
    "name",
    "prefix",
    "suffix",
    "min_size",
    "max_size",
    "content_type",
    "metadata",
)


def test_template_lines_point_at_the_first_line_of_each_template() -> None:
    text = EXAMPLE.split("\n")
    route = parse_rules(EXAMPLE).routes[0]
    # A literal block's first line is the line after "text: |".
    assert text[route.template_lines["text"] - 1].strip() == "A new report: {{ name }}"
    assert text[route.template_lines["subject"] - 1].strip().startswith("subject:")
    assert text[route.template_lines["html"] - 1].strip().startswith("html:")


def test_a_route_without_match_matches_every_event_and_given_orders_keys_as_written() -> None:
    route = only_route(one_route("name: everything\nto: ops@example.com"))
    assert route.match == Conditions()
    assert route.match.given() == ()
    route = only_route(one_route("name: a\nmatch: {suffix: .csv, prefix: r/}\nto: ops@example.com"))
    assert route.match.given() == ("suffix", "prefix")
    assert Conditions(prefix=("r/",), suffix=(".csv",)).given() == ("prefix", "suffix")


def test_single_strings_stand_for_lists_of_one_and_addresses_are_kept_once() -> None:
    route = only_route(
        one_route(
            "name: a\n"
            "match: {events: deleted, bucket: b, name: n, prefix: p, suffix: s, content_type: t}\n"
            "to: [x@example.com, y@example.com, x@example.com]"
        )
    )
    assert route.match.events == frozenset({EventType.DELETED})
    assert (route.match.bucket, route.match.name, route.match.prefix) == (("b",), ("n",), ("p",))
    assert (route.match.suffix, route.match.content_type) == (("s",), ("t",))
    assert route.to == ("x@example.com", "y@example.com")
    assert only_route(one_route("name: a\nto: ops@example.com")).to == ("ops@example.com",)


def test_event_names_may_be_short_or_full_cloud_event_types() -> None:
    route = only_route(
        one_route(
            "name: a\n"
            "match: {events: [metadataUpdated, google.cloud.storage.object.v1.archived]}\n"
            "to: ops@example.com"
        )
    )
    assert route.match.events == frozenset({EventType.METADATA_UPDATED, EventType.ARCHIVED})


def test_scalars_are_taken_as_written_where_strings_are_expected() -> None:
    # YAML 1.1 would read these as 2026, True, 0.5 and 8 (octal).
    route = only_route(
        one_route(
            "name: 2026\n"
            "match: {bucket: yes, suffix: .5, prefix: 010, metadata: {approved: no, count: 3}}\n"
            "to: ops@example.com"
        )
    )
    assert route.name == "2026"
    assert (route.match.bucket, route.match.suffix, route.match.prefix) == (
        ("yes",),
        (".5",),
        ("010",),
    )
    assert route.match.metadata == (("approved", "no"), ("count", "3"))


def test_booleans_take_yaml_spellings() -> None:
    route = only_route(one_route("name: a\nto: ops@example.com\ncontinue: yes"))
    assert route.continue_ is True
    assert only_route(one_route("name: a\ndrop: on")).drop is True
    assert only_route(one_route("name: a\nto: ops@example.com\ncontinue: False")).continue_ is False


def test_a_metadata_value_may_be_empty() -> None:
    route = only_route(one_route("name: a\nmatch: {metadata: {flag: ''}}\nto: ops@example.com"))
    assert route.match.metadata == (("flag", ""),)


def test_anchors_aliases_and_merge_keys_work_and_a_key_beside_a_merge_wins() -> None:
    text = """\
version: 1
routes:
  - name: finance
    match: &finance {prefix: reports/, suffix: .csv}
    to: &people [alice@example.com, bob@example.com]
  - name: finance-big
    match:
      <<: *finance
      suffix: .parquet
      min_size: 1GB
    to: *people
  - name: merged-twice
    match: {<<: [*finance, {suffix: .json, events: [deleted]}]}
    to: *people
"""
    finance, big, twice = parse_rules(text).routes
    assert big.to == finance.to == ("alice@example.com", "bob@example.com")
    assert big.match.prefix == ("reports/",)
    assert big.match.suffix == (".parquet",)
    assert big.match.min_size == 1_000_000_000
    # With a list of mappings the first one listed wins.
    assert twice.match.suffix == (".csv",)
    assert twice.match.events == frozenset({EventType.DELETED})


def test_a_byte_order_mark_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + EXAMPLE.encode())
    assert [route.name for route in load_rules(path).routes] == ["finance-reports", "quiet-logs"]


# --- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1024, 1024),
        ("1024", 1024),
        ("1_000_000", 1_000_000),
        ("5B", 5),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("2 GiB", 2 * 1024**3),
        ("10MB", 10_000_000),
        ("3MiB", 3 * 1024**2),
        ("1GB", 10**9),
        ("1TB", 10**12),
        ("5TiB", 5 * 1024**4),
        ("1kib", 1024),
        ("  7 mb ", 7_000_000),
        (2**63 - 1, 2**63 - 1),
        ("9223372036854775807", 2**63 - 1),
    ],
)
def test_sizes_are_bytes_or_whole_numbers_with_a_unit(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "not a size: -1 is negative"),
        ("-5KB", 'not a size: "-5KB" is negative'),
        ("1.5KiB", 'sizes are whole numbers: write "1536B" for "1.5KiB"'),
        ("0.3KiB", '"0.3KiB" is not a whole number of bytes'),
        ("1.5", '"1.5" is not a whole number of bytes'),
        ("10 kilobytes", 'unknown unit "kilobytes" in "10 kilobytes"'),
        ("1Kb/s", 'not a size: "1Kb/s"'),
        ("", 'not a size: ""'),
        ("KiB", 'not a size: "KiB"'),
        ("0x10", 'not a size: "0x10"'),
        ("1e3", 'not a size: "1e3"'),
        (2**63, "9223372036854775808 is too large (at most 9223372036854775807 bytes)"),
        ("8EiB", 'unknown unit "EiB"'),
        ("9" * 5000, "is too large (at most 9223372036854775807 bytes)"),
        (True, "not a size: True"),
        (1.5, "not a size: 1.5"),
        (None, "not a size: None"),
    ],
)
def test_bad_sizes_are_refused_with_a_reason(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (352, "352 bytes"),
        (1000, "1 KB"),
        (1024, "1 KiB"),
        (2 * 1024**3, "2 GiB"),
        (10**9, "1 GB"),
        (1536, "1536 bytes"),
        (2_048_000, "2000 KiB"),
    ],
)
def test_size_text_reads_as_people_write_sizes(size: int, text: str) -> None:
    assert size_text(size) == text


# --- errors: one line each, naming file, line, route and field -------------------------------

BAD_FILES = [
    # (name, text, the exact one-line error)
    (
        "misspelled condition",
        EXAMPLE.replace('suffix: ".csv"', 'sufix: ".csv"'),
        'rules.yaml:9: route "finance-reports": match.sufix: unknown key "sufix" '
        '(did you mean "suffix"?)',
    ),
    (
        "misspelled route key",
        one_route("name: a\nto: ops@example.com\ncontinu: true"),
        'rules.yaml:5: route "a": continu: unknown key "continu" (did you mean "continue"?)',
    ),
    (
        "condition beside match",
        one_route("name: a\nprefix: logs/\ndrop: true"),
        'rules.yaml:4: route "a": prefix: unknown key "prefix" (conditions go under "match:")',
    ),
    (
        "misspelled condition beside match",
        one_route("name: a\nsufix: .csv\ndrop: true"),
        'rules.yaml:4: route "a": sufix: unknown key "sufix" '
        '(did you mean "suffix" under "match:"?)',
    ),
    (
        "route key under match",
        one_route("name: a\nmatch: {prefix: x, to: ops@example.com}\ndrop: true"),
        'rules.yaml:4: route "a": match.to: unknown key "to" (it belongs to the route, beside '
        '"match:")',
    ),
    (
        "unknown key without a close one",
        one_route("name: a\nzzz: 1\ndrop: true"),
        'rules.yaml:4: route "a": zzz: unknown key "zzz" (valid keys: name, match, not, to, drop, '
        "continue, subject, text, html, digest, rate)",
    ),
    (
        "misspelled top-level key",
        "version: 1\nroute:\n  - name: a\n    drop: true\n",
        'rules.yaml:2: route: unknown key "route" (did you mean "routes"?)',
    ),
    (
        "not YAML",
        "version: 1\nroutes: [\n",
        "rules.yaml:3: YAML: did not find expected node content (while parsing a flow node on "
        "line 3)",
    ),
    (
        "unclosed quote",
        'version: 1\nroutes:\n  - name: "a\n',
        "rules.yaml:4: YAML: found unexpected end of stream (while scanning a quoted scalar on "
        "line 3)",
    ),
    (
        "tabs",
        "version: 1\nroutes:\n\t- name: a\n",
        "rules.yaml:3: YAML: found character that cannot start any token (while scanning for the "
        "next token on line 3) (indent with spaces: YAML does not allow tabs)",
    ),
    (
        "two documents",
        "version: 1\n---\nversion: 1\n",
        "rules.yaml:2: YAML: but found another document (expected a single document in the stream "
        "on line 1)",
    ),
    (
        "a control character",
        "version: 1\nroutes:\n  - name: a\x01\n",
        "rules.yaml:3: YAML: unacceptable character #x0001: control characters are not allowed",
    ),
    (
        "undefined alias",
        "version: 1\nroutes: *nothing\n",
        "rules.yaml:2: YAML: found undefined alias",
    ),
    ("empty file", "", "rules.yaml: the file is empty (it needs version: 1 and routes:)"),
    (
        "only a comment",
        "# rules\n",
        "rules.yaml: the file is empty (it needs version: 1 and routes:)",
    ),
    (
        "a list at the top",
        "- name: a\n  drop: true\n",
        "rules.yaml:1: the top level must be a mapping with version: 1 and routes:",
    ),
    (
        "a string at the top",
        "hello\n",
        "rules.yaml:1: the top level must be a mapping with version: 1 and routes:",
    ),
    (
        "version 2",
        "version: 2\nroutes: []\n",
        'rules.yaml:1: version: unsupported version "2": this service reads version 1',
    ),
    (
        "version as a list",
        "version: [1]\nroutes: []\n",
        "rules.yaml:1: version: unsupported version a list: this service reads version 1",
    ),
    (
        "no version",
        "routes:\n  - name: a\n    drop: true\n",
        'rules.yaml:1: version: missing: write "version: 1" at the top',
    ),
    ("no routes", "version: 1\n", "rules.yaml:1: routes: missing: the file needs a list of routes"),
    (
        "empty routes",
        "version: 1\nroutes: []\n",
        "rules.yaml:2: routes: the list is empty: write at least one route",
    ),
    (
        "routes as a mapping",
        "version: 1\nroutes: {name: a}\n",
        "rules.yaml:2: routes: must be a list of routes",
    ),
    (
        "a route that is a string",
        "version: 1\nroutes:\n  - finance\n",
        "rules.yaml:3: route #1: a route must be a mapping with name:, match: and to: or drop:",
    ),
    (
        "no name",
        one_route("match: {prefix: x}\ndrop: true"),
        "rules.yaml:3: route #1: name: missing: every route needs a name",
    ),
    (
        "misspelled name",
        one_route("nmae: a\ndrop: true"),
        'rules.yaml:3: route #1: nmae: unknown key "nmae" (did you mean "name"?)',
    ),
    (
        "uppercase name",
        one_route("name: Finance Reports\ndrop: true"),
        'rules.yaml:3: route #1: name: "Finance Reports" is not a route name: lowercase letters, '
        'digits and hyphens, starting with a letter or digit (did you mean "finance-reports"?)',
    ),
    (
        "name with a leading hyphen",
        one_route("name: -a\ndrop: true"),
        'rules.yaml:3: route #1: name: "-a" is not a route name: lowercase letters, digits and '
        'hyphens, starting with a letter or digit (did you mean "a"?)',
    ),
    (
        "empty name",
        one_route("name:\ndrop: true"),
        "rules.yaml:3: route #1: name: has no value",
    ),
    (
        "duplicate route names",
        "version: 1\nroutes:\n  - name: a\n    drop: true\n  - name: b\n    drop: true\n"
        "  - name: a\n    drop: true\n",
        'rules.yaml:7: route "a": name: duplicate route name (first on line 3)',
    ),
    (
        "duplicate keys",
        one_route("name: a\nto: x@example.com\nto: y@example.com"),
        'rules.yaml:5: route "a": to: duplicate key "to" (first on line 4)',
    ),
    (
        "duplicate condition keys",
        one_route("name: a\nmatch:\n  prefix: a/\n  prefix: b/\ndrop: true"),
        'rules.yaml:6: route "a": match.prefix: duplicate key "prefix" (first on line 5)',
    ),
    (
        "duplicate top-level keys",
        "version: 1\nversion: 1\nroutes: []\n",
        'rules.yaml:2: version: duplicate key "version" (first on line 1)',
    ),
    (
        "neither to nor drop",
        one_route("name: a\nmatch: {prefix: x}"),
        'rules.yaml:3: route "a": to: missing: a route needs "to" (who to email) or "drop: true"',
    ),
    (
        "drop false and no to",
        one_route("name: a\ndrop: false"),
        'rules.yaml:3: route "a": to: missing: a route needs "to" (who to email) or "drop: true"',
    ),
    (
        "drop and to",
        one_route("name: a\nto: ops@example.com\ndrop: true"),
        'rules.yaml:5: route "a": drop: a dropped event emails nobody: remove "to" or "drop"',
    ),
    (
        "drop and continue",
        one_route("name: a\ndrop: true\ncontinue: true"),
        'rules.yaml:5: route "a": continue: a dropped event emails nobody and stops nothing with '
        'continue: true; remove "continue" or the route',
    ),
    (
        "drop and a template",
        one_route("name: a\ndrop: true\nsubject: hello"),
        'rules.yaml:5: route "a": subject: a dropped event emails nobody: remove the template',
    ),
    (
        "drop not a boolean",
        one_route("name: a\ndrop: 'true'"),
        'rules.yaml:4: route "a": drop: must be true or false, not "true"',
    ),
    (
        "continue as a list",
        one_route("name: a\nto: ops@example.com\ncontinue: [true]"),
        'rules.yaml:5: route "a": continue: must be true or false, not a list',
    ),
    (
        "to: a single bad string",
        one_route("name: a\nto: not-a-list"),
        "rules.yaml:4: route \"a\": to: not an email address: 'not-a-list'",
    ),
    (
        "to: commas in one string",
        one_route("name: a\nto: a@example.com, b@example.com"),
        "rules.yaml:4: route \"a\": to: not an email address: 'a@example.com, b@example.com' "
        "(write a list: [a@example.com, b@example.com])",
    ),
    (
        "to: one bad address in a list",
        one_route('name: a\nto:\n  - a@example.com\n  - "b@example.com\\r\\nBcc: x@evil.test"'),
        'rules.yaml:6: route "a": to: not an email address: \'b@example.com\\r\\nBcc: '
        "x@evil.test'",
    ),
    (
        "to: empty list",
        one_route("name: a\nto: []"),
        'rules.yaml:4: route "a": to: the list is empty (omit the condition to match anything)',
    ),
    (
        "to: a mapping",
        one_route("name: a\nto: {alice: a@example.com}"),
        'rules.yaml:4: route "a": to: must be a string, or a list of strings',
    ),
    (
        "to: a nested list",
        one_route("name: a\nto: [[a@example.com]]"),
        'rules.yaml:4: route "a": to: must be a string, or a list of strings',
    ),
    (
        "unknown event",
        one_route("name: a\nmatch: {events: [finalized, Deleted]}\ndrop: true"),
        'rules.yaml:4: route "a": match.events: unknown event "Deleted" (did you mean "deleted"?) '
        "(events: finalized, deleted, archived, metadataUpdated)",
    ),
    (
        "unknown event without a close one",
        one_route("name: a\nmatch: {events: created}\ndrop: true"),
        'rules.yaml:4: route "a": match.events: unknown event "created" '
        "(events: finalized, deleted, archived, metadataUpdated)",
    ),
    (
        "empty events",
        one_route("name: a\nmatch: {events: []}\ndrop: true"),
        'rules.yaml:4: route "a": match.events: the list is empty (omit the condition to match '
        "anything)",
    ),
    (
        "unclosed class",
        one_route("name: a\nmatch: {name: 'reports/[0-9.csv'}\ndrop: true"),
        'rules.yaml:4: route "a": match.name: unclosed "[" at character 9 of "reports/[0-9.csv" '
        '(write "[[]" for a literal "[")',
    ),
    (
        "reversed range",
        one_route("name: a\nmatch: {bucket: 'acme-[z-a]'}\ndrop: true"),
        'rules.yaml:4: route "a": match.bucket: bad range "z-a" in "acme-[z-a]"',
    ),
    (
        "** inside a segment",
        one_route("name: a\nmatch: {name: 'reports/**.csv'}\ndrop: true"),
        'rules.yaml:4: route "a": match.name: "**" must stand alone between slashes (like '
        '"reports/**/*.csv") in "reports/**.csv"; a single * matches within one folder level',
    ),
    (
        "bad glob in not",
        one_route("name: a\nnot: {content_type: 'text/[x'}\ndrop: true"),
        'rules.yaml:4: route "a": not.content_type: unclosed "[" at character 6 of "text/[x" '
        '(write "[[]" for a literal "[")',
    ),
    (
        "bad metadata glob",
        one_route("name: a\nmatch: {metadata: {team: '[fin'}}\ndrop: true"),
        'rules.yaml:4: route "a": match.metadata.team: unclosed "[" at character 1 of "[fin" '
        '(write "[[]" for a literal "[")',
    ),
    (
        "metadata as a list",
        one_route("name: a\nmatch: {metadata: [team]}\ndrop: true"),
        'rules.yaml:4: route "a": match.metadata: must be a mapping of keys to value globs '
        '("*" = present)',
    ),
    (
        "metadata value a list",
        one_route("name: a\nmatch: {metadata: {team: [a, b]}}\ndrop: true"),
        'rules.yaml:4: route "a": match.metadata.team: must be a string',
    ),
    (
        "empty metadata",
        one_route("name: a\nmatch: {metadata: {}}\ndrop: true"),
        'rules.yaml:4: route "a": match.metadata: is empty (omit it to match anything)',
    ),
    (
        "fractional size",
        one_route("name: a\nmatch: {min_size: 1.5KiB}\ndrop: true"),
        'rules.yaml:4: route "a": match.min_size: sizes are whole numbers: write "1536B" for '
        '"1.5KiB"',
    ),
    (
        "huge size",
        one_route("name: a\nmatch: {max_size: 99999999999999999999999999999}\ndrop: true"),
        'rules.yaml:4: route "a": match.max_size: "99999999999999999999999999999" is too large '
        "(at most 9223372036854775807 bytes)",
    ),
    (
        "negative size",
        one_route("name: a\nmatch: {min_size: -1}\ndrop: true"),
        'rules.yaml:4: route "a": match.min_size: not a size: "-1" is negative',
    ),
    (
        "size as a boolean",
        one_route("name: a\nmatch: {min_size: yes}\ndrop: true"),
        'rules.yaml:4: route "a": match.min_size: must be a size (bytes as a whole number, or a '
        "whole number and B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)",
    ),
    (
        "min above max",
        one_route("name: a\nmatch:\n  min_size: 2MB\n  max_size: 1MB\ndrop: true"),
        'rules.yaml:6: route "a": match.max_size: 1 MB is less than min_size 2 MB: nothing could '
        "match",
    ),
    (
        "empty prefix",
        one_route("name: a\nmatch: {prefix: ''}\ndrop: true"),
        'rules.yaml:4: route "a": match.prefix: must not be empty',
    ),
    (
        "null prefix",
        one_route("name: a\nmatch: {prefix: }\ndrop: true"),
        'rules.yaml:4: route "a": match.prefix: has no value',
    ),
    (
        "null match",
        one_route("name: a\nmatch:\ndrop: true"),
        'rules.yaml:4: route "a": match: must be a mapping of conditions (omit it to match every '
        "event)",
    ),
    (
        "match as a string",
        one_route("name: a\nmatch: reports/\ndrop: true"),
        'rules.yaml:4: route "a": match: must be a mapping of conditions',
    ),
    (
        "empty not",
        one_route("name: a\nnot: {}\nto: ops@example.com"),
        'rules.yaml:4: route "a": not: is empty: it would exclude every event',
    ),
    (
        "template as a mapping",
        one_route("name: a\nto: ops@example.com\nsubject: {text: hi}"),
        'rules.yaml:5: route "a": subject: must be a string (a template; omit it for today\'s '
        "email)",
    ),
    (
        "null template",
        one_route("name: a\nto: ops@example.com\nhtml:"),
        'rules.yaml:5: route "a": html: must be a string (a template; omit it for today\'s email)',
    ),
    (
        "a custom tag",
        one_route("name: a\nmatch: {prefix: !shell x}\ndrop: true"),
        'rules.yaml:4: route "a": match.prefix: YAML tag "!shell" is not supported',
    ),
    (
        "a python tag",
        one_route("name: a\nto: !!python/object:os.system ops@example.com"),
        'rules.yaml:4: route "a": to: YAML tag "tag:yaml.org,2002:python/object:os.system" is '
        "not supported",
    ),
    (
        "a key that is a list",
        one_route("name: a\n? [prefix]\n: x\ndrop: true"),
        'rules.yaml:4: route "a": keys must be plain names',
    ),
    (
        "a mapping that merges itself",
        one_route("name: a\nmatch: &m {<<: *m}\ndrop: true"),
        'rules.yaml:4: route "a": match: a mapping cannot merge itself',
    ),
    (
        "merging a string",
        one_route("name: a\nmatch: {<<: reports/}\ndrop: true"),
        'rules.yaml:4: route "a": match: "<<" merges a mapping or a list of mappings',
    ),
    (
        "an error in the second route names it",
        EXAMPLE.replace('match: {prefix: "logs/"}', 'match: {prefix: "logs/", min_size: 1 kg}'),
        'rules.yaml:23: route "quiet-logs": match.min_size: unknown unit "kg" in "1 kg" (bytes as '
        "a whole number, or a whole number and B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [(text, message) for _, text, message in BAD_FILES],
    ids=[name for name, _, _ in BAD_FILES],
)
def test_a_bad_file_gives_one_error_naming_file_line_route_and_field(
    text: str, message: str
) -> None:
    assert error_of(text) == message


def test_the_error_carries_its_parts() -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(EXAMPLE.replace('suffix: ".csv"', 'sufix: ".csv"'), "rules.yaml")
    error = caught.value
    assert (error.path, error.line, error.route, error.field) == (
        "rules.yaml",
        9,
        "finance-reports",
        "match.sufix",
    )
    assert error.message == 'unknown key "sufix" (did you mean "suffix"?)'
    assert isinstance(error, ValueError)


def test_the_message_stays_on_one_line_whatever_a_key_holds() -> None:
    message = error_of(one_route('name: a\n"two\\nlines": 1\ndrop: true'))
    assert "\n" not in message
    assert message.startswith('rules.yaml:4: route "a": two\\nlines: unknown key "two\\nlines"')


def test_a_missing_file_is_one_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert str(caught.value) == f"{path}: cannot read the rules file: No such file or directory"


def test_a_folder_is_one_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(RulesError) as caught:
        load_rules(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read the rules file: Is a directory"


def test_bytes_that_are_not_utf8_are_one_error_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"version: 1\nroutes:\n  - name: caf\xe9\n")
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert str(caught.value) == f"{path}:3: not UTF-8 text (byte 0xe9)"


def test_errors_from_a_file_name_the_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("version: 2\nroutes: []\n")
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert str(caught.value).startswith(f"{path}:1: version: unsupported version")


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    message = error_of("version: 1\nroutes: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert message.startswith("rules.yaml:2: YAML: exceeded maximum nesting depth")


def test_a_long_chain_of_merges_is_an_error_not_a_crash() -> None:
    chain = ["  k0: &m0 {prefix: x}"]
    chain += [f"  k{i}: &m{i} {{<<: *m{i - 1}}}" for i in range(1, 3000)]
    text = one_route("name: a\nmatch:\n" + "\n".join(chain) + "\n  <<: *m2999\ndrop: true")
    assert error_of(text) == "rules.yaml: nested too deeply"


# Any text at all: a RulesError or rules, never another exception.
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("version: 1routes-nam{}[]&*<>!|'\"\n\t#,.?~-"))))
def test_any_text_gives_rules_or_one_rules_error(text: str) -> None:
    message = outcome(text, "fuzz.yaml")
    assert message is None or ("\n" not in message and message.startswith("fuzz.yaml"))


LINES = EXAMPLE.split("\n")


# The example with one line replaced by something plausible but broken: still one RulesError.
@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=len(LINES) - 1),
    st.sampled_from(
        [
            "",
            "    to:",
            "      - ",
            "    match: {min_size: x}",
            "      name: '['",
            "    - name: b",
            "  - name: finance-reports",
            "    continue: 3",
            "      metadata: {a: {b: c}}",
            "\tdrop: true",
            "    <<: {drop: true}",
            "    not: *undefined",
            "      events: &e [*e]",
            "    to: &t [*t]",
        ]
    ),
)
def test_a_broken_line_anywhere_gives_rules_or_one_rules_error(index: int, line: str) -> None:
    text = "\n".join([*LINES[:index], line, *LINES[index + 1 :]])
    message = outcome(text, "rules.yaml")
    assert message is None or ("\n" not in message and message.startswith("rules.yaml:"))


# --- globs: syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "**",
        "a/**",
        "**/x",
        "a/**/b",
        "**/**/x",
        "a/**/**",
        "*.csv",
        "[!a]?",
        "[]]",
        "[!]]x",
        "a\\b",
    ],
)
def test_these_path_globs_are_valid(pattern: str) -> None:
    assert glob_parts(pattern, path=True)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("***", '"**" must stand alone between slashes'),
        ("a**", '"**" must stand alone between slashes'),
        ("**a", '"**" must stand alone between slashes'),
        ("a/**b", '"**" must stand alone between slashes'),
        ("a**/b", '"**" must stand alone between slashes'),
        ("[", 'unclosed "[" at character 1 of "["'),
        ("a[b", 'unclosed "[" at character 2 of "a[b"'),
        ("[]", 'unclosed "[" at character 1 of "[]"'),
        ("[!]", 'unclosed "[" at character 1 of "[!]"'),
        ("[z-a]", 'bad range "z-a" in "[z-a]"'),
    ],
)
def test_these_path_globs_are_refused(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        glob_parts(pattern, path=True)


def test_outside_object_names_stars_of_any_count_are_one_star() -> None:
    assert glob_parts("a***b", path=False) == glob_parts("a*b", path=False)
    assert glob_parts("**", path=False) == glob_parts("*", path=False)
