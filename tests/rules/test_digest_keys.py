"""The rules file's optional `digest` and `rate` keys (issue 11): read into DigestSpec and RateSpec
with their defaults, and every bad value refused with one RulesError naming the file, the line,
the route and the field, saying what to write instead."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.durations import duration_text, parse_duration
from app.rules.model import DigestSpec, RateSpec, RouteSpec, RulesError, parse_rules

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
HELP = 'write a whole number and s, m, h or d, like "30s", "5m", "1h", "1d"'


def rules_with(*lines: str) -> str:
    """One route named "r" emailing ops (line 3), followed by `lines` (from line 5 on)."""
    body = "".join(f"    {line}\n" for line in lines)
    return f"version: 1\nroutes:\n  - name: r\n    to: ops@example.com\n{body}"


def route_of(*lines: str) -> RouteSpec:
    (route,) = parse_rules(rules_with(*lines), "rules.yaml").routes
    return route


def error_of(text: str) -> RulesError:
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "rules.yaml")
    return caught.value


# --- reading the keys ------------------------------------------------------------------------


def test_the_issue_example_reads_into_a_digest_and_a_rate() -> None:
    text = """\
version: 1
routes:
  - name: reports
    match: {prefix: reports/}
    to: ops@example.com
    digest:
      window: 5m
      max_items: 100
      leading: true
  - name: everything
    to: ops@example.com
    rate: {max: 20, per: 1h}
"""
    reports, everything = parse_rules(text, "rules.yaml").routes
    assert reports.digest == DigestSpec(window_seconds=300.0, max_items=100, leading=True)
    assert reports.rate is None
    assert everything.rate == RateSpec(max=20, per_seconds=3600.0)
    assert everything.digest is None


def test_a_route_without_the_keys_has_neither() -> None:
    route = route_of()
    assert (route.digest, route.rate) == (None, None)


def test_digest_defaults_to_100_items_and_no_leading_email() -> None:
    assert route_of("digest: {window: 30s}").digest == DigestSpec(window_seconds=30.0)
    assert DigestSpec(window_seconds=30.0) == DigestSpec(30.0, max_items=100, leading=False)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1d", 86400),
        ("7d", 7 * 86400),
        ("10s", 10),
        ("300", 300),  # a bare whole number is seconds
        ('"300"', 300),
        ("1_200", 1200),
        ("5 m", 300),
        ("90m", 5400),
    ],
)
def test_a_window_is_a_whole_number_and_a_unit_or_seconds(written: str, seconds: int) -> None:
    digest = route_of(f"digest: {{window: {written}}}").digest
    assert digest is not None
    assert digest.window_seconds == seconds
    assert isinstance(digest.window_seconds, float)


@pytest.mark.parametrize(("written", "items"), [("0", 0), ("1", 1), ("1000", 1000), ("250", 250)])
def test_max_items_takes_0_to_1000(written: str, items: int) -> None:
    digest = route_of(f"digest: {{window: 1h, max_items: {written}}}").digest
    assert digest is not None
    assert digest.max_items == items


@pytest.mark.parametrize(("written", "leading"), [("true", True), ("yes", True), ("false", False)])
def test_leading_takes_a_yaml_boolean(written: str, leading: bool) -> None:
    digest = route_of(f"digest: {{window: 1h, leading: {written}}}").digest
    assert digest is not None
    assert digest.leading is leading


@pytest.mark.parametrize(
    ("written", "limit", "per"),
    [
        ("{max: 1, per: 1s}", 1, 1),
        ("{max: 100000, per: 7d}", 100_000, 7 * 86400),
        ("{max: 20, per: 3600}", 20, 3600),
        ("{per: 1h, max: 5}", 5, 3600),
    ],
)
def test_rate_takes_a_maximum_and_a_period(written: str, limit: int, per: int) -> None:
    assert route_of(f"rate: {written}").rate == RateSpec(max=limit, per_seconds=float(per))


def test_digest_and_rate_can_come_from_a_merged_anchor() -> None:
    text = """\
version: 1
routes:
  - name: a
    to: ops@example.com
    digest: &slow {window: 1h, max_items: 5}
  - name: b
    to: ops@example.com
    digest: {<<: *slow, max_items: 7}
