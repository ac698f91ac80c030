"""Errors of event decoding, importable without loading the CloudEvents SDK."""

from __future__ import annotations


class EventDecodeError(ValueError):
    """The request is not a usable CloudEvent; `problems` say what is wrong, field by field."""

    def __init__(self, detail: str, problems: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.problems = problems or []
