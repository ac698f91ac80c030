"""The local notifier: each recipient's copy of a notification becomes an RFC 5322 `.eml` file.

It is the default when no SendGrid key is configured and the tests' double, so it mirrors what
SendGrid receives: the SendGrid notifier sends one personalization per recipient, and SendGrid
delivers one message to each, with only that recipient in `To:` (nobody sees the list). Here that
is one file per recipient. Open the files with any mail client, or read them as text, or at
/outbox (app/outbox_view), which `on_written` tells of each new file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from app.config import OUTBOX_SEND_SECONDS
from app.files import write_atomically
from app.notify.base import (
    Notification,
    Receipt,
    TransientDeliveryError,
    UncertainDeliveryError,
)

log = logging.getLogger(__name__)

VARIABLE = "OUTBOX_DIR"  # named in every failure, so the operator knows what to fix
ROUTE_HEADER = "X-Gcs-Notifier-Route"  # the rules' route that sent it, for the outbox view


def build_message(notification: Notification, recipient: str) -> EmailMessage:
    """The copy one recipient gets."""
    message = EmailMessage()
    message["From"] = notification.sender
    message["To"] = recipient
    message["Subject"] = notification.subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = make_msgid(domain="gcs-notifier.local")
    route = notification.context.get("route")
    if route:
        message[ROUTE_HEADER] = route
    message.set_content(notification.text)  # text/plain first: clients show the last part
    message.add_alternative(notification.html, subtype="html")  # they can render
    return message


def file_name(key: str, recipient: str) -> str:
    """`TIME-NOTIFICATION-RECIPIENT.eml`: a notification's copies sort together, and the name
    holds no address (an address may contain any character a file name cannot)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    notification = hashlib.sha256(key.encode()).hexdigest()[:16]
    addressee = hashlib.sha256(recipient.encode()).hexdigest()[:8]
    return f"{stamp}-{notification}-{addressee}.eml"


class OutboxWriteError(Exception):
    """Writing `path` failed; the OSError is the cause."""

    def __init__(self, path: Path, error: OSError) -> None:
        # mkdir(exist_ok=True) on a file says "File exists", which reads like no problem at all.
        self.reason = (
            "not a folder" if isinstance(error, FileExistsError) else error.strerror or str(error)
        )
        super().__init__(f"{path}: {self.reason}")
        self.path = path
        self.error = error


class OutboxNotifier:
    name = "outbox"
    max_recipients: int | None = None
    send_seconds = OUTBOX_SEND_SECONDS  # a few files; a disk that stalls longer: 503

    def __init__(
        self, directory: Path, on_written: Callable[[list[Path]], None] | None = None
    ) -> None:
        """`on_written(paths)` is called in the event loop after each notification's files are
        written (the outbox view's live feed); its failure is logged, never the send's."""
        self.directory = directory
        self.on_written = on_written

    async def send(self, notification: Notification) -> Receipt:
        copies = [
            (recipient, build_message(notification, recipient))
            for recipient in notification.recipients
        ]
        try:
            async with asyncio.timeout(self.send_seconds):
                paths = await asyncio.to_thread(self._write_all, notification.key, copies)
        except TimeoutError:
            # The thread goes on writing: the files may appear after all.
            raise UncertainDeliveryError(
                f"outbox write took over {self.send_seconds:g} s ({VARIABLE}={self.directory})"
            ) from None
        except OutboxWriteError as failed:
            reason = failed.reason
            log.error(
                "outbox write failed",
                extra={
                    **notification.context,
                    "path": str(failed.path),
                    "variable": VARIABLE,
                    "reason": reason,
                    "notifier": self.name,
                },
            )
            # A full or read-only disk may heal; Eventarc will deliver the event again.
            raise TransientDeliveryError(
                f"outbox write failed: {failed.path}: {reason} ({VARIABLE}={self.directory})"
            ) from failed.error
        log.info(
            "notification written to outbox",
            extra={
                **notification.context,
                "path": str(self.directory),
                "copies": len(paths),
                "notifier": self.name,
            },
        )
        if self.on_written is not None:
            try:
                self.on_written(paths)
            except Exception:
                log.exception("outbox listener failed", extra={"notifier": self.name})
        # One id for the receipt, as SendGrid's X-Message-Id names one request: the first copy's.
        first = str(copies[0][1]["Message-ID"]) if copies else None
        return Receipt(notifier=self.name, message_id=first)

    def _write_all(self, key: str, copies: list[tuple[str, EmailMessage]]) -> list[Path]:
        """Every copy, or none: SendGrid accepts a request's personalizations together or not at
        all, so a failed copy removes those already written. The notification then failed as a
        whole (503), and the redelivery writes every copy again, once."""
        written: list[Path] = []
        target = self.directory
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for recipient, message in copies:
                target = self.directory / file_name(key, recipient)
                write_atomically(target, message.as_bytes())
                written.append(target)
        except OSError as error:
            self._remove(written)
            raise OutboxWriteError(target, error) from error
        return written

    def _remove(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                # Left behind, this copy is sent again by the redelivery: say which one.
                log.warning(
                    "outbox copy of a failed notification not removed",
                    extra={"path": str(path), "variable": VARIABLE, "reason": error.strerror},
                )

    async def aclose(self) -> None:
        return None