"""
    first, second = parse_rules(text).routes
    assert first.digest == DigestSpec(window_seconds=3600.0, max_items=5)
    assert second.digest == DigestSpec(window_seconds=3600.0, max_items=7)


def test_a_digest_route_keeps_its_templates_and_their_lines() -> None:
    route = route_of("digest: {window: 5m}", 'subject: "{{ count }} changes"')
    assert route.subject == "{{ count }} changes"
    assert route.template_lines == {"subject": 6}


# --- errors ----------------------------------------------------------------------------------

ERRORS = [
    (
        "digest without a mapping",
        ("digest:",),
        'rules.yaml:5: route "r": digest: must be a mapping like "digest: {window: 5m}" '
        "(omit it to send each event alone)",
    ),
    (
        "digest as a bare duration",
        ("digest: 5m",),
        'rules.yaml:5: route "r": digest: must be a mapping like "digest: {window: 5m}"',
    ),
    (
        "digest without a window",
        ("digest:", "  max_items: 5"),
        'rules.yaml:6: route "r": digest.window: missing: write how long a window is, like "5m"',
    ),
    (
        "misspelled window",
        ("digest:", "  max_items: 5", "  windw: 5m"),
        'rules.yaml:7: route "r": digest.windw: unknown key "windw" (did you mean "window"?)',
    ),
    (
        "misspelled max_items",
        ("digest: {window: 5m, max_item: 5}",),
        'rules.yaml:5: route "r": digest.max_item: unknown key "max_item" '
        '(did you mean "max_items"?)',
    ),
    (
        "a rate key in digest",
        ("digest: {window: 5m, per: 1h}",),
        'rules.yaml:5: route "r": digest.per: unknown key "per" (it goes under "rate:")',
    ),
    (
        "an unknown key in digest",
        ("digest: {window: 5m, zzz: 1}",),
        'rules.yaml:5: route "r": digest.zzz: unknown key "zzz" '
        "(valid keys: window, max_items, leading)",
    ),
    (
        "a digest key on the route",
        ("window: 5m",),
        'rules.yaml:5: route "r": window: unknown key "window" (it goes under "digest:")',
    ),
    (
        "a digest key in rate",
        ("rate: {max: 2, per: 1h, leading: true}",),
        'rules.yaml:5: route "r": rate.leading: unknown key "leading" (it goes under "digest:")',
    ),
    (
        "misspelled per",
        ("rate: {max: 2, pre: 1h}",),
        'rules.yaml:5: route "r": rate.pre: unknown key "pre" (did you mean "per"?)',
    ),
    (
        "window of zero",
        ("digest: {window: 0s}",),
        'rules.yaml:5: route "r": digest.window: "0s" is too short: a digest window is at least 1s',
    ),
    (
        "window too long",
        ("digest: {window: 8d}",),
        'rules.yaml:5: route "r": digest.window: "8d" is too long: a digest window is at most 7d',
    ),
    (
        "window in words",
        ("digest: {window: 5 minutes}",),
        'rules.yaml:5: route "r": digest.window: write "5m" for "5 minutes"',
    ),
    (
        "window as a fraction",
        ("digest: {window: 1.5h}",),
        'rules.yaml:5: route "r": digest.window: write "90m" for "1.5h"',
    ),
    (
        "window in weeks",
        ("digest: {window: 1w}",),
        'rules.yaml:5: route "r": digest.window: write "7d" for "1w"',
    ),
    (
        "window with an upper-case unit",
        ("digest: {window: 5M}",),
        'rules.yaml:5: route "r": digest.window: write "5m" for "5M"',
    ),
    (
        "negative window",
        ("digest: {window: -1m}",),
        f'rules.yaml:5: route "r": digest.window: "-1m" is negative ({HELP})',
    ),
    (
        "negative bare window",
        ("digest: {window: -60}",),
        f'rules.yaml:5: route "r": digest.window: "-60" is negative ({HELP})',
    ),
    (
        "window not a whole number of seconds",
        ("digest: {window: 10.5s}",),
        f'rules.yaml:5: route "r": digest.window: "10.5s" is not a whole number of seconds '
        f"({HELP})",
    ),
    (
        "window of an unknown unit",
        ("digest: {window: 5ms}",),
        f'rules.yaml:5: route "r": digest.window: unknown unit "ms" in "5ms" ({HELP})',
    ),
    (
        "window not a duration",
        ("digest: {window: soon}",),
        f'rules.yaml:5: route "r": digest.window: not a duration: "soon" ({HELP})',
    ),
    (
        "window a boolean",
        ("digest: {window: true}",),
        f'rules.yaml:5: route "r": digest.window: must be a duration, not "true" ({HELP})',
    ),
    (
        "window empty",
        ("digest: {window: }",),
        f'rules.yaml:5: route "r": digest.window: must be a duration, not "" ({HELP})',
    ),
    (
        "window a list",
        ("digest:", "  window: [5m]"),
        f'rules.yaml:6: route "r": digest.window: must be a duration, not a list ({HELP})',
    ),
    (
        "max_items too many",
        ("digest: {window: 5m, max_items: 1001}",),
        'rules.yaml:5: route "r": digest.max_items: "1001" is out of range: write a whole number '
        "from 0 to 1000",
    ),
    (
        "max_items negative",
        ("digest: {window: 5m, max_items: -1}",),
        'rules.yaml:5: route "r": digest.max_items: must be a whole number from 0 to 1000, '
        'not "-1"',
    ),
    (
        "max_items a fraction",
        ("digest: {window: 5m, max_items: 2.5}",),
        'rules.yaml:5: route "r": digest.max_items: must be a whole number from 0 to 1000, '
        'not "2.5"',
    ),
    (
        "max_items huge",
        ("digest: {window: 5m, max_items: " + "9" * 40 + "}",),
        'rules.yaml:5: route "r": digest.max_items: "' + "9" * 40 + '" is out of range: write a '
        "whole number from 0 to 1000",
    ),
    (
        "leading not a boolean",
        ("digest:", "  window: 5m", "  leading: 1"),
        'rules.yaml:7: route "r": digest.leading: must be true or false, not "1"',
    ),
    (
        "rate without a mapping",
        ("rate: 20/h",),
        'rules.yaml:5: route "r": rate: must be a mapping like "rate: {max: 20, per: 1h}"',
    ),
    (
        "rate empty",
        ("rate:",),
        'rules.yaml:5: route "r": rate: must be a mapping like "rate: {max: 20, per: 1h}"',
    ),
    (
        "rate without max",
        ("rate: {per: 1h}",),
        'rules.yaml:5: route "r": rate.max: missing: write how many emails, like "max: 20"',
    ),
    (
        "rate without per",
        ("rate: {max: 20}",),
        'rules.yaml:5: route "r": rate.per: missing: write how long a period is, like "per: 1h"',
    ),
    (
        "rate max zero",
        ("rate: {max: 0, per: 1h}",),
        'rules.yaml:5: route "r": rate.max: "0" is out of range: write a whole number from 1 '
        "to 100000",
    ),
    (
        "rate max too high",
        ("rate: {max: 100001, per: 1h}",),
        'rules.yaml:5: route "r": rate.max: "100001" is out of range: write a whole number from 1 '
        "to 100000",
    ),
    (
        "rate max a word",
        ("rate: {max: many, per: 1h}",),
        'rules.yaml:5: route "r": rate.max: must be a whole number from 1 to 100000, not "many"',
    ),
    (
        "rate period zero",
        ("rate:", "  max: 20", "  per: 0"),
        'rules.yaml:7: route "r": rate.per: "0" is too short: a rate period is at least 1s',
    ),
    (
        "rate period too long",
        ("rate: {max: 20, per: 30d}",),
        'rules.yaml:5: route "r": rate.per: "30d" is too long: a rate period is at most 7d',
    ),
    (
        "rate period in words",
        ("rate: {max: 20, per: 1 hour}",),
        'rules.yaml:5: route "r": rate.per: write "1h" for "1 hour"',
    ),
    (
        "both digest and rate",
        ("digest: {window: 5m}", "rate: {max: 20, per: 1h}"),
        'rules.yaml:6: route "r": rate: a digest route already sends at most one email per '
        "window; use one of them",
    ),
    (
        "duplicate digest key",
        ("digest: {window: 5m}", "digest: {window: 1h}"),
        'rules.yaml:6: route "r": digest: duplicate key "digest" (first on line 5)',
    ),
    (
        "duplicate window",
        ("digest:", "  window: 5m", "  window: 1h"),
        'rules.yaml:7: route "r": digest.window: duplicate key "window" (first on line 6)',
    ),
]


@pytest.mark.parametrize(
    ("lines", "message"), [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS]
)
def test_a_bad_digest_or_rate_gives_one_error_naming_line_route_and_field(
    lines: tuple[str, ...], message: str
) -> None:
    assert str(error_of(rules_with(*lines))) == message


@pytest.mark.parametrize(
    ("key", "value"), [("digest", "{window: 5m}"), ("rate", "{max: 20, per: 1h}")]
)
def test_a_dropped_route_takes_neither_digest_nor_rate(key: str, value: str) -> None:
    text = f"version: 1\nroutes:\n  - name: r\n    drop: true\n    {key}: {value}\n"
    error = error_of(text)
    assert str(error) == (
        f'rules.yaml:5: route "r": {key}: a dropped event emails nobody: remove "{key}" or "drop"'
    )
    assert (error.line, error.route, error.field) == (5, "r", key)


def test_the_error_names_the_route_by_position_when_its_name_is_bad() -> None:
    text = "version: 1\nroutes:\n  - name: Bad Name\n    to: a@example.com\n"
    text += "    digest: {window: 1s}\n"
    # The route's name is checked first; its digest never gets a say.
    assert error_of(text).field == "name"


def test_the_error_in_a_second_route_names_that_route_and_its_line() -> None:
    text = """\
