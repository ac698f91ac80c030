"""The matcher: each condition, globs on object names, lists, `not`, first match wins and
`continue`; reasons for the CLI and the footer; and an index that returns exactly what a plain
loop over every route returns, while looking at only the routes an event can match."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.events.models import EventType, StorageEvent, StorageObjectData
from app.rules.match import Matcher, Verdict, describe, glob_regex, matches
from app.rules.model import CharClass, Conditions, GlobPart, RouteSpec, Wildcard, glob_parts
from tests.factories import object_data

FINALIZED, DELETED = EventType.FINALIZED, EventType.DELETED


def event(
    name: str = "reports/q3.csv", event_type: EventType = FINALIZED, **data: Any
) -> StorageEvent:
    return StorageEvent(
        id="evt-1",
        source="//storage.googleapis.com/projects/_/buckets/some-bucket",
        type=event_type,
        data=StorageObjectData.model_validate(object_data(name=name, **data)),
    )


def route(
    route_name: str = "r",
    /,
    *,
    exclude: Conditions | None = None,
    continue_: bool = False,
    **conditions: Any,
) -> RouteSpec:
    return RouteSpec(
        name=route_name,
        index=0,
        line=1,
        match=Conditions(**conditions),
        exclude=exclude,
        to=("ops@example.com",),
        continue_=continue_,
    )


def names(routes: list[RouteSpec]) -> list[str]:
    return [r.name for r in routes]


# --- globs on object names -----------------------------------------------------------------

PATH_GLOBS = [
    # (glob, object name, matches)
    ("reports/**/*.csv", "reports/q3.csv", True),  # "**/" also matches no folder
    ("reports/**/*.csv", "reports/2026/q3.csv", True),
    ("reports/**/*.csv", "reports/2026/09/q3.csv", True),
    ("reports/**/*.csv", "reports-old/x.csv", False),
    ("reports/**/*.csv", "reports/q3.csv.tmp", False),
    ("reports/**/*.csv", "reports/.csv", True),
    ("*.csv", "q3.csv", True),
    ("*.csv", "a/q3.csv", False),  # * stays inside one segment
    ("*", "q3.csv", True),
    ("*", "a/b", False),
    ("?.csv", "a.csv", True),
    ("?.csv", "ab.csv", False),
    ("a?b", "a/b", False),  # ? never matches "/"
    ("**", "a", True),  # ** alone: every name
    ("**", "a/b/c", True),
    ("a/**", "a/", True),  # the folder placeholder
    ("a/**", "a/b/c", True),
    ("a/**", "a", False),
    ("a/**", "ab/c", False),
    ("**/q3.csv", "q3.csv", True),
    ("**/q3.csv", "x/y/q3.csv", True),
    ("**/q3.csv", "x/yq3.csv", False),
    ("a/**/b", "a/b", True),
    ("a/**/b", "a/x/y/b", True),
    ("a/**/b", "a/xb", False),
    ("a/**/**/b", "a/x/b", True),
    ("a/**/**", "a/x", True),
    ("reports/", "reports/", True),  # a trailing "/" is literal
    ("reports/", "reports/q3.csv", False),
    ("[abc].txt", "b.txt", True),
    ("[abc].txt", "d.txt", False),
    ("[a-c].txt", "c.txt", True),
    ("[!a-c].txt", "d.txt", True),
    ("[!a-c].txt", "a.txt", False),
    ("[^a].txt", "b.txt", True),
    ("x[!a]y", "x/y", False),  # a class never matches "/"
    ("x[!-0]y", "x/y", False),  # not even inside a range
    ("[]]", "]", True),
    ("[[]", "[", True),
    ("[*]", "*", True),
    ("[*]", "x", False),
    ("[?]", "?", True),
    ("Q3.csv", "q3.csv", False),  # case-sensitive
    ("a+(b)[[]c]{d}.^$|\\e", "a+(b)[c]{d}.^$|\\e", True),  # regex metacharacters are literal
    ("a.b", "axb", False),
    ("a|b", "a", False),
    ("(a)", "a", False),
    ("a\\*", "a\\b", True),  # backslash is literal: it does not escape the *
    ("a\\*", "a*", False),
    ("line*", "line\nbreak", True),  # * matches any character but "/", newlines too
    ("caf\u00e9/*", "caf\u00e9/x", True),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), PATH_GLOBS)
def test_globs_on_object_names(pattern: str, name: str, expected: bool) -> None:
    assert bool(glob_regex(pattern, path=True).match(name)) is expected
    assert matches(route(name=(pattern,)), event(name)) is expected


PLAIN_GLOBS = [
    ("acme-*", "acme-prod", True),
    ("acme-*", "other", False),
    ("*", "a/b/c", True),  # no segments outside object names
    ("text/*", "text/csv", True),
    ("a**b", "a/x/b", True),
    ("?", "/", True),
    ("[!a]", "/", True),
    ("acme-[0-9]", "acme-7", True),
    ("acme-[0-9]", "acme-x", False),
]


@pytest.mark.parametrize(("pattern", "value", "expected"), PLAIN_GLOBS)
def test_globs_elsewhere_let_star_match_anything(pattern: str, value: str, expected: bool) -> None:
    assert bool(glob_regex(pattern, path=False).match(value)) is expected


def reference(parts: tuple[GlobPart, ...], name: str, *, path: bool) -> bool:
    """The glob semantics written out by hand, slowly, as the oracle for glob_regex."""
    if not parts:
        return name == ""
    head, rest = parts[0], parts[1:]
    if isinstance(head, str):
        return name.startswith(head) and reference(rest, name[len(head) :], path=path)
    if head is Wildcard.REST:
        return True
    if head is Wildcard.FOLDERS:
        cuts = [i for i in range(len(name) + 1) if i == 0 or name[i - 1] == "/"]
        return any(reference(rest, name[i:], path=path) for i in cuts)
    if head is Wildcard.STAR:
        cuts = [i for i in range(len(name) + 1) if not (path and "/" in name[:i])]
        return any(reference(rest, name[i:], path=path) for i in cuts)
    if not name or (path and name[0] == "/"):
        return False
    if isinstance(head, CharClass):
        inside = any(low <= name[0] <= high for low, high in head.ranges)
        if inside == head.negated:
            return False
    return reference(rest, name[1:], path=path)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet="ab/*?[]!-.", max_size=10),
    st.text(alphabet="ab/.-[]", max_size=10),
    st.booleans(),
)
def test_glob_regex_agrees_with_the_written_out_semantics(
    pattern: str, name: str, path: bool
) -> None:
    try:
        parts = glob_parts(pattern, path=path)
    except ValueError:
        with pytest.raises(ValueError, match=r'^(unclosed|bad range|"\*\*" must)'):
            glob_regex(pattern, path=path)
        return
    assert bool(glob_regex(pattern, path=path).match(name)) is reference(parts, name, path=path)


# --- each condition --------------------------------------------------------------------------


def test_events() -> None:
    finalized_only = route(events=frozenset({FINALIZED}))
    assert matches(finalized_only, event(event_type=FINALIZED))
    assert not matches(finalized_only, event(event_type=DELETED))
    both = route(events=frozenset({FINALIZED, DELETED}))
    assert matches(both, event(event_type=DELETED))
    assert not matches(both, event(event_type=EventType.ARCHIVED))


def test_bucket_globs_any_of() -> None:
    buckets = route(bucket=("acme-*", "logs"))
    assert matches(buckets, event(bucket="acme-prod"))
    assert matches(buckets, event(bucket="logs"))
    assert not matches(buckets, event(bucket="logs-2"))


def test_name_globs_any_of() -> None:
    reports = route(name=("reports/**/*.csv", "*.xlsx"))
    assert matches(reports, event("reports/2026/q3.csv"))
    assert matches(reports, event("q3.xlsx"))
    assert not matches(reports, event("old/q3.xlsx"))


def test_prefix_and_suffix_any_of() -> None:
    assert matches(route(prefix=("logs/", "reports/")), event("reports/q3.csv"))
    assert not matches(route(prefix=("logs/", "reports/")), event("report.csv"))
    assert matches(route(suffix=(".tmp", ".csv")), event("reports/q3.csv"))
    assert not matches(route(suffix=(".tmp", ".csv")), event("reports/q3.csv.gz"))


def test_every_condition_must_hold() -> None:
    both = route(prefix=("reports/",), suffix=(".csv",))
    assert matches(both, event("reports/q3.csv"))
    assert not matches(both, event("reports/q3.txt"))
    assert not matches(both, event("logs/q3.csv"))


@pytest.mark.parametrize(
    ("size", "expected"),
    [("1023", False), ("1024", True), ("2048", True), ("2049", False), (None, False)],
)
def test_sizes_are_inclusive_and_an_event_without_a_size_does_not_match(
    size: str | None, expected: bool
) -> None:
    assert matches(route(min_size=1024, max_size=2048), event(size=size)) is expected


def test_min_size_alone_and_max_size_alone() -> None:
    assert matches(route(min_size=0), event(size="0"))
    assert not matches(route(min_size=0), event(size=None))
    assert matches(route(max_size=0), event(size="0"))
    assert not matches(route(max_size=351), event(size="352"))


@pytest.mark.parametrize(
    ("pattern", "content_type", "expected"),
    [
        ("text/*", "text/csv", True),
        ("text/*", "image/png", False),
        ("text/csv", "text/csv; charset=utf-8", True),  # parameters ignored...
        ("text/csv; charset=utf-8", "text/csv; charset=utf-8", True),  # ...unless the glob has one
        ("text/csv; charset=utf-8", "text/csv", False),
        ("text/csv", "Text/CSV", True),  # media types are case-insensitive
        ("TEXT/*", "text/csv", True),
        ("*", "application/octet-stream", True),
    ],
)
def test_content_type(pattern: str, content_type: str, expected: bool) -> None:
    assert matches(route(content_type=(pattern,)), event(contentType=content_type)) is expected


def test_content_type_does_not_match_an_object_without_one() -> None:
    assert not matches(route(content_type=("*",)), event(contentType=None))


def test_metadata_value_globs_and_presence() -> None:
    finance = route(metadata=(("team", "fin*"), ("reviewed", "*")))
    assert matches(finance, event(metadata={"team": "finance", "reviewed": "yes"}))
    assert matches(finance, event(metadata={"team": "fin", "reviewed": ""}))  # "*": present
    assert not matches(finance, event(metadata={"team": "finance"}))  # no "reviewed"
    assert not matches(finance, event(metadata={"team": "ops", "reviewed": "yes"}))
    assert not matches(finance, event(metadata=None))  # no custom metadata at all
    assert not matches(finance, event(metadata={}))


def test_metadata_keys_and_values_are_exact_and_case_sensitive() -> None:
    team = route(metadata=(("team", "finance"),))
    assert not matches(team, event(metadata={"Team": "finance"}))
    assert not matches(team, event(metadata={"team": "Finance"}))
    assert matches(route(metadata=(("flag", ""),)), event(metadata={"flag": ""}))
    assert not matches(route(metadata=(("flag", ""),)), event(metadata={"flag": "x"}))


def test_a_route_without_conditions_matches_every_event() -> None:
    assert matches(route(), event("anything", event_type=EventType.METADATA_UPDATED))


# --- not -------------------------------------------------------------------------------------


def test_not_removes_the_event_only_when_all_its_conditions_hold() -> None:
    reports = route(
        prefix=("reports/",),
        exclude=Conditions(suffix=(".tmp",), max_size=0),
    )
    assert matches(reports, event("reports/q3.csv", size="0"))
    assert matches(reports, event("reports/q3.tmp", size="10"))  # only one of the two holds
    assert not matches(reports, event("reports/q3.tmp", size="0"))


def test_not_with_a_list_removes_any_of_its_values() -> None:
    reports = route(exclude=Conditions(suffix=(".tmp", ".part")))
    assert not matches(reports, event("q3.part"))
    assert not matches(reports, event("q3.tmp"))
    assert matches(reports, event("q3.csv"))


def test_a_not_condition_on_a_missing_field_does_not_hold() -> None:
    # "not: {content_type: text/*}" removes text files; an object without a type is kept.
    keep = route(exclude=Conditions(content_type=("text/*",)))
    assert matches(keep, event(contentType=None))
    assert not matches(keep, event(contentType="text/plain"))


# --- select: first match wins, continue ------------------------------------------------------


def test_the_first_matching_route_wins() -> None:
    routes = [
        route("logs", prefix=("logs/",)),
        route("reports", prefix=("reports/",)),
        route("everything"),
    ]
    matcher = Matcher(routes)
    assert names(matcher.select(event("reports/q3.csv"))) == ["reports"]
    assert names(matcher.select(event("logs/x"))) == ["logs"]
    assert names(matcher.select(event("other"))) == ["everything"]


def test_continue_tries_later_routes_and_stops_at_the_first_without_it() -> None:
    routes = [
        route("audit", continue_=True),
        route("finance", prefix=("reports/",), continue_=True),
        route("logs", prefix=("logs/",)),
        route("ops"),
        route("never"),
    ]
    matcher = Matcher(routes)
    assert names(matcher.select(event("reports/q3.csv"))) == ["audit", "finance", "ops"]
    assert names(matcher.select(event("logs/x"))) == ["audit", "logs"]


def test_no_matching_route_selects_nothing() -> None:
    assert Matcher([route(prefix=("reports/",))]).select(event("logs/x")) == []
    assert Matcher([]).select(event()) == []


# --- reasons -------------------------------------------------------------------------------


def test_a_match_is_explained_by_the_conditions_given_in_file_order() -> None:
    reports = route(
        events=frozenset({FINALIZED}),
        suffix=(".csv",),
        prefix=("reports/", "exports/"),
        min_size=1024,
        metadata=(("team", "finance"), ("reviewed", "*")),
        order=("events", "suffix", "prefix", "min_size", "metadata"),
        exclude=Conditions(suffix=(".tmp",)),
    )
    assert describe(reports) == (
        "event finalized, suffix .csv, prefix reports/ or exports/, min_size 1 KiB, "
        "metadata team=finance and reviewed=*, not (suffix .tmp)"
    )
    assert describe(route()) == "every event"
    assert describe(route(events=frozenset({DELETED, FINALIZED}))) == (
        "events finalized or deleted"
    )


@pytest.mark.parametrize(
    ("spec", "evt", "reason"),
    [
        (
            route(events=frozenset({FINALIZED})),
            event(event_type=DELETED),
            "event: deleted is not finalized",
        ),
        (
            route(bucket=("acme-*", "logs")),
            event(bucket="b"),
            'bucket: "b" does not match any of "acme-*", "logs"',
        ),
        (
            route(name=("reports/**/*.csv",)),
            event("reports-old/x.csv"),
            'name: "reports-old/x.csv" does not match "reports/**/*.csv"',
        ),
        (
            route(prefix=("a/", "b/")),
            event("x"),
            'prefix: "x" does not start with any of "a/", "b/"',
        ),
        (
            route(suffix=(".csv",)),
            event("q3.txt"),
            'suffix: "q3.txt" does not end with ".csv"',
        ),
        (route(min_size=1024), event(size=None), "min_size: the event has no size"),
        (route(min_size=1024), event(size="352"), "min_size: 352 bytes is less than 1 KiB"),
        (route(max_size=100), event(size="352"), "max_size: 352 bytes is more than 100 bytes"),
        (
            route(content_type=("text/*",)),
            event(contentType=None),
            "content_type: the object has no content type",
        ),
        (
            route(content_type=("text/*",)),
            event(contentType="image/png"),
            'content_type: "image/png" does not match "text/*"',
        ),
        (
            route(metadata=(("team", "finance"),)),
            event(metadata=None),
            "metadata: the object has no custom metadata",
        ),
        (
            route(metadata=(("team", "finance"),)),
            event(metadata={"owner": "x"}),
            'metadata: the object has no key "team"',
        ),
        (
            route(metadata=(("team", "finance"),)),
            event(metadata={"team": "ops"}),
            'metadata.team: "ops" does not match "finance"',
        ),
        (
            route(prefix=("reports/",), exclude=Conditions(suffix=(".tmp",))),
            event("reports/q3.tmp"),
            "not: matched (suffix .tmp)",
        ),
        (
            route(suffix=(".csv",)),
            event("evil\x1b[31m\u202e.txt"),
            'suffix: "evil\\u001b[31m\\u202e.txt" does not end with ".csv"',
        ),
    ],
)
def test_a_miss_is_explained_by_the_first_condition_that_failed(
    spec: RouteSpec, evt: StorageEvent, reason: str
) -> None:
    assert Matcher([spec]).explain(evt) == [Verdict(spec, False, reason, False)]


def test_explain_lists_every_route_and_which_ones_select_takes() -> None:
    routes = [
        route("audit", continue_=True),
        route("logs", prefix=("logs/",)),
        route("reports", prefix=("reports/",)),
        route("everything"),
    ]
    verdicts = Matcher(routes).explain(event("reports/q3.csv"))
    assert [(v.route.name, v.matched, v.selected, v.reason) for v in verdicts] == [
        ("audit", True, True, "every event"),
        ("logs", False, False, 'prefix: "reports/q3.csv" does not start with "logs/"'),
        ("reports", True, True, "prefix reports/"),
        ("everything", True, False, "every event"),
    ]


# --- the index -------------------------------------------------------------------------------


def test_a_thousand_distinct_prefixes_leave_one_candidate() -> None:
    routes = [route(f"team-{i}", prefix=(f"team-{i:04d}/",)) for i in range(1000)]
    matcher = Matcher(routes)
    assert matcher.candidates(event("team-0765/q3.csv")) == [765]
    assert matcher.candidates(event("nobody/q3.csv")) == []
    assert names(matcher.select(event("team-0765/q3.csv"))) == ["team-765"]


def test_name_globs_index_by_their_literal_head_or_tail() -> None:
    routes = [route(f"p{i}", name=(f"team-{i}/**/*.csv",)) for i in range(100)]
    routes += [route(f"s{i}", name=(f"**/*.kind{i}",)) for i in range(100)]
    matcher = Matcher(routes)
    assert matcher.candidates(event("team-7/x/q3.csv")) == [7]
    assert matcher.candidates(event("a/b/q3.kind42")) == [142]


def test_literal_buckets_index_and_wildcard_routes_are_always_checked() -> None:
    routes = [route(f"b{i}", bucket=(f"bucket-{i}",)) for i in range(100)]
    routes.append(route("acme", bucket=("acme-*",)))
    routes.append(route("sizes", min_size=10))
    matcher = Matcher(routes)
    assert matcher.candidates(event(bucket="bucket-3")) == [3, 100, 101]


def test_event_types_index_too() -> None:
    routes = [route(f"d{i}", events=frozenset({DELETED})) for i in range(100)]
    routes.append(route("uploads", events=frozenset({FINALIZED})))
    matcher = Matcher(routes)
    assert matcher.candidates(event(event_type=FINALIZED)) == [100]


def test_a_name_matched_by_several_keys_of_one_route_is_one_candidate() -> None:
    matcher = Matcher([route("r", prefix=("a", "ab", "abc"))])
    assert matcher.candidates(event("abcd")) == [0]


# The property: for any routes and any event, the index selects what the plain loop selects.

SEGMENTS = ["a", "b", "ab", "x.csv", "y.tmp", "q3.csv"]
BUCKETS = ["b1", "b2", "acme-1"]


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def some(values: list[str]) -> st.SearchStrategy[tuple[str, ...] | None]:
    return optional(st.lists(st.sampled_from(values), min_size=1, max_size=3).map(tuple))


conditions = st.builds(
    Conditions,
    events=optional(st.frozensets(st.sampled_from(list(EventType)), min_size=1)),
    bucket=some(["b1", "b2", "acme-*", "b?", "*"]),
    name=some(["a/**", "**/*.csv", "a/*", "*.csv", "a/**/x.csv", "ab", "**", "[ab]/**", "b/**"]),
    prefix=some(["a", "a/", "b/", "ab", "x", "q3"]),
    suffix=some([".csv", ".tmp", "b", "x.csv", "a"]),
    min_size=optional(st.sampled_from([0, 100, 352, 1000])),
    max_size=optional(st.sampled_from([0, 100, 352, 1000])),
    content_type=some(["text/*", "text/plain", "image/png", "*"]),
    metadata=optional(
        st.lists(
            st.sampled_from([("team", "fin*"), ("team", "*"), ("k", ""), ("k", "v")]),
            min_size=1,
            max_size=2,
        ).map(tuple)
    ),
)
routes_strategy = st.lists(
    st.builds(
        RouteSpec,
        name=st.sampled_from(["r1", "r2", "r3"]),
        index=st.just(0),
        line=st.just(1),
        match=conditions,
        exclude=optional(conditions.filter(lambda c: bool(c.given()))),
        to=st.just(("ops@example.com",)),
        continue_=st.booleans(),
    ),
    max_size=8,
)
events_strategy = st.builds(
    lambda event_type, segments, bucket, size, content_type, metadata: event(
        "/".join(segments),
        event_type,
        bucket=bucket,
        size=size,
        contentType=content_type,
        metadata=metadata,
    ),
    st.sampled_from(list(EventType)),
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3),
    st.sampled_from(BUCKETS),
    optional(st.sampled_from(["0", "100", "352", "5000"])),
    optional(st.sampled_from(["text/plain", "image/png", "text/csv; charset=utf-8"])),
    optional(st.dictionaries(st.sampled_from(["team", "k"]), st.sampled_from(["", "v", "fin"]))),
)


def plain_select(routes: list[RouteSpec], evt: StorageEvent) -> list[RouteSpec]:
    selected = []
    for spec in routes:
        if matches(spec, evt):
            selected.append(spec)
            if not spec.continue_:
                break
    return selected


@settings(max_examples=1000, deadline=None)
@given(routes_strategy, st.lists(events_strategy, min_size=1, max_size=4))
def test_the_index_selects_exactly_what_a_plain_loop_selects(
    routes: list[RouteSpec], events: list[StorageEvent]
) -> None:
    matcher = Matcher(routes)
    for evt in events:
        assert matcher.select(evt) == plain_select(routes, evt)
        verdicts = matcher.explain(evt)
        assert [v.matched for v in verdicts] == [matches(spec, evt) for spec in routes]
        assert [v.route for v in verdicts if v.selected] == matcher.select(evt)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet="a/*?[]!-^\\ \n\u00e9\U0001f600\x00}{$", max_size=10),
    st.text(alphabet="a/-^\\ \n\u00e9\U0001f600\x00}{$", max_size=10),
    st.booleans(),
)
def test_glob_regex_keeps_every_other_character_literal(
    pattern: str, name: str, path: bool
) -> None:
    """RE2's syntax is not Python's: escapes, class members and non-ASCII characters written
    for it mean what the written-out semantics say."""
    try:
        parts = glob_parts(pattern, path=path)
    except ValueError:
        return
    assert bool(glob_regex(pattern, path=path).match(name)) is reference(parts, name, path=path)
