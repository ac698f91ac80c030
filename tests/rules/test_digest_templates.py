"""Digest templates (issue 11): a digest route's subject, text and HTML render a window, not one
event. Their variables are the window's (count, counts, items, more, first_time, last_time,
prefix, bytes...); object names are event data, so they reach each part as they do in event
templates; and every problem is found when the rules file loads, named by field and line."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from app.digests.render import digest_variables, render_digest
from app.digests.window import DigestItem, DigestSummary
from app.events.models import EventType
from app.notify.render import SUBJECT_LIMIT, Rendered, console_url, visible
from app.rules.templates import (
    DIGEST_ITEM_KEYS,
    DIGEST_VARIABLES,
    DigestTemplates,
    TemplateProblem,
    compile_digest_templates,
    sample_digest,
)
from tests.rules.test_templates import HOSTILE_NAMES, ROOT, Page, has_control

FINALIZED, DELETED = EventType.FINALIZED, EventType.DELETED
T0 = datetime(2024, 10, 1, 9, 30, tzinfo=UTC)
DEFAULT = Rendered(subject="default subject", text="default text\n", html="<p>default</p>\n")


def item(
    name: str,
    event_type: EventType = FINALIZED,
    bucket: str = "acme",
    size: int | None = 1024,
    seconds: int = 0,
) -> DigestItem:
    return DigestItem(
        change_key=f"{event_type.short}:{bucket}:{name}",
        event_type=event_type,
        bucket=bucket,
        name=name,
        size=size,
        time=T0 + timedelta(seconds=seconds),
        content_type="text/csv",
    )


def window(items: list[DigestItem], max_items: int = 100) -> DigestSummary:
    summary = DigestSummary.empty(max_items)
    for each in items:
        summary.add(each)
    return summary


# Four uploads and a deletion under reports/2024/, two listed.
WINDOW = [
    item("reports/2024/a.csv", size=1000, seconds=5),
    item("reports/2024/b.csv", size=2000, seconds=1),
    item("reports/2024/old.csv", DELETED, size=500, seconds=9),
    item("reports/2024/c.csv", size=3000, seconds=3),
    item("reports/2024/d.csv", size=4000, seconds=7),
]


def rendered(
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    summary: DigestSummary | None = None,
    route: str = "finance-digest",
) -> Rendered:
    templates = compile_digest_templates(subject, text, html)
    return templates.render(summary or window(WINDOW, max_items=2), route, DEFAULT)


def problem(
    subject: str | None = None, text: str | None = None, html: str | None = None
) -> TemplateProblem:
    with pytest.raises(TemplateProblem) as caught:
        compile_digest_templates(subject, text, html)
    return caught.value


# --- variables -------------------------------------------------------------------------------


def test_the_variables_are_exactly_those_digest_variables_gives() -> None:
    values = digest_variables(sample_digest(), "r")
    assert set(values) == DIGEST_VARIABLES
    items = values["items"]
    assert isinstance(items, list)
    assert items
    assert all(list(each) == list(DIGEST_ITEM_KEYS) for each in items)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ count }}", "5"),
        ("{{ counts.finalized }}/{{ counts.deleted }}/{{ counts.archived }}", "4/1/0"),
        ("{{ counts.metadataUpdated }}", "0"),
        ("{% for i in items %}{{ i.name }};{% endfor %}", "reports/2024/a.csv;reports/2024/b.csv;"),
        (
            "{% for i in items %}{{ i.event }} {{ i.size }};{% endfor %}",
            "finalized 1000;finalized 2000;",
        ),
        ("{{ items[0].bucket }} {{ items[0].content_type }}", "acme text/csv"),
        ("{{ items[0].time }}", "2024-10-01T09:30:05Z"),
        ("{{ items[1].size_human }}", "2.0 KiB (2,000 bytes)"),
        ("{{ items[0].console_url }}", console_url("acme", "reports/2024/a.csv")),
        ("{{ more }}", "3"),
        ("{{ first_time }}", "2024-10-01T09:30:01Z"),
        ("{{ last_time }}", "2024-10-01T09:30:09Z"),
        ("{{ prefix }}", "reports/2024/"),
        ("{{ bytes }}", "10000"),  # uploads only: the deletion adds nothing
        ("{{ bytes_human }}", "9.8 KiB (10,000 bytes)"),
        ("{{ buckets | join(',') }}", "acme"),
        ("{{ route }}", "finance-digest"),
        ("{{ '{:,}'.format(count) }} changes", "5 changes"),
    ],
)
def test_each_variable_renders_the_windows_value(template: str, expected: str) -> None:
    result = rendered(subject=template, text=template, html=template)
    assert result.subject == expected
    assert result.text == expected
    assert result.html == expected.replace("&", "&amp;")


def test_a_text_template_lists_the_items_and_tells_the_rest() -> None:
    text = """\
{{ count }} changes under {{ prefix }}:
{% for i in items %}
- {{ i.event }} {{ i.name }} ({{ i.size_human }})
{% endfor %}
{% if more %}
and {{ more }} more
{% endif %}
"""
    assert rendered(text=text).text == (
        "5 changes under reports/2024/:\n"
        "- finalized reports/2024/a.csv (1000 bytes)\n"
        "- finalized reports/2024/b.csv (2.0 KiB (2,000 bytes))\n"
        "and 3 more\n"
    )


def test_values_a_window_lacks_print_as_nothing() -> None:
    summary = window([item("loose.txt", size=None)])
    result = rendered(text="[{{ prefix }}][{{ items[0].size_human }}][{{ more }}]", summary=summary)
    assert result.text == "[][][0]"


def test_a_window_without_times_prints_its_span_as_nothing() -> None:
    untimed = DigestItem("k", FINALIZED, "acme", "a.csv", 1, None, None)
    result = rendered(text="[{{ first_time }}][{{ last_time }}]", summary=window([untimed]))
    assert result.text == "[][]"


# --- defaults and fallbacks ------------------------------------------------------------------


def test_a_digest_route_without_templates_sends_the_default_digest() -> None:
    templates = compile_digest_templates(None, None, None)
    assert templates == DigestTemplates()
    summary = window(WINDOW)
    default = render_digest(summary, "r")
    assert templates.render(summary, "r", default) is default


def test_parts_without_a_template_come_from_the_default() -> None:
    result = rendered(subject="{{ count }} changes")
    assert result == Rendered(subject="5 changes", text=DEFAULT.text, html=DEFAULT.html)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_a_part_that_renders_blank_is_the_default_part(part: int) -> None:
    blank = "{% if count > 100 %}many{% endif %}"
    subject, text, html = (blank if index == part else None for index in range(3))
    assert rendered(subject, text, html) == DEFAULT
    many = window(WINDOW * 30)  # 150 changes: "many"
    assert rendered(subject, text, html, summary=many) != DEFAULT


def test_a_template_that_fails_on_a_real_window_sends_the_default_part_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The sample window lists objects; a leading route's window can be empty.
    templates = compile_digest_templates("first: {{ items[0].name }}", None, None)
    with caplog.at_level(logging.WARNING, logger="app.rules.templates"):
        result = templates.render(DigestSummary.empty(100), "finance-digest", DEFAULT)
    assert result.subject == DEFAULT.subject
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.__dict__["route"] == "finance-digest"
    assert record.__dict__["field"] == "subject"
    assert record.__dict__["events"] == 0


def test_the_subject_is_sanitised_and_cut_like_an_event_subject() -> None:
    summary = window([item("a\r\nBcc: x@example.com/" + "n" * 300 + ".csv")])
    result = rendered(subject="{{ count }} {{ items[0].name }}", summary=summary)
    assert not has_control(result.subject)
    assert len(result.subject) <= SUBJECT_LIMIT
    assert result.subject.startswith("1 a Bcc: x@example.com/nnn")


# --- hostile names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_inert_in_every_part(name: str) -> None:
    # The name is the common prefix's folder, an item's name and (as a bucket) the bucket list.
    summary = window([item(f"{name}/x.csv", bucket=name), item(f"{name}/y.csv", DELETED)])
    result = rendered(
        subject="{{ prefix }} {% for i in items %}{{ i.name }} {% endfor %}",
        text="{{ prefix }}\n{% for i in items %}{{ i.bucket }} {{ i.name }}\n{% endfor %}"
        "{{ buckets | join(' ') }}\n",
        html='<p title="{{ prefix }}">{{ prefix }}</p>'
        '{% for i in items %}<a href="{{ i.console_url }}">{{ i.name }}</a>{% endfor %}'
        "<p>{{ buckets | join(' ') }}</p>",
        summary=summary,
    )
    assert not has_control(result.subject)
    assert len(result.text.splitlines()) == 4  # nothing the events carry starts a line
    assert not has_control(result.text.replace("\n", ""))
    page = Page(result.html)
    assert page.tags == ["p", "a", "a", "p"]
    assert page.attributes == [
        ("title", visible(f"{name}/")),
        ("href", console_url(name, f"{name}/x.csv")),
        ("href", console_url("acme", f"{name}/y.csv")),
    ]
    assert page.text == [
        visible(f"{name}/"),
        visible(f"{name}/x.csv"),
        visible(f"{name}/y.csv"),
        f"{visible(name)} acme",
    ]
    assert not has_control(result.html)


def test_html_escapes_a_script_name_in_the_listing() -> None:
    summary = window([item("<script>alert(1)</script>")])
    result = rendered(html="{% for i in items %}<li>{{ i.name }}</li>{% endfor %}", summary=summary)
    assert result.html == "<li>&lt;script&gt;alert(1)&lt;/script&gt;</li>"


def test_text_shows_a_line_break_in_a_name_as_an_escape() -> None:
    summary = window([item("a\nforged line.csv")])
    result = rendered(text="{{ items[0].name }}", summary=summary)
    assert result.text == "a\\x0aforged line.csv"


def test_the_subject_gets_raw_names_made_safe_not_escapes() -> None:
    summary = window([item("<b>&.csv")])
    assert rendered(subject="{{ items[0].name }}", summary=summary).subject == "<b>&.csv"


def test_rendering_leaves_the_summary_as_it_was() -> None:
    summary = window([item("a\nb.csv"), item("c.csv")])
    before = summary.to_json()
    rendered(text="{{ items[0].name }}", html="{{ items[0].name }}", summary=summary)
    assert summary.to_json() == before


# --- problems found at load ------------------------------------------------------------------


def test_an_unknown_variable_is_named_with_the_closest_one_and_its_line() -> None:
    caught = problem(text="{{ count }}\n{{ cuont }}")
    assert caught.field == "text"
    assert caught.line == 2
    assert (
        caught.message == 'line 2 of the template: unknown variable "cuont" (did you mean "count"?)'
    )


def test_an_event_variable_in_a_digest_template_points_at_items() -> None:
    caught = problem(subject="{{ name }}")
    assert caught.message.startswith('line 1 of the template: unknown variable "name"')
    assert "{% for item in items %}{{ item.name }}{% endfor %}" in caught.message


def test_a_digest_variable_in_an_event_template_is_unknown() -> None:
    from app.rules.templates import compile_route_templates

    with pytest.raises(TemplateProblem, match='unknown variable "count"'):
        compile_route_templates("{{ count }}", None, None)


def test_a_misspelled_item_key_is_found_by_the_sample_window() -> None:
    caught = problem(html="<ul>\n{% for i in items %}<li>{{ i.nmae }}</li>{% endfor %}\n</ul>")
    assert caught.field == "html"
    assert caught.line == 2
    assert caught.message == (
        "line 2 of the template: rendering a sample window failed: "
        "'dict object' has no attribute 'nmae' (did you mean \"name\"?)"
    )


def test_a_misspelled_count_is_found_with_the_closest_type() -> None:
    caught = problem(subject="{{ counts.finalised }}")
    assert caught.message.endswith("""has no attribute 'finalised' (did you mean "finalized"?)""")


def test_a_key_nothing_is_close_to_lists_the_item_and_count_keys() -> None:
    caught = problem(text="{{ items[0].metadata }}")
    assert caught.message.endswith(
        "(an item has event, bucket, name, size, size_human, content_type, time, console_url; "
        "counts has finalized, deleted, archived, metadataUpdated)"
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ count | nofilter }}", 'line 1 of the template: unknown filter "nofilter"'),
        ("a\n{% for i in items %}", "line 2 of the template: "),
        (
            "{{ count + 'x' }}",
            "line 1 of the template: rendering a sample window failed: TypeError",
        ),
        ("a\n{{ items.__class__ }}", "line 2 of the template: rendering a sample window failed:"),
        ("{% for i in range(10000000) %}.{% endfor %}", "line 1 of the template: rendering a"),
    ],
)
def test_syntax_filter_runtime_and_sandbox_problems_name_their_line(
    source: str, expected: str
) -> None:
    assert problem(text=source).message.startswith(expected)


def test_the_sample_window_exercises_the_listing_and_the_rest() -> None:
    sample = sample_digest()
    assert sample.count == 5
    assert len(sample.items) == 3
    assert sample.more == 2
    assert set(sample.counts) == {FINALIZED, DELETED}
    assert sample.prefix == "reports/2024/"
    assert sample.first_time is not None
    assert sample.last_time is not None
    assert sample.first_time < sample.last_time
    assert sample_digest() is not sample  # a template may change what it is given


def test_a_template_that_only_works_past_the_listing_is_found() -> None:
    # Three of the sample's five objects are listed: a template reaching past them fails at load.
    assert problem(text="{{ items[4].name }}").field == "text"


# --- start-up cost ---------------------------------------------------------------------------


def test_digest_rendering_loads_only_when_a_digest_template_is_compiled() -> None:
    code = (
        "import app.rules.templates as t, sys; a = 'app.digests.render' in sys.modules; "
        "t.compile_route_templates('{{ name }}', None, None); b = 'app.digests.render' in "
        "sys.modules; t.compile_digest_templates('{{ count }}', None, None); "
        "print(a, b, 'app.digests.render' in sys.modules)"
    )
    answer = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert answer == "False False True"
