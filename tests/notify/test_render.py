"""render: subject, plain text and HTML of one event. Object names, bucket names and metadata (keys
and values) are user data (attacker-controlled without event authentication), so the subject
carries no control characters, the text and HTML parts show them as escapes, the HTML escapes
every value, and links are URL-encoded and open the object's own page."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from app.events.models import EventType, StorageEvent, StorageObjectData
from app.notify.render import (
    SUBJECT_LIMIT,
    Rendered,
    console_url,
    human_size,
    render,
    subject_safe,
    visible,
)
from tests.factories import object_data

CONSOLE = "https://console.cloud.google.com/storage/browser/_details/"
C0 = [chr(code) for code in range(0x20)] + ["\x7f"]
C1 = [chr(code) for code in range(0x80, 0xA0)]
BIDI = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"]
MARKS = ["\u200e", "\u200f", "\u061c"]
SEPARATORS = ["\u2028", "\u2029"]
# Invisible in a name (issue 19): zero-width space, joiners, word joiner, soft hyphen, byte order
# mark, invisible operators, a tag character (U+E0000-E007F smuggle hidden text), Hangul fillers.
INVISIBLE = [
    "\u200b", "\u200c", "\u200d", "\u2060", "\u2064", "\ufeff", "\u00ad", "\U000e0041",
    "\U000e0001", "\u115f", "\u1160", "\u3164", "\uffa0", "\u0600", "\U0001d173",
]  # fmt: skip
HANGUL_FILLERS = {"\u115f", "\u1160", "\u3164", "\uffa0"}


def event(
    event_type: EventType = EventType.FINALIZED, event_id: str = "evt-1", **data: Any
) -> StorageEvent:
    return StorageEvent(
        id=event_id,
        source="//storage.googleapis.com/projects/_/buckets/some-bucket",
        type=event_type,
        time=datetime(2020, 9, 29, 11, 32, 0, 123000, tzinfo=UTC),
        data=StorageObjectData.model_validate(object_data(**data)),
    )


def rendered(**data: Any) -> Rendered:
    return render(event(**data), "was uploaded")


class Page(HTMLParser):
    """What a mail client would build from the HTML part: elements, attributes and text."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.hrefs: list[str] = []
        self.text: list[str] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.hrefs += [value or "" for name, value in attrs if name == "href"]
        # Every attribute the renderer writes is fixed text or the console link.
        assert {name for name, _ in attrs} <= {"align", "href"}

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_subject_names_bucket_type_and_object() -> None:
    subject = render(event(name="reports/q3.csv", bucket="demo"), "was uploaded").subject
    assert subject == "[gs://demo] finalized: reports/q3.csv"


@pytest.mark.parametrize("event_type", list(EventType))
def test_subject_uses_the_short_type_name(event_type: EventType) -> None:
    subject = render(event(event_type, name="x"), "changed").subject
    assert subject == f"[gs://some-bucket] {event_type.short}: x"


@pytest.mark.parametrize("char", C0 + C1 + BIDI + MARKS, ids=lambda char: f"U+{ord(char):04X}")
def test_subject_drops_every_control_and_bidi_character(char: str) -> None:
    subject = rendered(name=f"a{char}b").subject
    assert char not in subject
    assert subject.endswith(": a b") or subject.endswith(": ab")


def test_subject_cannot_start_a_new_header() -> None:
    subject = rendered(name="x.txt\r\nBcc: victim@example.com\r\n\r\nbody").subject
    assert subject == "[gs://some-bucket] finalized: x.txt Bcc: victim@example.com body"
    assert not any(unicodedata.category(char) == "Cc" for char in subject)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c"])
def test_subject_drops_unicode_line_breaks(separator: str) -> None:
    assert rendered(name=f"a{separator}b").subject.endswith(": a b")


def test_subject_folds_whitespace() -> None:
    subject = rendered(name="  a \t\t b\n\n c  ").subject
    assert subject == "[gs://some-bucket] finalized: a b c"


def test_subject_is_cleaned_in_the_bucket_name_too() -> None:
    subject = render(event(bucket="b\r\nX-Evil: 1", name="n"), "was uploaded").subject
    assert "\r" not in subject
    assert "\n" not in subject
    assert subject == "[gs://b X-Evil: 1] finalized: n"


def test_long_subject_is_truncated_with_an_ellipsis() -> None:
    subject = rendered(name="x" * 500).subject
    assert len(subject) == SUBJECT_LIMIT
    assert subject.endswith("…")
    assert subject.startswith("[gs://some-bucket] finalized: xxx")


