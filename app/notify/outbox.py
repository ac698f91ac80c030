"""The local notifier: each notification becomes an RFC 5322 `.eml` file in a folder.

It is the default when no SendGrid key is configured and the tests' double: open the files with
any mail client, or read them as text.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from app.notify.base import Notification, Receipt, TransientDeliveryError

log = logging.getLogger(__name__)


def build_message(notification: Notification) -> EmailMessage:
    message = EmailMessage()
    message["From"] = notification.sender
    message["To"] = ", ".join(notification.recipients)
    message["Subject"] = notification.subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = make_msgid(domain="gcs-notifier.local")
    message.set_content(notification.text)  # text/plain first: clients show the last part
    message.add_alternative(notification.html, subtype="html")  # they can render
    return message


class OutboxNotifier:
    name = "outbox"
    max_recipients: int | None = None

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, notification: Notification) -> Receipt:
        message = build_message(notification)
        try:
            path = await asyncio.to_thread(self._write, notification.key, message.as_bytes())
        except OSError as error:
            # A full or read-only disk may heal; Eventarc will deliver the event again.
            raise TransientDeliveryError(f"outbox write failed: {error.strerror}") from error
        log.info(
            "notification written to outbox",
            extra={**notification.context, "path": str(path), "notifier": self.name},
        )
        return Receipt(notifier=self.name, message_id=str(message["Message-ID"]))

    def _write(self, key: str, payload: bytes) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        final = self.directory / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{digest}.eml"
        # Write then rename: a reader never sees half a message (rename is atomic on POSIX).
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(payload)
            os.replace(temporary, final)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return final

    async def aclose(self) -> None:
        return None
