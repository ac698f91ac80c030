"""Why rules cannot route now; importable without the rest of app.rules (the app's exception
handlers and /healthz import this at start-up)."""

from __future__ import annotations


class RulesUnavailable(Exception):
    """The rules file is still loading, or cannot be used: events are answered 503."""