def test_subject_at_the_limit_is_not_truncated() -> None:
    prefix = "[gs://some-bucket] finalized: "
    name = "y" * (SUBJECT_LIMIT - len(prefix))
    assert rendered(name=name).subject == prefix + name


def test_a_1024_byte_name_is_shown_whole_in_both_parts() -> None:
    name = "é" * 512  # Cloud Storage's longest name: 1,024 bytes of UTF-8
    assert len(name.encode()) == 1024
    result = rendered(name=name)
    assert len(result.subject) == SUBJECT_LIMIT
    assert result.subject.endswith("é…")
    assert name in result.text
    assert name in "".join(Page(result.html).text)


@pytest.mark.parametrize("name", ["日本語/ファイル.txt", "Ünïcødé 🚀.png", "مرحبا.pdf"])
def test_unicode_names_survive_in_every_part(name: str) -> None:
    result = rendered(name=name)
    assert result.subject.endswith(f": {name}")
    assert name in result.text
    assert name in "".join(Page(result.html).text)


HOSTILE = "<script>alert(\"x\" & 'y')</script>"


def test_html_escapes_every_value() -> None:
    result = render(
        event(
            event_id=HOSTILE,
            bucket=HOSTILE,
            name=HOSTILE,
            contentType=HOSTILE,
            storageClass=HOSTILE,
            metadata={HOSTILE: HOSTILE},
        ),
        "was uploaded",
    )
    page = Page(result.html)
    assert "script" not in page.tags
    assert set(page.tags) <= {"html", "body", "p", "table", "tr", "th", "td", "a"}
    assert "<script>" not in result.html
    assert "&lt;script&gt;alert(&quot;x&quot; &amp; &#x27;y&#x27;)&lt;/script&gt;" in result.html
    text = "".join(page.text)
    # name (intro and row), bucket (intro and row), id, content type, storage class, key, value
    assert text.count(HOSTILE) >= 9


def test_html_lists_metadata_keys_and_values_escaped() -> None:
    result = rendered(metadata={"owner": "Ada & Bob", "<k>": '"v"'})
    text = "".join(Page(result.html).text)
    assert "Metadata: owner" in text
    assert "Ada & Bob" in text
    assert "Metadata: <k>" in text
    assert '"v"' in text
    assert "Ada &amp; Bob" in result.html
    assert "&lt;k&gt;" in result.html


def test_text_lists_metadata_sorted_by_key() -> None:
    text = rendered(metadata={"zeta": "1", "alpha": "2"}).text
    assert text.index("Metadata: alpha") < text.index("Metadata: zeta")


def test_both_parts_show_what_the_book_sent_and_more() -> None:
    result = rendered(name="reports/q3.csv", size="2048", contentType="text/csv", generation="42")
    page = "".join(Page(result.html).text)
    for expected in (
        "reports/q3.csv",
        "some-bucket",
        "evt-1",
        "google.cloud.storage.object.v1.finalized",
        "2020-09-29T11:32:00.123000Z",
        "2.0 KiB (2,048 bytes)",
        "text/csv",
        "42 (metageneration 1)",
    ):
        assert expected in result.text
        assert expected in page


def test_optional_fields_are_left_out_when_absent() -> None:
    data = StorageObjectData(bucket="b", name="n")
    bare = StorageEvent(id="e", source="s", type=EventType.DELETED, data=data)
    result = render(bare, "was deleted")
    for label in ("Size", "Content type", "Generation", "Event time", "Metadata"):
        assert label not in result.text
    assert "gs://b/n was deleted." in result.text


@pytest.mark.parametrize(
    ("bucket", "name", "path"),
    [
        ("b", "dir/my file#1?.txt", "b/dir/my%20file%231%3F.txt"),
        ("b", "résumé é.pdf", "b/r%C3%A9sum%C3%A9%20%C3%A9.pdf"),
        ("b", "a&b=c;d", "b/a%26b%3Dc%3Bd"),
        ("b", "<x>\"'", "b/%3Cx%3E%22%27"),
        ("b", "line\r\nbreak", "b/line%0D%0Abreak"),
        ("my bucket", "x", "my%20bucket/x"),
    ],
)
def test_console_link_is_url_encoded(bucket: str, name: str, path: str) -> None:
    assert console_url(bucket, name) == CONSOLE + path


def test_console_link_is_in_both_parts() -> None:
    result = rendered(name="dir/my file#1?.txt é")
    link = CONSOLE + "some-bucket/dir/my%20file%231%3F.txt%20%C3%A9"
    assert link in result.text
    assert Page(result.html).hrefs == [link]


