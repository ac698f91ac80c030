"""The /outbox pages: Jinja2 templates (autoescaped) and the one script and stylesheet.

Imported on the first request for a page, not at start-up (the service's cold start is
measured, and Jinja2 belongs to the event path's imports)."""

from __future__ import annotations

import functools
import re
from html import escape
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

HERE = Path(__file__).parent
STATIC = {  # the only files /outbox/static serves: no path is built from the request
    "outbox.js": "text/javascript; charset=utf-8",
    "outbox.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",  # else the browser asks for /favicon.ico, a 404
}
_DOCTYPE = re.compile(r"\A\s*<!doctype[^>]*>", re.IGNORECASE)
BASE = '<base target="_blank">'


@functools.cache
def _environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **values: object) -> str:
    return _environment().get_template(template).render(**values)


@functools.cache
def static_file(name: str) -> bytes:
    return (HERE / "static" / name).read_bytes()


def framed_html(html: str | None, text: str | None) -> str:
    """The email's HTML part for its sandboxed frame, links opening in a new tab. The first
    `<base>` of a document sets the links' target, so ours goes before anything of the email's
    (after a doctype, which must come first). An email without an HTML part shows its text."""
    if html is None:
        return f"{BASE}<pre>{escape(text or '')}</pre>"
    doctype = _DOCTYPE.match(html)
    if doctype is None:
        return BASE + html
    return html[: doctype.end()] + BASE + html[doctype.end() :]
