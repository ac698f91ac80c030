"""render_digest: the subject, text and HTML of one digest email, and the variables digest
templates will get. Names come from events (attacker-controlled without event authentication),
so every part gets today's treatment: no control characters in the subject, visible escapes in
the text, escaped markup in the HTML."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest

from app.digests.render import digest_variables, render_digest
from app.digests.window import MAX_BUCKETS, DigestItem, DigestSummary
from app.events.models import EventType
from app.notify.render import SUBJECT_LIMIT, console_url

FINALIZED, DELETED = EventType.FINALIZED, EventType.DELETED
ARCHIVED, METADATA_UPDATED = EventType.ARCHIVED, EventType.METADATA_UPDATED
T0 = datetime(2024, 10, 1, 9, 30, tzinfo=UTC)
HOSTILE = "evil\r\nBcc: victim@example.com\u202e<script>alert(1)</script>/inv\u202efdp.exe"


def item(
    name: str = "reports/q3.csv",
    event_type: EventType = FINALIZED,
    bucket: str = "acme",
    size: int | None = 1000,
    time: datetime | None = T0,
) -> DigestItem:
    return DigestItem(
        change_key=f"{event_type.short}:{bucket}:{name}",
        event_type=event_type,
        bucket=bucket,
        name=name,
        size=size,
        time=time,
        content_type="text/csv",
    )


def summarise(items: list[DigestItem], max_items: int = 100) -> DigestSummary:
    summary = DigestSummary.empty(max_items)
    for each in items:
        summary.add(each)
    return summary


def burst(finalized: int, deleted: int = 0, folder: str = "reports/") -> list[DigestItem]:
    return [item(f"{folder}f-{n}.csv") for n in range(finalized)] + [
        item(f"{folder}d-{n}.csv", DELETED) for n in range(deleted)
    ]


SUBJECTS = [
    (burst(4990, 10), "[gs://acme] 5,000 changes under reports/ (4,990 finalized, 10 deleted)"),
    (burst(1), "[gs://acme] 1 change under reports/ (1 finalized)"),
    (burst(0, 2), "[gs://acme] 2 changes under reports/ (2 deleted)"),
    # No shared folder: no "under".
    (
        [item("a.csv"), item("logs/b", METADATA_UPDATED)],
        "[gs://acme] 2 changes (1 finalized, 1 metadataUpdated)",
    ),
    # Counts in a fixed order, whatever order the events came in.
    (
        [
            item("r/1", METADATA_UPDATED),
            item("r/2", ARCHIVED),
            item("r/3", DELETED),
            item("r/4", FINALIZED),
        ],
        "[gs://acme] 4 changes under r/ (1 finalized, 1 deleted, 1 archived, 1 metadataUpdated)",
    ),
    (
        [item(bucket="a"), item(bucket="b", event_type=ARCHIVED)],
        "[gs://a, gs://b] 2 changes under reports/ (1 finalized, 1 archived)",
    ),
    (
        [item(bucket=f"b{n}") for n in range(5)],
        "[gs://b0, gs://b1, gs://b2 and 2 more] 5 changes under reports/ (5 finalized)",
    ),
    (
        [item(bucket=f"b{n:02}") for n in range(MAX_BUCKETS + 1)],
        "[gs://b00, gs://b01, gs://b02 and more] 21 changes under reports/ (21 finalized)",
    ),
    ([], "0 changes"),
]


@pytest.mark.parametrize(("window", "subject"), SUBJECTS)
def test_subject_counts_changes_by_type_in_a_fixed_order(
    window: list[DigestItem], subject: str
) -> None:
    assert render_digest(summarise(window), "r").subject == subject


def test_a_long_prefix_is_cut_from_the_subject_but_the_counts_stay() -> None:
    folder = "very-long-folder-name/" * 20
    subject = render_digest(summarise(burst(3, 1, folder)), "r").subject
    assert len(subject) == SUBJECT_LIMIT
    assert subject.startswith("[gs://acme] 4 changes under very-long-folder-name/")
    assert subject.endswith("… (3 finalized, 1 deleted)")


class Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.links += [value or "" for key, value in attrs if key == "href"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(html: str) -> Markup:
    markup = Markup()
    markup.feed(html)
    markup.close()
    return markup


def test_hostile_names_are_harmless_in_every_part() -> None:
    window = [item(HOSTILE), item(HOSTILE + "2", DELETED, bucket="acme")]
    rendered = render_digest(summarise(window), "route\u202e\r\n<i>")
    # The prefix itself is hostile: "evil\r\nBcc: ...</script>/".
    assert "\r" not in rendered.subject
    assert "\n" not in rendered.subject
    assert "\u202e" not in rendered.subject
    assert rendered.subject.startswith("[gs://acme] 2 changes under evil Bcc: victim@")
    for part in (rendered.text, rendered.html):
        assert "\r" not in part
        assert "\u202e" not in part
        assert "\n<script" not in part
        assert not any(line.startswith("Bcc:") for line in part.splitlines())
    assert "evil\\x0d\\x0aBcc: victim@example.com\\u202e<script>" in rendered.text
    assert "route\\u202e\\x0d\\x0a<i>" in rendered.text
    markup = parsed(rendered.html)
    assert markup.tags == {"html", "body", "p", "table", "tr", "th", "td", "a"}
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered.html
    shown = "".join(markup.text)
    assert "gs://acme/evil\\x0d\\x0aBcc: victim@example.com\\u202e<script>alert(1)" in shown
    assert markup.links == [console_url("acme", HOSTILE), console_url("acme", HOSTILE + "2")]


def listed_in_text(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("- ")]


def test_five_hundred_events_list_max_items_names_and_count_the_rest() -> None:
    window = burst(450, 50)
    rendered = render_digest(summarise(window, max_items=100), "r")
    assert rendered.subject == "[gs://acme] 500 changes under reports/ (450 finalized, 50 deleted)"
    lines = listed_in_text(rendered.text)
    assert len(lines) == 100
    assert lines[0] == "- finalized gs://acme/reports/f-0.csv, 1000 bytes, 2024-10-01T09:30:00Z"
    assert lines[-1].startswith("- finalized gs://acme/reports/f-99.csv,")
    assert "The first 100 of 500 objects:" in rendered.text
    assert rendered.text.endswith("\nand 400 more\n")
    assert "Changes:         500\n  finalized:     450\n  deleted:       50\n" in rendered.text
    assert "Bytes added:     439.5 KiB (450,000 bytes)\n" in rendered.text
    markup = parsed(rendered.html)
    assert len(markup.links) == 100
    assert "<p>and 400 more</p>" in rendered.html
    assert '<tr><th align="left">deleted</th><td>50</td></tr>' in rendered.html


def test_thousands_separators_in_counts_and_the_rest() -> None:
    rendered = render_digest(summarise(burst(4990, 10), max_items=100), "r")
    assert "Changes:         5,000\n  finalized:     4,990\n" in rendered.text
    assert rendered.text.endswith("\nand 4,900 more\n")
    assert "The first 100 of 5,000 objects:" in rendered.text


def test_no_common_prefix_is_told_as_none() -> None:
    rendered = render_digest(summarise([item("a.csv"), item("b.csv")]), "r")
    assert " under " not in rendered.subject
    assert "Common prefix:   (none)\n" in rendered.text
    assert rendered.text.startswith("2 changes in gs://acme.\n")
    assert '<tr><th align="left">Common prefix</th><td>(none)</td></tr>' in rendered.html


def test_a_single_change_lists_it_without_more() -> None:
    rendered = render_digest(summarise([item(size=52431)]), "finance")
    assert rendered.text == (
        "1 change in gs://acme under reports/.\n"
        "\n"
        "Changes:         1\n"
        "  finalized:     1\n"
        "Bytes added:     51.2 KiB (52,431 bytes)\n"
        "Time span (UTC): 2024-10-01T09:30:00Z\n"
        "Common prefix:   reports/\n"
        "Buckets:         gs://acme\n"
        "Route:           finance\n"
        "\n"
        "Objects:\n"
        "- finalized gs://acme/reports/q3.csv, 51.2 KiB (52,431 bytes), 2024-10-01T09:30:00Z\n"
    )
    assert "more" not in rendered.html
    assert parsed(rendered.html).links == [console_url("acme", "reports/q3.csv")]


def test_time_span_runs_from_first_to_last_and_missing_sizes_and_times_are_left_out() -> None:
    window = [
        item("r/a", time=T0 + timedelta(minutes=5)),
        item("r/b", DELETED, size=None, time=None),
        item("r/c", time=T0),
    ]
    rendered = render_digest(summarise(window), "r")
    assert "Time span (UTC): 2024-10-01T09:30:00Z to 2024-10-01T09:35:00Z\n" in rendered.text
    assert "- deleted gs://acme/r/b\n" in rendered.text
    assert "<tr><td>deleted</td>" in rendered.html
    assert "<td></td><td></td></tr>" in rendered.html
    no_times = render_digest(summarise([item(time=None)]), "r")
    assert "Time span (UTC): unknown\n" in no_times.text


def test_buckets_only_counted_are_told_in_the_body() -> None:
    window = [item(bucket=f"b{n:02}") for n in range(MAX_BUCKETS + 2)]
    text = render_digest(summarise(window), "r").text
    assert "Buckets:         gs://b00, gs://b01, " in text
    assert "gs://b19 and more\n" in text
    assert "Other buckets:   2 changes\n" in text


def test_max_items_zero_lists_nothing_but_counts_everything() -> None:
    rendered = render_digest(summarise(burst(3), max_items=0), "r")
    assert listed_in_text(rendered.text) == []
    assert "more" not in rendered.text
    assert "<a " not in rendered.html
    assert "Changes:         3\n" in rendered.text


def test_an_empty_summary_renders_without_failing() -> None:
    rendered = render_digest(DigestSummary.empty(10), "r")
    assert rendered.text.startswith("No changes.\n")
    assert "Buckets:         (none)\n" in rendered.text


def test_render_leaves_the_summary_as_it_was_and_json_renders_the_same() -> None:
    summary = summarise([item(HOSTILE), *burst(120, 30)], max_items=100)
    before = summary.to_json()
    rendered = render_digest(summary, "r")
    assert summary.to_json() == before
    again = DigestSummary.from_json(json.loads(json.dumps(summary.to_json())))
    assert again == summary
    assert render_digest(again, "r") == rendered
    assert digest_variables(again, "r") == digest_variables(summary, "r")


def test_digest_variables_give_templates_the_raw_values() -> None:
    window = [
        item("reports/a.csv", size=2048, time=T0 + timedelta(seconds=1)),
        item("reports/<b>.csv", DELETED, bucket="other", size=None, time=T0),
        item("reports/c.csv"),
    ]
    assert digest_variables(summarise(window, max_items=2), "finance") == {
        "count": 3,
        "counts": {"finalized": 2, "deleted": 1, "archived": 0, "metadataUpdated": 0},
        "items": [
            {
                "event": "finalized",
                "bucket": "acme",
                "name": "reports/a.csv",
                "size": 2048,
                "size_human": "2.0 KiB (2,048 bytes)",
                "content_type": "text/csv",
                "time": "2024-10-01T09:30:01Z",
                "console_url": console_url("acme", "reports/a.csv"),
            },
            {
                "event": "deleted",
                "bucket": "other",
                "name": "reports/<b>.csv",
                "size": None,
                "size_human": None,
                "content_type": "text/csv",
                "time": "2024-10-01T09:30:00Z",
                "console_url": console_url("other", "reports/<b>.csv"),
            },
        ],
        "more": 1,
        "first_time": "2024-10-01T09:30:00Z",
        "last_time": "2024-10-01T09:30:01Z",
        "prefix": "reports/",
        "bytes": 3048,
        "bytes_human": "3.0 KiB (3,048 bytes)",
        "route": "finance",
        "buckets": ["acme", "other"],
    }