def test_console_link_cannot_break_out_of_the_href() -> None:
    result = rendered(name='x" onclick="alert(1)')
    [href] = Page(result.html).hrefs
    assert href == CONSOLE + "some-bucket/x%22%20onclick%3D%22alert%281%29"


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB (1,024 bytes)"),
        (1536, "1.5 KiB (1,536 bytes)"),
        (1024**2, "1.0 MiB (1,048,576 bytes)"),
        (1024**3, "1.0 GiB (1,073,741,824 bytes)"),
        (5 * 1024**4, "5.0 TiB (5,497,558,138,880 bytes)"),
        (1024**5, "1.0 PiB (1,125,899,906,842,624 bytes)"),
        (1024**6, "1.0 EiB (1,152,921,504,606,846,976 bytes)"),
        (2**63 - 1, "8.0 EiB (9,223,372,036,854,775,807 bytes)"),
    ],
)
def test_human_size(size: int, shown: str) -> None:
    assert human_size(size) == shown


@pytest.mark.parametrize("size", [1024**2 - 1, 1024**3 - 1])
def test_human_size_never_shows_1024_of_a_unit(size: int) -> None:
    assert not human_size(size).startswith("1024.0")


def test_text_part_shows_control_characters_as_escapes() -> None:
    text = rendered(name="a\r\nb\x00c\x1b[31m\x85\u202ed\te").text
    assert "a\\x0d\\x0ab\\x00c\\x1b[31m\\x85\\u202ed\\x09e" in text
    for char in ("\r", "\x00", "\x1b", "\x85", "\u202e", "\t"):
        assert char not in text


def test_text_part_keeps_each_value_on_its_line() -> None:
    lines = rendered(name="a\nBucket:        forged").text.splitlines()
    assert [line for line in lines if line.startswith("Bucket:")] == ["Bucket:        some-bucket"]


def test_visible_leaves_printable_text_alone() -> None:
    assert visible("reports/q3 é 日本.csv") == "reports/q3 é 日本.csv"


def test_subject_safe_keeps_printable_unicode() -> None:
    assert subject_safe("  Grüße  aus   東京 ") == "Grüße aus 東京"


# --- every value, every part: keys and values of metadata are names too -----------------------

FORGED_PARAGRAPH = "x\n\nACTION REQUIRED: re-authenticate at https://evil.example/login"
PLACES: dict[str, Callable[[str], dict[str, Any]]] = {
    "name": lambda value: {"name": value},
    "bucket": lambda value: {"bucket": value},
    "content-type": lambda value: {"contentType": value},
    "metadata-key": lambda value: {"metadata": {value: "v"}},
    "metadata-value": lambda value: {"metadata": {"k": value}},
}


def in_place(place: str, value: str) -> Rendered:
    return rendered(**PLACES[place](value))


@pytest.mark.parametrize("place", ["metadata-key", "metadata-value", "name"])
def test_text_part_cannot_gain_a_paragraph(place: str) -> None:
    text = in_place(place, FORGED_PARAGRAPH).text
    assert not [line for line in text.splitlines() if line.startswith("ACTION REQUIRED")]
    assert "x\\x0a\\x0aACTION REQUIRED: re-authenticate at https://evil.example/login" in text


def test_a_metadata_key_with_blank_lines_stays_on_its_row() -> None:
    lines = rendered(metadata={FORGED_PARAGRAPH: "yes"}).text.splitlines()
    [row] = [line for line in lines if line.startswith("Metadata:")]
    assert row.startswith("Metadata: x\\x0a\\x0aACTION REQUIRED")
    assert row.endswith(" yes")


def escaped(char: str) -> str:
    code = ord(char)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(
    "char", C0 + C1 + BIDI + MARKS + SEPARATORS + INVISIBLE, ids=lambda char: f"U+{ord(char):04X}"
)
def test_text_and_html_show_control_and_bidi_characters_as_escapes(place: str, char: str) -> None:
    value = f"a{char}b"
    shown = f"a{escaped(char)}b"
    result = in_place(place, value)
    assert value not in result.text
    assert shown in result.text
    page = "".join(Page(result.html).text)
    assert value not in page
    assert shown in page
    if char not in "\t\n":  # the HTML's own layout has line breaks; nothing else of these
        assert char not in result.html


@pytest.mark.parametrize("place", PLACES)
def test_a_right_to_left_override_cannot_disguise_a_name_in_html(place: str) -> None:
    result = in_place(place, "invoice\u202efdp.exe")  # shows as "invoiceexe.pdf" if kept
    assert "\u202e" not in result.html
    assert "invoice\\u202efdp.exe" in "".join(Page(result.html).text)


