"""The outbox folder as a mailbox: listing, reading and removing the `.eml` files.

A message's id is its file name without `.eml` (`TIME-NOTIFICATION-RECIPIENT`, see
app/notify/outbox.py). An id from a request is only ever compared with the names a listing of the
folder returns: no path is built from it, so `..`, separators and absolute paths name nothing.
Files are parsed with the standard library's `email` package (policy.default); a file that cannot
be read as an email (damaged, cut short, not one of ours) is left out of the list, logged once.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from app.notify.outbox import ROUTE_HEADER

log = logging.getLogger(__name__)

ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}-[0-9a-f]{8}")
SUFFIX = ".eml"
LIST_LIMIT = 500  # newest messages listed; the page says how many more there are
REQUIRED = ("From", "To", "Subject")  # every message the notifier writes has them


@dataclass(frozen=True, slots=True)
class Summary:
    id: str
    time: datetime
    sender: str
    to: str
    subject: str
    route: str
    size: int

    @property
    def iso_time(self) -> str:
        return self.time.strftime("%Y-%m-%dT%H:%M:%SZ")

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "time": self.iso_time,
            "from": self.sender,
            "to": self.to,
            "subject": self.subject,
            "route": self.route,
            "size": self.size,
        }

    def matches(self, query: str) -> bool:
        """The filter box: subject and recipients, ignoring case."""
        folded = query.casefold()
        return folded in self.subject.casefold() or folded in self.to.casefold()


@dataclass(frozen=True, slots=True)
class Message:
    summary: Summary
    headers: list[tuple[str, str]]
    text: str | None
    html: str | None
    raw: str


@dataclass(frozen=True, slots=True)
class Listing:
    summaries: list[Summary]
    total: int  # message files in the folder, listed or not
    limited: bool  # the list stopped at LIST_LIMIT


class Mailbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._reported: set[str] = set()  # damaged files already logged

    def ids(self) -> dict[str, str]:
        """Each message id in the folder with its file's path, newest first: by the time in the
        name (whole seconds), then by when the file was written (several in one second)."""
        found: list[tuple[str, int, str, str]] = []
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    stem = entry.name.removesuffix(SUFFIX)
                    if not (entry.name.endswith(SUFFIX) and ID.fullmatch(stem)):
                        continue
                    try:
                        if not entry.is_file():
                            continue
                        written = entry.stat().st_mtime_ns
                    except FileNotFoundError:  # removed meanwhile
                        continue
                    found.append((stem[:16], written, stem, entry.path))
        except FileNotFoundError:  # nothing written yet
            return {}
        found.sort(reverse=True)
        return {stem: path for _, _, stem, path in found}

    def path(self, message_id: str) -> str | None:
        """The file of `message_id`, if the folder holds one by that name."""
        return self.ids().get(message_id) if ID.fullmatch(message_id) else None

    def listing(self, query: str = "", limit: int = LIST_LIMIT) -> Listing:
        ids = self.ids()
        summaries: list[Summary] = []
        limited = False
        for message_id, path in ids.items():
            summary = self.summary(message_id, path)
            if summary is None or (query and not summary.matches(query)):
                continue
            if len(summaries) == limit:
                limited = True
                break
            summaries.append(summary)
        return Listing(summaries, total=len(ids), limited=limited)

    def summary(self, message_id: str, path: str) -> Summary | None:
        data = self._read(message_id, path)
        if data is None:
            return None
        parsed = self._parse(message_id, data, headers_only=True)
        if parsed is None:
            return None
        try:
            return _summary(message_id, parsed, len(data))
        except ValueError as error:  # a name that is no time, such as month 13
            self._report(message_id, error)
            return None

    def message(self, message_id: str) -> Message | None:
        path = self.path(message_id)
        data = None if path is None else self._read(message_id, path)
        if data is None:
            return None
        parsed = self._parse(message_id, data, headers_only=False)
        if parsed is None:
            return None
        try:
            return Message(
                summary=_summary(message_id, parsed, len(data)),
                headers=[(name, str(value)) for name, value in parsed.items()],
                text=_part(parsed, "plain"),
                html=_part(parsed, "html"),
                raw=data.decode("utf-8", errors="replace"),
            )
        except (ValueError, LookupError) as error:  # a bad time, a body in an unknown charset
            self._report(message_id, error)
            return None

    def raw(self, message_id: str) -> bytes | None:
        path = self.path(message_id)
        return None if path is None else self._read(message_id, path)

    def delete(self, message_id: str) -> bool:
        path = self.path(message_id)
        return path is not None and _unlink(path)

    def delete_all(self) -> list[str]:
        """Removes every message file listed now (one written meanwhile stays)."""
        return [message_id for message_id, path in self.ids().items() if _unlink(path)]

    def _read(self, message_id: str, path: str) -> bytes | None:
        try:
            with open(path, "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            self._report(message_id, error)
            return None

    def _parse(self, message_id: str, data: bytes, *, headers_only: bool) -> EmailMessage | None:
        try:
            parsed = BytesParser(policy=policy.default).parsebytes(data, headersonly=headers_only)
            missing = [name for name in REQUIRED if parsed[name] is None]
        except Exception as error:  # the parser and header classes raise many kinds
            self._report(message_id, error)
            return None
        if missing or not isinstance(parsed, EmailMessage):
            self._report(message_id, ValueError(f"no {', '.join(missing)} header"))
            return None
        return parsed

    def _report(self, message_id: str, error: Exception) -> None:
        if message_id not in self._reported:
            self._reported.add(message_id)
            log.warning(
                "outbox file cannot be read as an email; left out of the list",
                extra={"path": str(self.directory / f"{message_id}{SUFFIX}"), "reason": str(error)},
            )


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:  # removed meanwhile
        return False
    return True


def _summary(message_id: str, parsed: EmailMessage, size: int) -> Summary:
    return Summary(
        id=message_id,
        time=datetime.strptime(message_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC),
        sender=str(parsed["From"]),
        to=str(parsed["To"]),
        subject=str(parsed["Subject"]),
        route=str(parsed[ROUTE_HEADER] or ""),
        size=size,
    )


def _part(parsed: EmailMessage, subtype: str) -> str | None:
    part = parsed.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_type() != f"text/{subtype}":
        return None
    content = part.get_content()
    return content if isinstance(content, str) else None
