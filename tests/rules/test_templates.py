"""Route templates: a route's own subject, text and HTML. The templates are the operator's; the
variables are event data (attacker-controlled without event authentication), so each part gets
them in the form it can carry: the subject sanitised as today's, text and HTML with control and bidi
characters shown as escapes, HTML autoescaped. Every problem a template can have is found when the
rules file loads, named by field and line, never as a traceback."""

from __future__ import annotations

import logging
import subprocess
import sys
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from app.events.models import EventType, StorageEvent, StorageObjectData
from app.notify.render import SUBJECT_LIMIT, VERBS, Rendered, console_url, render, visible
from app.rules.templates import (
    VARIABLES,
    TemplateProblem,
    compile_route_templates,
    footer,
    sample_event,
    variables,
    with_footer,
)
from tests.factories import object_data

ROOT = Path(__file__).resolve().parents[2]
HOSTILE_NAMES = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "x.txt\r\nBcc: victim@example.com\r\n\r\nforged paragraph",
    "invoice\u202efdp.exe",
    "a\u2028b\x00c\x1bd",
]


def event(
    event_type: EventType = EventType.FINALIZED,
    event_id: str = "evt-1",
    time: datetime | None = datetime(2020, 9, 29, 11, 32, 0, 123000, tzinfo=UTC),
    **data: Any,
) -> StorageEvent:
    return StorageEvent(
        id=event_id,
        source="//storage.googleapis.com/projects/_/buckets/some-bucket",
        type=event_type,
        time=time,
        data=StorageObjectData.model_validate(object_data(**data)),
    )


def default_for(storage_event: StorageEvent) -> Rendered:
    return render(storage_event, VERBS[storage_event.type])


def rendered(
    storage_event: StorageEvent,
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    route: str = "finance-reports",
) -> Rendered:
    templates = compile_route_templates(subject, text, html)
    return templates.render(storage_event, route, default_for(storage_event))


def problem(subject: str | None = None, text: str | None = None, html: str | None = None) -> str:
    with pytest.raises(TemplateProblem) as caught:
        compile_route_templates(subject, text, html)
    return str(caught.value)


def has_control(value: str) -> bool:
    return any(unicodedata.category(char) in {"Cc", "Cf", "Zl", "Zp"} for char in value)


