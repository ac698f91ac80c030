"""A route's own subject, text and HTML: Jinja2 templates run in its sandbox. Pure: no I/O.

Templates come from the rules file (the operator writes them); their variables come from the event
(attacker-controlled where events are not authenticated). So each variable reaches each part in the
form that part can carry safely, as `app.notify.render` does for today's email:
- subject: the raw values, and the rendered subject is sanitised as today's is (control and format
  characters become spaces, whitespace folds, at most SUBJECT_LIMIT characters);
- text: string values (bucket, name, content_type, event_id, metadata keys and values) with control
  and format characters shown as escapes (`visible`), so a name cannot forge a paragraph or reorder
  what the reader sees;
- HTML: the same visible values, autoescaped by Jinja2 (`|safe` opts a value out: never use it on
  event data).
A part that renders blank is today's part (an email needs a subject; a blank body tells nothing).

Undefined variables are errors (StrictUndefined); a missing value (no size, no content type) is
None, which prints as nothing. Block tags take their line with them (trim_blocks, lstrip_blocks),
so a `{% for %}` line in a text template leaves no blank line.

Every template is checked when the rules file loads: syntax, variable names, and a render against
`sample_event()`. A template that still fails on a real event (a metadata key the object lacks)
gives way to that part of today's email, with a WARNING, so the change is still told.

A digest route's templates (`compile_digest_templates`) render one window, not one event: their
variables are `app.digests.render.digest_variables` (DIGEST_VARIABLES: count, counts, items,
more, first_time, last_time, prefix, bytes, ...), with the same sandbox, the same per-part
treatment (the common prefix, bucket names and each item's bucket, name and content type are the
event strings there) and the same checks, against `sample_digest()`: a window of five changes of
two types, three of them listed.

Jinja2 costs ~30 ms to import, so it is imported only when a template is compiled: a rules file
without templates does not load it; nor is app.digests.render, until a digest template is.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from app.events.models import EventType, StorageEvent, StorageObjectData
from app.notify.render import (
    SUBJECT_LIMIT,
    VERBS,
    Rendered,
    console_url,
    escape_html,
    human_size,
    subject_safe,
    truncate,
    visible,
)

if TYPE_CHECKING:
    from jinja2 import Template
    from jinja2.sandbox import SandboxedEnvironment

    from app.digests.window import DigestSummary

log = logging.getLogger(__name__)

VARIABLES = frozenset(
    {
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
    }
)
# The keys of app.digests.render.digest_variables (a test holds them equal), and of each item.
DIGEST_VARIABLES = frozenset(
    {
        "count",
        "counts",
        "items",
        "more",
        "first_time",
        "last_time",
        "prefix",
        "bytes",
        "bytes_human",
        "route",
        "buckets",
    }
)
DIGEST_ITEM_KEYS = (
    "event",
    "bucket",
    "name",
    "size",
    "size_human",
    "content_type",
    "time",
    "console_url",
)
# Values taken from the event as sent: shown with `visible` in the text and HTML parts.
_EVENT_STRINGS = ("bucket", "name", "content_type", "event_id")
_ITEM_STRINGS = ("bucket", "name", "content_type")
_TEMPLATE_FILE = "<template>"  # the file name Jinja2 gives a template made from a string
_NO_FILTER = re.compile(r"No filter named '([^']*)'")
_NO_KEY = re.compile(r"'dict object' has no attribute '([^']*)'")


class TemplateProblem(ValueError):
    """One problem in one template. `line` is the line within the template (1-based), when known;
    the message already names it ("line 2 of the template: ...")."""

    def __init__(self, field: str, message: str, line: int | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.line = line


def variables(event: StorageEvent, route: str) -> dict[str, object]:
    """The event's values as the templates see them, before any per-part treatment."""
    data = event.data
    return {
        "event": event.type.short,
        "verb": VERBS[event.type],
        "bucket": data.bucket,
        "name": data.name,
        "size": data.size,
        "size_human": None if data.size is None else human_size(data.size),
        "content_type": data.content_type,
        "generation": data.generation,
        "metageneration": data.metageneration,
        "time": _utc(event.time),
        "event_id": event.id,
        "metadata": dict(data.metadata or {}),
        "console_url": console_url(data.bucket, data.name),
        "route": route,
    }


