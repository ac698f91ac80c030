"""DigestSummary -> subject, plain text and HTML of one digest email, and the variables a route's
digest templates will see. Pure: no I/O, no settings.

Used by the digest flush, issue 11 (not wired into the service yet). Values taken from events
(bucket and object names, the common prefix) and the route's name get today's treatment
(app.notify.render): the subject loses control and format characters and is cut to SUBJECT_LIMIT,
the text part shows them as visible escapes, the HTML part escapes markup on top, and console
links are URL-encoded.
"""

from __future__ import annotations

from app.digests.window import DigestItem, DigestSummary, iso
from app.events.models import EventType
from app.notify.render import (
    SUBJECT_LIMIT,
    Rendered,
    console_url,
    escape_html,
    human_size,
    subject_safe,
    truncate,
    visible,
)

# The order counts are told in, everywhere: uploads first, as they are most digests.
COUNT_ORDER = (
    EventType.FINALIZED,
    EventType.DELETED,
    EventType.ARCHIVED,
    EventType.METADATA_UPDATED,
)
# More buckets than this in a subject would push the counts out of it; the body names them all.
SUBJECT_BUCKETS = 3


def render_digest(summary: DigestSummary, route: str) -> Rendered:
    """`[gs://acme] 5,000 changes under reports/ (4,990 finalized, 10 deleted)`, and a body with
    the counts, bytes added, time span, common prefix, buckets and the listed objects."""
    return Rendered(
        subject=_subject(summary),
        text=_text(summary, route),
        html=_html(summary, route),
    )


def digest_variables(summary: DigestSummary, route: str) -> dict[str, object]:
    """The summary's values as digest templates see them, before any per-part treatment (the
    event strings are raw here, as in app.rules.templates.variables)."""
    return {
        "count": summary.count,
        "counts": {kind.short: summary.counts.get(kind, 0) for kind in COUNT_ORDER},
        "items": [_item_variables(item) for item in summary.items],
        "more": summary.more,
        "first_time": iso(summary.first_time),
        "last_time": iso(summary.last_time),
        "prefix": summary.prefix,
        "bytes": summary.bytes_added,
        "bytes_human": human_size(summary.bytes_added),
        "route": route,
        "buckets": list(summary.buckets),
    }


def _item_variables(item: DigestItem) -> dict[str, object]:
    return {
        "event": item.event_type.short,
        "bucket": item.bucket,
        "name": item.name,
        "size": item.size,
        "size_human": None if item.size is None else human_size(item.size),
        "content_type": item.content_type,
        "time": iso(item.time),
        "console_url": console_url(item.bucket, item.name),
    }


def _changes(count: int) -> str:
    return "1 change" if count == 1 else f"{count:,} changes"


def _count_parts(summary: DigestSummary) -> list[str]:
    """`4,990 finalized`, `10 deleted`, ...: in COUNT_ORDER, types never seen left out."""
    return [
        f"{summary.counts[kind]:,} {kind.short}"
        for kind in COUNT_ORDER
        if summary.counts.get(kind, 0)
    ]


def _buckets(summary: DigestSummary, limit: int | None = None) -> str:
    """`gs://a, gs://b`; past `limit`, `... and 2 more`; with buckets only counted, `and more`."""
    shown = summary.buckets if limit is None else summary.buckets[:limit]
    text = ", ".join(f"gs://{bucket}" for bucket in shown)
    hidden = len(summary.buckets) - len(shown)
    if summary.other_bucket_events:
        text += " and more"
    elif hidden:
        text += f" and {hidden} more"
    return text


def _subject(summary: DigestSummary) -> str:
    head = _changes(summary.count)
    if summary.buckets:
        head = f"[{_buckets(summary, SUBJECT_BUCKETS)}] {head}"
    if summary.prefix:
        head += f" under {summary.prefix}"
    parts = _count_parts(summary)
    # The counts are the news: a long prefix or bucket list is cut, never them.
    tail = f" ({', '.join(parts)})" if parts else ""
    return truncate(subject_safe(head), SUBJECT_LIMIT - len(tail)) + tail