class Page(HTMLParser):
    """What a mail client builds from the HTML part: elements, attributes and text."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.text: list[str] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += attrs

    def handle_data(self, data: str) -> None:
        self.text.append(data)


# Variables


def test_the_variables_are_exactly_the_documented_ones() -> None:
    assert set(variables(event(), "r")) == VARIABLES
    assert {
        "event",
        "verb",
        "bucket",
        "name",
        "size",
        "size_human",
        "content_type",
        "generation",
        "metageneration",
        "time",
        "event_id",
        "metadata",
        "console_url",
        "route",
    } == VARIABLES


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ event }}", "archived"),
        ("{{ verb }}", "was archived (it is now a noncurrent version)"),
        ("{{ bucket }}", "acme"),
        ("{{ name }}", "reports/q3.csv"),
        ("{{ size }}", "2048"),
        ("{{ size + 1 }}", "2049"),
        ("{{ size_human }}", "2.0 KiB (2,048 bytes)"),
        ("{{ content_type }}", "text/csv"),
        ("{{ generation }}", "1700000000000001"),
        ("{{ generation + 1 }}", "1700000000000002"),
        ("{{ metageneration }}", "3"),
        ("{{ time }}", "2020-09-29T11:32:00.123000Z"),
        ("{{ event_id }}", "evt-42"),
        ("{{ metadata.team }}/{{ metadata['cost-centre'] }}", "finance/cc 7"),
        ("{{ metadata | length }}", "2"),
        ("{{ console_url }}", console_url("acme", "reports/q3.csv")),
        ("{{ route }}", "finance-reports"),
    ],
)
def test_each_variable_renders_the_event_value(template: str, expected: str) -> None:
    storage_event = event(
        EventType.ARCHIVED,
        event_id="evt-42",
        bucket="acme",
        name="reports/q3.csv",
        size="2048",
        contentType="text/csv",
        generation="1700000000000001",
        metageneration="3",
        metadata={"team": "finance", "cost-centre": "cc 7"},
    )
    templates = compile_route_templates(
        template, None, None, sample=sample_event({"team": "x", "cost-centre": "y"})
    )
    result = templates.render(storage_event, "finance-reports", default_for(storage_event))
    assert result.subject == expected


@pytest.mark.parametrize("event_type", list(EventType))
def test_event_and_verb_follow_the_event_type(event_type: EventType) -> None:
    result = rendered(event(event_type), subject="{{ event }} {{ verb }}")
    assert result.subject == f"{event_type.short} {VERBS[event_type]}"


def test_verbs_are_the_words_of_todays_email() -> None:
    for event_type, verb in VERBS.items():
        assert f"{verb}." in default_for(event(event_type)).text


def test_time_is_iso_8601_in_utc_with_z() -> None:
    paris = timezone(timedelta(hours=2))
    storage_event = event(time=datetime(2024, 10, 1, 11, 30, tzinfo=paris))
    assert rendered(storage_event, subject="{{ time }}").subject == "2024-10-01T09:30:00Z"


def test_a_time_without_an_offset_is_read_as_utc() -> None:
    storage_event = event(time=datetime(2024, 10, 1, 9, 30))
    assert rendered(storage_event, subject="{{ time }}").subject == "2024-10-01T09:30:00Z"


def test_values_the_event_lacks_print_as_nothing() -> None:
    storage_event = event(time=None, size=None, contentType=None, generation=None)
    result = rendered(
        storage_event,
        subject="[{{ size }}][{{ size_human }}][{{ content_type }}][{{ generation }}][{{ time }}]",
        text="{% if size is none %}no size{% endif %} {{ metadata | length }}",
    )
    assert result.subject == "[][][][][]"
    assert result.text == "no size 0"


def test_block_tags_leave_no_blank_lines_in_text() -> None:
    storage_event = event(metadata={"b": "2", "a": "1"})
    text = (
        "Metadata:\n"
        "{% for key, value in metadata | dictsort %}\n"
        "  {{ key }} = {{ value }}\n"
        "{% endfor %}\n"
        "end"
    )
    assert rendered(storage_event, text=text).text == "Metadata:\n  a = 1\n  b = 2\nend"


# Which part comes from where


def test_a_route_without_templates_sends_todays_email() -> None:
    storage_event = event()
    default = default_for(storage_event)
    assert compile_route_templates(None, None, None).render(storage_event, "r", default) is default


def test_parts_without_a_template_come_from_the_default() -> None:
    storage_event = event(name="q3.csv")
    default = default_for(storage_event)
    result = rendered(storage_event, subject="new: {{ name }}")
    assert result == Rendered(subject="new: q3.csv", text=default.text, html=default.html)

    result = rendered(storage_event, html="<p>{{ name }}</p>")
    assert result == Rendered(subject=default.subject, text=default.text, html="<p>q3.csv</p>")


@pytest.mark.parametrize("subject", ["", "{{ content_type }}", "  {{ '\\n\\t' }}  "])
def test_a_blank_subject_falls_back_to_the_default_subject(subject: str) -> None:
    storage_event = event(contentType=None)
    assert rendered(storage_event, subject=subject).subject == default_for(storage_event).subject


def test_blank_text_and_html_fall_back_to_the_default_parts() -> None:
    storage_event = event(contentType=None)
    default = default_for(storage_event)
    result = rendered(storage_event, text="{{ content_type }}\n", html=" {{ content_type }} ")
    assert (result.text, result.html) == (default.text, default.html)


def test_a_template_that_fails_on_a_real_event_sends_the_default_part_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The sample event has a size; this event does not: `size + 1` only fails now.
    storage_event = event(size=None, name="q3.csv")
    with caplog.at_level(logging.WARNING, logger="app.rules.templates"):
        result = rendered(storage_event, subject="{{ name }}", text="{{ size + 1 }} bytes")
    assert result.subject == "q3.csv"
    assert result.text == default_for(storage_event).text
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.__dict__["route"] == "finance-reports"
    assert record.__dict__["field"] == "text"
    assert record.__dict__["object"] == "q3.csv"
    assert "TypeError" in record.__dict__["error"]


# Hostile values


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_inert_in_every_part(name: str) -> None:
    storage_event = event(name=name, metadata={"k\ny": "v\r\nBcc: x@example.com\u202e"})
    result = rendered(
        storage_event,
        subject="[{{ bucket }}] {{ name }} {{ metadata.values() | join(',') }}",
        text="{{ name }}\n{% for k, v in metadata.items() %}{{ k }}={{ v }}{% endfor %}\n",
        html='<p title="{{ name }}">{{ name }}</p><p>{{ metadata | dictsort }}</p>',
    )
    assert not has_control(result.subject)
    assert len(result.text.splitlines()) == 2  # nothing the event carries starts a line
    assert not has_control(result.text.replace("\n", ""))
    page = Page(result.html)
    assert page.tags == ["p", "p"]
    assert page.attributes == [("title", visible(name))]
    assert page.text[0] == visible(name)
    assert not has_control(result.html)


def test_html_escapes_a_script_name() -> None:
    result = rendered(event(name="<script>alert(1)</script>"), html="<p>{{ name }}</p>")
    assert result.html == "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert Page(result.html).text == ["<script>alert(1)</script>"]


def test_html_keeps_a_name_inside_its_attribute() -> None:
    name = '"><img src=x onerror=alert(1)>'
    result = rendered(event(name=name), html='<a title="{{ name }}" href="{{ console_url }}">x</a>')
    page = Page(result.html)
    assert page.tags == ["a"]
    assert page.attributes == [("title", name), ("href", console_url("some-bucket", name))]


def test_html_escapes_metadata_keys_and_values() -> None:
    storage_event = event(metadata={"<b>k</b>": "<i>v</i>"})
    html = "{% for k, v in metadata.items() %}<td>{{ k }}</td><td>{{ v }}</td>{% endfor %}"
    result = rendered(storage_event, html=html)
    assert Page(result.html).tags == ["td", "td"]
    assert Page(result.html).text == ["<b>k</b>", "<i>v</i>"]


def test_html_shows_bidi_and_line_breaks_as_escapes() -> None:
    result = rendered(event(name="invoice\u202efdp.exe\n"), html="<p>{{ name }}</p>")
    assert result.html == "<p>invoice\\u202efdp.exe\\x0a</p>"


def test_text_shows_control_and_bidi_characters_as_escapes() -> None:
    storage_event = event(
        name="x.txt\n\nDear user, click here", metadata={"a\u2029b": "c\u202ed"}, event_id="e\r1"
    )
    text = "{{ name }}|{{ event_id }}|{% for k, v in metadata.items() %}{{ k }}={{ v }}{% endfor %}"
    result = rendered(storage_event, text=text)
    assert result.text == "x.txt\\x0a\\x0aDear user, click here|e\\x0d1|a\\u2029b=c\\u202ed"


def test_text_and_subject_are_not_html_escaped() -> None:
    result = rendered(event(name="a&b<c>.csv"), subject="{{ name }}", text="{{ name }}")
    assert (result.subject, result.text) == ("a&b<c>.csv", "a&b<c>.csv")


def test_the_subject_is_sanitised_like_todays() -> None:
    storage_event = event(name="x.txt\r\nBcc: victim@example.com\r\n\r\nbody\u202e")
    result = rendered(storage_event, subject="New:  {{ name }}\n")
    assert result.subject == "New: x.txt Bcc: victim@example.com body"


def test_a_long_subject_is_truncated_with_an_ellipsis() -> None:
    result = rendered(event(name="x" * 1000), subject="[{{ bucket }}] {{ name }}")
    assert len(result.subject) == SUBJECT_LIMIT
    assert result.subject.startswith("[some-bucket] xxx")
    assert result.subject.endswith("x…")


# Problems found at load


def test_an_unknown_variable_is_named_with_the_closest_one() -> None:
    message = problem(subject="[{{ bucekt }}] {{ name }}")
    assert (
        message
        == 'subject: line 1 of the template: unknown variable "bucekt" (did you mean "bucket"?)'
    )


def test_an_unknown_variable_names_its_line_and_field() -> None:
    with pytest.raises(TemplateProblem) as caught:
        compile_route_templates(None, "Hello\n\n{{ nmae }}\n", None)
    assert caught.value.field == "text"
    assert caught.value.line == 3
    assert (
        caught.value.message
        == 'line 3 of the template: unknown variable "nmae" (did you mean "name"?)'
    )


def test_an_unknown_variable_without_a_close_name_lists_the_variables() -> None:
    message = problem(html="{{ recipient }}")
    assert message.startswith(
        'html: line 1 of the template: unknown variable "recipient" (variables: bucket, '
    )


def test_several_unknown_variables_are_named_together() -> None:
    message = problem(subject="{{ nme }} {{ sise }}")
    assert message == (
        'subject: line 1 of the template: unknown variables "nme" (did you mean "name"?), '
        '"sise" (did you mean "size"?)'
    )


def test_loop_variables_and_jinja_globals_are_not_unknown() -> None:
    text = (
        "{% for k, v in metadata.items() %}{{ loop.index }}{{ k }}{% endfor %}{{ range(2) | list }}"
    )
    assert compile_route_templates(None, text, None).text is not None


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("a\n\n{{ name }", "line 3 of the template: unexpected '}'"),
        ("{% if name %}\nx\n", "line 2 of the template: Unexpected end of template"),
        ("a\n{% frobnicate %}", "line 2 of the template: Encountered unknown tag 'frobnicate'"),
        (
            "a\n{{ name | uper }}",
            'line 2 of the template: unknown filter "uper" (did you mean "upper"?)',
        ),
    ],
)
def test_a_syntax_error_names_its_line(source: str, expected: str) -> None:
    with pytest.raises(TemplateProblem) as caught:
        compile_route_templates(None, None, source)
    assert caught.value.field == "html"
    assert caught.value.message.startswith(expected)
    assert "\n" not in str(caught.value)


def test_an_unknown_filter_without_a_close_name_is_named() -> None:
    assert problem(subject="{{ name | zzzzzz }}") == (
        'subject: line 1 of the template: unknown filter "zzzzzz"'
    )


def test_a_runtime_error_is_found_by_the_sample_render() -> None:
    with pytest.raises(TemplateProblem) as caught:
        compile_route_templates(None, 'one\ntwo {{ size + "x" }}', None)
    assert (caught.value.field, caught.value.line) == ("text", 2)
    assert caught.value.message == (
        "line 2 of the template: rendering a sample event failed: "
        "TypeError: unsupported operand type(s) for +: 'int' and 'str'"
    )


def test_a_metadata_key_the_sample_lacks_is_found_with_a_way_out() -> None:
    message = problem(subject="{{ metadata.team }}")
    assert message == (
        "subject: line 1 of the template: rendering a sample event failed: "
        "'dict object' has no attribute 'team' "
        '(for a metadata key an object may lack, write metadata.get("team", ""))'
    )
    assert compile_route_templates('{{ metadata.get("team", "") }}', None, None).subject


def test_a_sample_with_the_routes_metadata_keys_lets_a_template_use_them() -> None:
    templates = compile_route_templates(
        "{{ metadata.team }}", None, None, sample=sample_event({"team": "finance"})
    )
    storage_event = event(metadata={"team": "ops"})
    assert templates.render(storage_event, "r", default_for(storage_event)).subject == "ops"


@pytest.mark.parametrize(
    "source",
    [
        "a\n{{ event.__class__ }}",
        "a\n{{ name.__class__.__mro__ }}",
        "a\n{{ metadata.__class__.__subclasses__() }}",
        "a\n{{ cycler.__init__.__globals__ }}",
        "a\n{{ size.real.__class__ }}",
        "a\n{{ '{0.__class__}'.format(name) }}",
    ],
)
def test_the_sandbox_refuses_internals(source: str) -> None:
    with pytest.raises(TemplateProblem) as caught:
        compile_route_templates(source, None, None)
    assert caught.value.line == 2
    assert caught.value.message.startswith(
        "line 2 of the template: rendering a sample event failed:"
    )
    assert caught.value.message.endswith("is unsafe")


def test_the_sandbox_refuses_a_huge_range() -> None:
    message = problem(text="{% for i in range(10000000) %}.{% endfor %}")
    assert "Range too big" in message


def test_a_problem_in_one_part_names_that_part() -> None:
    with pytest.raises(TemplateProblem) as caught:
        compile_route_templates("{{ name }}", "{{ name }}", "{{ nmae }}")
    assert caught.value.field == "html"


def test_a_template_is_compiled_once() -> None:
    first = compile_route_templates("[{{ bucket }}] shared", None, None)
    second = compile_route_templates("[{{ bucket }}] shared", None, None)
    assert first.subject is not None
    assert first.subject is second.subject


def test_the_sample_event_is_a_realistic_upload() -> None:
    sample = sample_event()
    assert sample.type is EventType.FINALIZED
    assert sample.data.size is not None
    assert sample.time is not None
    assert sample.data.metadata
    assert sample_event({"team": "x"}).data.metadata == {"team": "x"}


# Footer


def test_footer_says_which_route_and_why() -> None:
    assert footer("finance-reports", "prefix reports/, suffix .csv") == (
        "Sent by route finance-reports because it matched: prefix reports/, suffix .csv"
    )


def test_footer_ends_the_text_after_a_blank_line() -> None:
    storage_event = event()
    result = with_footer(default_for(storage_event), footer("ops", "every event"))
    assert result.text == default_for(storage_event).text.rstrip("\n") + (
        "\n\nSent by route ops because it matched: every event\n"
    )
    templated = with_footer(rendered(storage_event, text="Hello"), "the footer")
    assert templated.text == "Hello\n\nthe footer\n"


def test_footer_goes_before_body_end_in_the_html() -> None:
    storage_event = event()
    result = with_footer(default_for(storage_event), footer("ops", "suffix <.csv>"))
    assert result.html.endswith(
        '<p style="color:#666;font-size:small">'
        "Sent by route ops because it matched: suffix &lt;.csv&gt;</p>\n</body></html>\n"
    )
    assert result.subject == default_for(storage_event).subject


def test_footer_is_appended_to_html_without_a_body() -> None:
    result = with_footer(rendered(event(), html="<p>hi</p>"), "route r")
    assert result.html == '<p>hi</p><p style="color:#666;font-size:small">route r</p>\n'


def test_footer_characters_are_made_visible() -> None:
    result = with_footer(Rendered("s", "t", "<body></body>"), "a\nb\u202e")
    assert result.text == "t\n\na\\x0ab\\u202e\n"
    assert "a\\x0ab\\u202e</p>" in result.html


# Start-up cost


def test_importing_the_module_does_not_import_jinja2() -> None:
    code = "import app.rules.templates, sys; print('jinja2' in sys.modules)"
    after_compile = (
        "import app.rules.templates as t, sys; t.compile_route_templates('{{ name }}', None, None);"
        " print('jinja2' in sys.modules)"
    )
    answers = [
        subprocess.run(
            [sys.executable, "-c", source], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        for source in (code, after_compile)
    ]
    assert answers == ["False", "True"]