def _utc(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # CloudEvents times are RFC 3339 with an offset; naive means UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _visible(values: Mapping[str, object], keys: Sequence[str]) -> dict[str, object]:
    """A copy of `values` with the strings under `keys` shown with `visible`."""
    shown = dict(values)
    for key in keys:
        value = values[key]
        if isinstance(value, str):
            shown[key] = visible(value)
    return shown


def _shown(values: dict[str, object]) -> dict[str, object]:
    """The values for the text and HTML parts: event strings with control and format characters
    shown as escapes (the HTML part autoescapes on top)."""
    shown = _visible(values, _EVENT_STRINGS)
    metadata = values["metadata"]
    if isinstance(metadata, dict) and metadata:
        shown["metadata"] = {visible(key): visible(value) for key, value in metadata.items()}
    return shown


def sample_event(metadata: Mapping[str, str] | None = None) -> StorageEvent:
    """A realistic upload, rendered by every template when the rules file loads. `metadata`
    replaces its custom metadata, e.g. with the keys a route's `match.metadata` guarantees."""
    if metadata is None:
        return _default_sample()
    return _sample({**metadata})


@functools.cache
def _default_sample() -> StorageEvent:
    return _sample({"uploaded-by": "report-job"})


def _sample(metadata: dict[str, str]) -> StorageEvent:
    bucket, name, generation = "acme-reports", "reports/2024/q3.csv", 1727775000123456
    return StorageEvent(
        id="sample-event-1",
        source=f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        type=EventType.FINALIZED,
        time=datetime(2024, 10, 1, 9, 30, 0, 123000, tzinfo=UTC),
        data=StorageObjectData(
            bucket=bucket,
            name=name,
            generation=generation,
            metageneration=1,
            size=52431,
            content_type="text/csv",
            storage_class="STANDARD",
            time_created=datetime(2024, 10, 1, 9, 30, 0, 120000, tzinfo=UTC),
            updated=datetime(2024, 10, 1, 9, 30, 0, 120000, tzinfo=UTC),
            metadata=metadata,
        ),
    )


def _digest_shown(values: dict[str, object]) -> dict[str, object]:
    """`_shown` for a window: the prefix, bucket names and each item's event strings."""
    shown = _visible(values, ("prefix",))
    buckets, items = values["buckets"], values["items"]
    if isinstance(buckets, list):
        shown["buckets"] = [visible(bucket) for bucket in buckets]
    if isinstance(items, list):
        shown["items"] = [_visible(item, _ITEM_STRINGS) for item in items]
    return shown


def sample_digest() -> DigestSummary:
    """A realistic window, rendered by every digest template when the rules file loads: five
    changes under reports/2024/ (four uploads, one deletion), the first three listed. A new one
    each time: a template may change what it is given."""
    from app.digests.window import DigestItem, DigestSummary

    summary = DigestSummary.empty(max_items=3)
    changes = [(EventType.FINALIZED, f"q{quarter}.csv", 52431 * quarter) for quarter in (1, 2, 3)]
    changes += [(EventType.DELETED, "q3-draft.csv", 40960), (EventType.FINALIZED, "q4.csv", 61440)]
    for second, (kind, name, size) in enumerate(changes):
        summary.add(
            DigestItem(
                change_key=f"sample-{second}",
                event_type=kind,
                bucket="acme-reports",
                name=f"reports/2024/{name}",
                size=size,
                time=datetime(2024, 10, 1, 9, 30, second * 7, tzinfo=UTC),
                content_type="text/csv",
            )
        )
    return summary


@dataclass(frozen=True)
class _Parts:
    """A route's compiled subject, text and html templates; None where it has none."""

    subject: Template | None = None
    text: Template | None = None
    html: Template | None = None

    @property
    def empty(self) -> bool:
        return self.subject is None and self.text is None and self.html is None

    def _render(
        self,
        values: dict[str, object],
        shown: dict[str, object],
        route: str,
        default: Rendered,
        context: Mapping[str, object],
        hint: Callable[[str], str] | None = None,
    ) -> Rendered:
        # A part that renders blank (or fails on these values) is the default part: an email
        # needs a subject, and a blank body tells nobody anything.
        subject = default.subject
        if self.subject is not None:
            rendered = _render_part(self.subject, values, "subject", route, context, hint)
            subject = truncate(subject_safe(rendered), SUBJECT_LIMIT) or default.subject
        text = default.text
        if self.text is not None:
            text = _render_part(self.text, shown, "text", route, context, hint)
            text = text if text.strip() else default.text
        html = default.html
        if self.html is not None:
            html = _render_part(self.html, shown, "html", route, context, hint)
            html = html if html.strip() else default.html
        return Rendered(subject=subject, text=text, html=html)


@dataclass(frozen=True)
class RouteTemplates(_Parts):
    def render(self, event: StorageEvent, route: str, default: Rendered) -> Rendered:
        """Each part from its template, or from `default` (today's email for this event)."""
        if self.empty:
            return default
        values = variables(event, route)
        shown = values if self.text is None and self.html is None else _shown(values)
        return self._render(values, shown, route, default, event.log_fields())


@dataclass(frozen=True)
class DigestTemplates(_Parts):
    def render(self, summary: DigestSummary, route: str, default: Rendered) -> Rendered:
        """Each part from its template, or from `default` (the digest email for this window)."""
        if self.empty:
            return default
        from app.digests.render import digest_variables

        values = digest_variables(summary, route)
        shown = values if self.text is None and self.html is None else _digest_shown(values)
        context = {"events": summary.count}
        return self._render(values, shown, route, default, context, _digest_key_hint)


def _render_part(
    template: Template,
    values: dict[str, object],
    field: str,
    route: str,
    context: Mapping[str, object],
    hint: Callable[[str], str] | None,
) -> str:
    """The rendered part, or "" when these values break the template (the caller falls back)."""
    try:
        return template.render(values)
    except Exception as error:  # a template can raise anything; the change must still be told
        log.warning(
            "route template failed; that part of the default email is sent instead",
            extra={"route": route, "field": field, "error": _describe(error, hint), **context},
        )
        return ""


def compile_route_templates(
    subject: str | None,
    text: str | None,
    html: str | None,
    *,
    sample: StorageEvent | None = None,
) -> RouteTemplates:
    """Checks and compiles a route's templates, or raises TemplateProblem naming the field: syntax,
    variables outside VARIABLES (with the closest name), then a render of `sample` (default
    `sample_event()`), which catches what only shows when a template runs (`{{ size + "x" }}`,
    attributes the sandbox refuses)."""
    templates = RouteTemplates(
        subject=None if subject is None else _compile("subject", subject, VARIABLES),
        text=None if text is None else _compile("text", text, VARIABLES),
        html=None if html is None else _compile("html", html, VARIABLES),
    )
    values = variables(sample if sample is not None else sample_event(), "sample-route")
    _check_sample(templates, values, _shown(values), "a sample event")
    return templates


def compile_digest_templates(
    subject: str | None, text: str | None, html: str | None
) -> DigestTemplates:
    """A digest route's templates, checked as `compile_route_templates` checks an event route's
    (variables outside DIGEST_VARIABLES are errors), rendering `sample_digest()`; TemplateProblem
    naming the field and the template's line."""
    from app.digests.render import digest_variables

    templates = DigestTemplates(
        subject=None if subject is None else _compile("subject", subject, DIGEST_VARIABLES),
        text=None if text is None else _compile("text", text, DIGEST_VARIABLES),
        html=None if html is None else _compile("html", html, DIGEST_VARIABLES),
    )
    values = digest_variables(sample_digest(), "sample-route")
    _check_sample(templates, values, _digest_shown(values), "a sample window", _digest_key_hint)
    return templates


def _check_sample(
    templates: _Parts,
    values: dict[str, object],
    shown: dict[str, object],
    sample: str,
    hint: Callable[[str], str] | None = None,
) -> None:
    """Renders each part as it will be rendered; TemplateProblem on the first that fails."""
    for field, template, given in (
        ("subject", templates.subject, values),
        ("text", templates.text, shown),
        ("html", templates.html, shown),
    ):
        if template is not None:
            try:
                template.render(given)
            except Exception as error:
                line = _template_line(error)
                raise TemplateProblem(
                    field,
                    _at(line) + f"rendering {sample} failed: " + _describe(error, hint),
                    line,
                ) from None


@functools.lru_cache(maxsize=4096)
def _compile(field: str, source: str, known: frozenset[str]) -> Template:
    """One compiled template per (field, source, variables known): routes sharing a template (a
    YAML anchor) share it, and a rules file is compiled once at start-up."""
    from jinja2 import TemplateSyntaxError, meta, nodes

    environment = _environment(autoescape=field == "html")
    try:
        tree = environment.parse(source)
        unknown = meta.find_undeclared_variables(tree) - known
        if unknown:
            first = min(
                (node.lineno for node in tree.find_all(nodes.Name) if node.name in unknown),
                default=None,
            )
            raise TemplateProblem(field, _at(first) + _unknown_variables(unknown, known), first)
        return environment.from_string(tree)  # the parsed tree: parsing is a third of the cost
    except TemplateSyntaxError as error:
        raise TemplateProblem(
            field, _at(error.lineno) + _syntax_message(error.message), error.lineno
        ) from None


@functools.cache
def _environment(*, autoescape: bool) -> SandboxedEnvironment:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(
        undefined=StrictUndefined,
        autoescape=autoescape,
        finalize=_blank_none,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _blank_none(value: object) -> object:
    """A value the event does not carry (size, content type, time) prints as nothing."""
    return "" if value is None else value


def _unknown_variables(names: set[str], known: frozenset[str]) -> str:
    described = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, known, n=1)
        described.append(f'"{name}" (did you mean "{close[0]}"?)' if close else f'"{name}"')
    noun = "variable" if len(names) == 1 else "variables"
    message = f"unknown {noun} " + ", ".join(described)
    if not any("did you mean" in item for item in described):
        message += " (variables: " + ", ".join(sorted(known)) + ")"
    if known is DIGEST_VARIABLES and names & set(DIGEST_ITEM_KEYS):
        message += (
            "; a digest template tells a window: each object is one of items, as in "
            "{% for item in items %}{{ item.name }}{% endfor %}"
        )
    return message


def _syntax_message(message: str | None) -> str:
    text = (message or "syntax error").strip().rstrip(".")
    unknown_filter = _NO_FILTER.fullmatch(text)
    if unknown_filter:
        filters = _environment(autoescape=False).filters
        close = difflib.get_close_matches(unknown_filter.group(1), filters, n=1)
        text = f'unknown filter "{unknown_filter.group(1)}"'
        if close:
            text += f' (did you mean "{close[0]}"?)'
    return " ".join(text.split())


def _describe(error: Exception, hint: Callable[[str], str] | None = None) -> str:
    """One line for a template error; `hint` says what to do about a missing key (a metadata key
    for event templates, `_digest_key_hint` for digest templates)."""
    from jinja2 import TemplateError

    text = " ".join(str(error).split()).rstrip(".")
    missing_key = _NO_KEY.fullmatch(text)
    if missing_key:
        text += (hint or _metadata_hint)(missing_key.group(1))
    # Jinja2's own errors read well alone; a Python error needs its kind ("TypeError: ...").
    return text if isinstance(error, TemplateError) else f"{type(error).__name__}: {text}"


def _metadata_hint(key: str) -> str:
    return f' (for a metadata key an object may lack, write metadata.get("{key}", ""))'


def _digest_key_hint(key: str) -> str:
    counts = [kind.short for kind in EventType]
    close = difflib.get_close_matches(key, [*DIGEST_ITEM_KEYS, *counts], n=1, cutoff=0.75)
    if close:
        return f' (did you mean "{close[0]}"?)'
    return f" (an item has {', '.join(DIGEST_ITEM_KEYS)}; counts has {', '.join(counts)})"


def _template_line(error: BaseException) -> int | None:
    """Jinja2 rewrites a render's traceback so that frames name the template's lines."""
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(error.__traceback__)
        if frame.filename == _TEMPLATE_FILE
    ]
    return lines[-1] if lines else None


def _at(line: int | None) -> str:
    return "" if line is None else f"line {line} of the template: "


def footer(route: str, reason: str) -> str:
    """'Sent by route finance-reports because it matched: prefix reports/, suffix .csv'"""
    return f"Sent by route {route} because it matched: {reason}"


def with_footer(rendered: Rendered, line: str) -> Rendered:
    """The footer after a blank line in the text part, and as a small grey paragraph before
    </body> in the HTML part (at the end when the template wrote no </body>)."""
    shown = visible(line)
    body = rendered.text.rstrip("\n")
    text = f"{body}\n\n{shown}\n" if body else f"{shown}\n"
    paragraph = f'<p style="color:#666;font-size:small">{escape_html(shown)}</p>\n'
    end = rendered.html.lower().rfind("</body>")
    html = (
        rendered.html + paragraph
        if end < 0
        else rendered.html[:end] + paragraph + rendered.html[end:]
    )
    return replace(rendered, text=text, html=html)