def test_html_escapes_a_value_after_making_it_visible() -> None:
    result = rendered(metadata={"<b>\u202e</b>": "&\x00"})
    assert "&lt;b&gt;\\u202e&lt;/b&gt;" in result.html
    assert "&amp;\\x00" in result.html
    assert "b" not in Page(result.html).tags


# --- the console link opens this object, whatever its name ------------------------------------

DOUBLE_DOT = {"..", ".%2e", "%2e.", "%2e%2e"}
SINGLE_DOT = {".", "%2e"}


def browser_path(url: str) -> str:
    """The path a browser opens for `url`, per the WHATWG URL Standard's path state: a `.`
    segment is dropped, a `..` segment drops the one before it, and `%2e` counts as a dot in
    any case (so percent-encoding the dots would not help)."""
    segments = urlsplit(url).path.split("/")[1:]
    opened: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment.lower() in DOUBLE_DOT:
            if opened:
                opened.pop()
            if last:
                opened.append("")
        elif segment.lower() in SINGLE_DOT:
            if last:
                opened.append("")
        else:
            opened.append(segment)
    return "/" + "/".join(opened)


def test_browser_path_resolves_dot_segments_like_a_browser() -> None:
    # Checked against Node's WHATWG URL parser: new URL(url).pathname.
    assert browser_path("https://h/a/b/../c") == "/a/c"
    assert browser_path("https://h/a/%2E%2E/b") == "/b"
    assert browser_path("https://h/a/.%2E") == "/"
    assert browser_path("https://h/a/./b/.") == "/a/b/"
    assert browser_path("https://h/a/..%2Fb") == "/a/..%2Fb"


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "a/../b",
        "./x",
        "../../../etc/passwd",
        "a/..",
        "a/.",
        "../..",
        "a//..",
        "x/./y/../z/",
        "%2e%2e/x",
        "...",
    ],
)
def test_console_link_opens_the_objects_own_page(name: str) -> None:
    link = console_url("some-bucket", name)
    opened = browser_path(link)
    assert opened.startswith("/storage/browser/_details/")
    assert unquote(opened.removeprefix("/storage/browser/_details/")) == f"some-bucket/{name}"


@pytest.mark.parametrize("name", ["folder/sub/file.txt", "...", ".hidden/..x/y"])
def test_console_link_keeps_the_slashes_of_names_without_dot_segments(name: str) -> None:
    assert console_url("some-bucket", name) == f"{CONSOLE}some-bucket/{name}"


def test_console_link_in_both_parts_opens_the_object_named_with_dot_segments() -> None:
    result = rendered(name="../../../etc/passwd")
    [href] = Page(result.html).hrefs
    assert href == CONSOLE + "some-bucket/..%2F..%2F..%2Fetc/passwd"
    assert f"Open in the Cloud Console: {href}" in result.text


def test_a_notification_without_payload_says_what_it_cannot_know() -> None:
    bare = StorageEvent(
        id="123",
        source="//storage.googleapis.com/projects/_/buckets/some-bucket",
        type=EventType.FINALIZED,
        extensions={"payloadformat": "NONE"},
        data=StorageObjectData(bucket="some-bucket", name="a.txt", generation=7),
    )
    text = render(bare, "was uploaded").text
    assert "Not known:" in text
    assert "payload format NONE" in text
    assert "payload format NONE" in render(bare, "was uploaded").html
    full = render(event(), "was uploaded")
    assert "Not known" not in full.text


def test_every_format_character_and_hangul_filler_is_shown_and_nothing_else() -> None:
    """The class of characters made visible is exactly Cc, Cf (of this Python's Unicode, plus
    the Egyptian format controls Unicode 15 added), the line and paragraph separators and the
    Hangul fillers: every other character is left as it is."""
    newer_format = {chr(code) for code in range(0x13439, 0x13440)}
    for code in range(0x110000):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue
        hidden = (
            unicodedata.category(char) in ("Cc", "Cf")
            or char in SEPARATORS
            or char in HANGUL_FILLERS
            or char in newer_format
        )
        assert (visible(char) != char) is hidden, f"U+{code:04X}"


@pytest.mark.parametrize("char", INVISIBLE, ids=lambda char: f"U+{ord(char):04X}")
def test_subject_drops_invisible_characters(char: str) -> None:
    subject = rendered(name=f"invoice{char}.pdf").subject
    assert char not in subject
    assert "invoice .pdf" in subject