def _intro(summary: DigestSummary) -> str:
    if summary.count == 0:
        return "No changes."
    where = f" in {_buckets(summary)}" if summary.buckets else ""
    under = f" under {summary.prefix}" if summary.prefix else ""
    return f"{_changes(summary.count)}{where}{under}."


def _span(summary: DigestSummary) -> str:
    first, last = iso(summary.first_time), iso(summary.last_time)
    if first is None or last is None:
        return "unknown"
    return first if first == last else f"{first} to {last}"


def _facts(summary: DigestSummary, route: str) -> list[tuple[str, str]]:
    """(label, value) rows shared by both parts, values already made visible."""
    rows = [("Changes", f"{summary.count:,}")]
    rows += [(f"  {kind.short}", f"{summary.counts[kind]:,}") for kind in _seen(summary)]
    rows += [
        ("Bytes added", human_size(summary.bytes_added)),
        ("Time span (UTC)", _span(summary)),
        ("Common prefix", visible(summary.prefix) if summary.prefix else "(none)"),
        ("Buckets", visible(_buckets(summary)) if summary.buckets else "(none)"),
    ]
    if summary.other_bucket_events:
        rows.append(("Other buckets", f"{summary.other_bucket_events:,} changes"))
    rows.append(("Route", visible(route)))
    return rows


def _seen(summary: DigestSummary) -> list[EventType]:
    return [kind for kind in COUNT_ORDER if summary.counts.get(kind, 0)]


def _listing_title(summary: DigestSummary) -> str:
    if summary.more:
        return f"The first {len(summary.items):,} of {summary.count:,} objects:"
    return "Objects:"


def _more(summary: DigestSummary) -> str:
    return f"and {summary.more:,} more"


def _object(item: DigestItem) -> str:
    return visible(f"gs://{item.bucket}/{item.name}")


def _details(item: DigestItem) -> list[str]:
    size = None if item.size is None else human_size(item.size)
    return [value for value in (size, iso(item.time)) if value is not None]


def _text(summary: DigestSummary, route: str) -> str:
    facts = _facts(summary, route)
    width = max(len(label) for label, _ in facts) + 2
    lines = [visible(_intro(summary)), ""]
    lines += [f"{label + ':':<{width}}{value}" for label, value in facts]
    if summary.items:
        lines += ["", _listing_title(summary)]
        lines += [
            ", ".join([f"- {item.event_type.short} {_object(item)}", *_details(item)])
            for item in summary.items
        ]
        if summary.more:
            lines.append(_more(summary))
    lines.append("")
    return "\n".join(lines)


def _html(summary: DigestSummary, route: str) -> str:
    facts = "\n".join(
        f'<tr><th align="left">{escape_html(label.strip())}</th><td>{escape_html(value)}</td></tr>'
        for label, value in _facts(summary, route)
    )
    parts = [
        "<!DOCTYPE html>\n<html><body>\n",
        f"<p>{escape_html(visible(_intro(summary)))}</p>\n",
        f"<table>\n{facts}\n</table>\n",
    ]
    if summary.items:
        rows = "\n".join(_html_row(item) for item in summary.items)
        parts += [
            f"<p>{escape_html(_listing_title(summary))}</p>\n",
            '<table>\n<tr><th align="left">Event</th><th align="left">Object</th>'
            '<th align="left">Size</th><th align="left">Time (UTC)</th></tr>\n',
            f"{rows}\n</table>\n",
        ]
        if summary.more:
            parts.append(f"<p>{_more(summary)}</p>\n")
    parts.append("</body></html>\n")
    return "".join(parts)


def _html_row(item: DigestItem) -> str:
    link = escape_html(console_url(item.bucket, item.name))
    size = "" if item.size is None else escape_html(human_size(item.size))
    return (
        f"<tr><td>{item.event_type.short}</td>"
        f'<td><a href="{link}">{escape_html(_object(item))}</a></td>'
        f"<td>{size}</td><td>{iso(item.time) or ''}</td></tr>"
    )
