"""StorageEvent -> subject, plain text and HTML. Pure: no I/O, no settings.

Object names, bucket names and metadata (keys and values) are user data, and attacker-controlled
where events are not authenticated. Every value gets the same treatment in every part: the subject
loses control, format (bidi, zero-width, tag) characters and Hangul fillers (no header injection,
nothing hidden), the text and HTML parts show them as visible escapes (no forged paragraphs, no
reordered or hidden text), the HTML also escapes markup, and the
console link is URL-encoded with no dot segments.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote

from app.events.models import EventType, StorageEvent

SUBJECT_LIMIT = 200
# Unicode category Cc (C0, DEL, C1), the line and paragraph separators (a mail client may break a
# line there), every format character (category Cf: the bidirectional controls that can reorder
# what a reader sees, Trojan Source, CVE-2021-42574; zero-width spaces and joiners, the soft
# hyphen and the byte order mark that hide inside a name, `invoice\u200b.pdf`; the tag characters
# U+E0000-E007F that smuggle invisible text), and the Hangul fillers, which render as nothing.
# Cf as of Unicode 15 (tests/notify/test_render.py checks it against unicodedata). One
# precompiled class: this runs on every value rendered.
_CONTROLS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029"
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
    "\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f"
    "\u115f\u1160\u3164\uffa0]"
)
_SPACES = re.compile(r"\s+")
_HTML_SPECIAL = re.compile("[&<>\"']")
_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
# What happened, in the words of the email ("gs://b/n was uploaded.") and of templates (`verb`).
VERBS: Mapping[EventType, str] = {
    EventType.FINALIZED: "was uploaded",
    EventType.DELETED: "was deleted",
    EventType.ARCHIVED: "was archived (it is now a noncurrent version)",
    EventType.METADATA_UPDATED: "had its metadata updated",
}


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str


def subject_safe(value: str) -> str:
    """Control and bidi characters out, whitespace folded: nothing can start a new header."""
    return _SPACES.sub(" ", _CONTROLS.sub(" ", value)).strip()


def visible(value: str) -> str:
    """Control and bidi characters shown as escapes, so a name with a line break reads as one
    line and `invoice\\u202efdp.exe` does not read as "invoiceexe.pdf"."""
    return _CONTROLS.sub(_escape, value)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_html(value: str) -> str:
    """html.escape, skipped for the common value that has nothing to escape (a regex search
    costs a fifth of html.escape's five replacements)."""
    return html.escape(value, quote=True) if _HTML_SPECIAL.search(value) else value


def truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def human_size(size: int) -> str:
    if size < 1024:
        return "1 byte" if size == 1 else f"{size} bytes"
    value = float(size)
    for unit in _UNITS[1:]:
        value /= 1024
        if round(value, 1) < 1024 or unit == _UNITS[-1]:  # never "1024.0 KiB"
            return f"{value:.1f} {unit} ({size:,} bytes)"
    raise AssertionError("unreachable")  # pragma: no cover


CONSOLE_DETAILS = "https://console.cloud.google.com/storage/browser/_details/"
_DOT_SEGMENTS = frozenset({".", ".."})


def console_url(bucket: str, name: str) -> str:
    """The object's details page. Its name's slashes stay slashes (the console shows folders),
    except around a `.` or `..` segment: browsers resolve dot segments (`a/../b` would open `b`),
    and percent-encoding the dots does not stop them (the WHATWG URL Standard reads `%2e` and
    `%2e%2e` as dot segments too). So a dot segment is joined to the next segment, or to the one
    before when it is last, with an encoded slash (`a/..%2Fb`): no segment is a dot segment."""
    segments = [quote(bucket, safe=""), *(quote(part, safe="") for part in name.split("/"))]
    separators = ["/"] * (len(segments) - 1)
    for index, segment in enumerate(segments):
        if segment in _DOT_SEGMENTS:
            separators[index if index < len(separators) else index - 1] = "%2F"
    path = segments[0] + "".join(
        separator + segment for separator, segment in zip(separators, segments[1:], strict=True)
    )
    return CONSOLE_DETAILS + path


def _when(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


# A Cloud Storage Pub/Sub notification with payload format NONE names the object, nothing more.
NO_PAYLOAD = (
    "size, content type, storage class, times and custom metadata: the Pub/Sub notification "
    "was created with payload format NONE (use JSON_API_V1 to have them)"
)


def render(event: StorageEvent, headline: str) -> Rendered:
    """`headline` says what happened in words: "was uploaded", "was deleted", ..."""
    data = event.data
    bucket, name = data.bucket, data.name
    subject = truncate(subject_safe(f"[gs://{bucket}] {event.type.short}: {name}"), SUBJECT_LIMIT)
    rows: list[tuple[str, str | None]] = [
        ("Object", name),
        ("Bucket", bucket),
        ("Event", f"{event.type.short} ({event.type.value})"),
        ("Event ID", event.id),
        ("Event time", _when(event.time)),
        ("Size", human_size(data.size) if data.size is not None else None),
        ("Content type", data.content_type),
        ("Generation", _generation(event)),
        ("Storage class", data.storage_class),
        ("Created", _when(data.time_created)),
        ("Updated", _when(data.updated)),
        ("Deleted", _when(data.time_deleted)),
    ]
    rows += [(f"Metadata: {key}", value) for key, value in sorted((data.metadata or {}).items())]
    if event.extensions.get("payloadformat") == "NONE":
        rows.append(("Not known", NO_PAYLOAD))
    # Made visible once, labels too (a metadata key is user data), then used by both parts.
    shown = [(visible(label), visible(value)) for label, value in rows if value is not None]
    link = console_url(bucket, name)
    intro = visible(f"gs://{bucket}/{name} {headline}.")

    width = max(len(label) for label, _ in shown) + 2
    text_lines = [intro, ""]
    text_lines += [f"{label + ':':<{width}}{value}" for label, value in shown]
    text_lines += ["", f"Open in the Cloud Console: {link}", ""]

    cells = "\n".join(
        f'<tr><th align="left">{escape_html(label)}</th><td>{escape_html(value)}</td></tr>'
        for label, value in shown
    )
    body_html = (
        "<!DOCTYPE html>\n<html><body>\n"
        f"<p>{escape_html(intro)}</p>\n<table>\n{cells}\n</table>\n"
        f'<p><a href="{escape_html(link)}">Open in the Cloud Console</a></p>\n'
        "</body></html>\n"
    )
    return Rendered(subject=subject, text="\n".join(text_lines), html=body_html)


def _generation(event: StorageEvent) -> str | None:
    data = event.data
    if data.generation is None:
        return None
    if data.metageneration is None:
        return str(data.generation)
    return f"{data.generation} (metageneration {data.metageneration})"