version: 1
routes:
  - name: first
    to: a@example.com
    digest: {window: 5m}
  - name: second
    to: a@example.com
    digest:
      window: 5m
      max_items: lots
"""
    error = error_of(text)
    assert (error.line, error.route, error.field) == (10, "second", "digest.max_items")


# --- durations -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(number=st.integers(min_value=0, max_value=10**9), unit=st.sampled_from(["", *UNITS]))
def test_every_whole_number_and_unit_reads_as_that_many_seconds(number: int, unit: str) -> None:
    assert parse_duration(f"{number}{unit}") == number * UNITS.get(unit, 1)


@settings(max_examples=300, deadline=None)
@given(seconds=st.integers(min_value=0, max_value=10**12))
def test_duration_text_reads_back_as_the_same_seconds(seconds: int) -> None:
    text = duration_text(seconds)
    assert parse_duration(text) == seconds
    # The largest unit that holds it whole: never "60s" for a minute.
    number, unit = int(text[:-1]), text[-1]
    bigger = [scale for scale in UNITS.values() if scale > UNITS[unit]]
    assert seconds == 0 or all(seconds % scale for scale in bigger)
    assert number * UNITS[unit] == seconds


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789._-+ smhdwSMHD:xé\n")), max_size=12))
def test_any_text_is_a_duration_or_one_clear_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError as error:
        message = str(error)
        assert "\n" not in message
        assert "write" in message  # every refusal says what to write instead
    else:
        assert seconds >= 0


@settings(max_examples=200, deadline=None)
@given(
    whole=st.integers(min_value=0, max_value=1000),
    tenths=st.integers(min_value=1, max_value=9),
    unit=st.sampled_from(list(UNITS)),
)
def test_a_fraction_is_refused_with_the_whole_spelling_when_there_is_one(
    whole: int, tenths: int, unit: str
) -> None:
    written = f"{whole}.{tenths}{unit}"
    seconds_times_ten = (whole * 10 + tenths) * UNITS[unit]
    with pytest.raises(ValueError, match=r"\.") as caught:
        parse_duration(written)
    if seconds_times_ten % 10:
        assert str(caught.value).startswith(f'"{written}" is not a whole number of seconds')
    else:
        expected = duration_text(seconds_times_ten // 10)
        assert str(caught.value) == f'write "{expected}" for "{written}"'


@pytest.mark.parametrize("value", [1.5, None, True, [1], b"5m"])
def test_parse_duration_refuses_what_is_not_a_number_or_text(value: object) -> None:
    with pytest.raises(ValueError, match=r"^not a duration: "):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (1, "1s"), (90, "90s"), (300, "5m"), (5400, "90m"), (86400, "1d")],
)
def test_duration_text_uses_the_largest_whole_unit(seconds: int, text: str) -> None:
    assert duration_text(seconds) == text
