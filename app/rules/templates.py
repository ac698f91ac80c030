"""A route's own subject, text and HTML: Jinja2 templates run in its sandbox. Pure: no I/O.

Templates come from the rules file (the operator writes them); their variables come from the event
(attacker-controlled where events are not authenticated). So each variable reaches each part in the
form that part can carry safely, as `app.notify.render` does for today's email:
- subject: the raw values, and the rendered subject is sanitised as today's is (control and bidi
  characters become spaces, whitespace folds, at most SUBJECT_LIMIT characters);
- text: string values (bucket, name, content_type, event_id, metadata keys and values) with control
  and bidi characters shown as escapes (`visible`), so a name cannot forge a paragraph or reorder
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

Jinja2 costs ~30 ms to import, so it is imported only when a template is compiled: a rules file
without templates does not load it.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
import traceback
from collections.abc import Mapping
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
# Values taken from the event as sent: shown with `visible` in the text and HTML parts.
_EVENT_STRINGS = ("bucket", "name", "content_type", "event_id")
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


def _shown(values: dict[str, object]) -> dict[str, object]:
    """The values for the text and HTML parts: event strings with control and bidi characters
    shown as escapes (the HTML part autoescapes on top)."""
    shown = dict(values)
    for key in _EVENT_STRINGS:
        value = values[key]
        if isinstance(value, str):
            shown[key] = visible(value)
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


@dataclass(frozen=True)
class RouteTemplates:
    subject: Template | None = None
    text: Template | None = None
    html: Template | None = None

    def render(self, event: StorageEvent, route: str, default: Rendered) -> Rendered:
        """Each part from its template, or from `default` (today's email for this event)."""
        if self.subject is None and self.text is None and self.html is None:
            return default
        values = variables(event, route)
        shown = values if self.text is None and self.html is None else _shown(values)
        # A part that renders blank (or fails on this event) is today's part: an email needs a
        # subject, and a blank body tells nobody anything.
        subject = default.subject
        if self.subject is not None:
            rendered = _render_part(self.subject, values, "subject", route, event)
            subject = truncate(subject_safe(rendered), SUBJECT_LIMIT) or default.subject
        text = default.text
        if self.text is not None:
            text = _render_part(self.text, shown, "text", route, event)
            text = text if text.strip() else default.text
        html = default.html
        if self.html is not None:
            html = _render_part(self.html, shown, "html", route, event)
            html = html if html.strip() else default.html
        return Rendered(subject=subject, text=text, html=html)


def _render_part(
    template: Template, values: dict[str, object], field: str, route: str, event: StorageEvent
) -> str:
    """The rendered part, or "" when this event breaks the template (the caller falls back)."""
    try:
        return template.render(values)
    except Exception as error:  # a template can raise anything; the change must still be told
        log.warning(
            "route template failed on this event; that part of the default email is sent instead",
            extra={
                "route": route,
                "field": field,
                "error": _describe(error),
                **event.log_fields(),
            },
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
        subject=None if subject is None else _compile("subject", subject),
        text=None if text is None else _compile("text", text),
        html=None if html is None else _compile("html", html),
    )
    values = variables(sample if sample is not None else sample_event(), "sample-route")
    shown = _shown(values)
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
                    _at(line) + "rendering a sample event failed: " + _describe(error),
                    line,
                ) from None
    return templates


@functools.lru_cache(maxsize=4096)
def _compile(field: str, source: str) -> Template:
    """One compiled template per (field, source): routes sharing a template (a YAML anchor) share
    it, and a rules file is compiled once at start-up."""
    from jinja2 import TemplateSyntaxError, meta, nodes

    environment = _environment(autoescape=field == "html")
    try:
        tree = environment.parse(source)
        unknown = meta.find_undeclared_variables(tree) - VARIABLES
        if unknown:
            first = min(
                (node.lineno for node in tree.find_all(nodes.Name) if node.name in unknown),
                default=None,
            )
            raise TemplateProblem(field, _at(first) + _unknown_variables(unknown), first)
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


def _unknown_variables(names: set[str]) -> str:
    described = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, VARIABLES, n=1)
        described.append(f'"{name}" (did you mean "{close[0]}"?)' if close else f'"{name}"')
    noun = "variable" if len(names) == 1 else "variables"
    message = f"unknown {noun} " + ", ".join(described)
    if not any("did you mean" in item for item in described):
        message += " (variables: " + ", ".join(sorted(VARIABLES)) + ")"
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


def _describe(error: Exception) -> str:
    from jinja2 import TemplateError

    text = " ".join(str(error).split()).rstrip(".")
    missing_key = _NO_KEY.fullmatch(text)
    if missing_key:
        key = missing_key.group(1)
        text += f' (for a metadata key an object may lack, write metadata.get("{key}", ""))'
    # Jinja2's own errors read well alone; a Python error needs its kind ("TypeError: ...").
    return text if isinstance(error, TemplateError) else f"{type(error).__name__}: {text}"


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
