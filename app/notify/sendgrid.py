"""SendGrid v3 Mail Send: the body built with the `sendgrid` package, sent with app.http.

The `sendgrid` client itself is synchronous urllib with no timeout and a new connection per call,
so it would either block the event loop or need a thread per in-flight email. Its `Mail` helpers
still build the documented request body; the keep-alive client in app/http.py sends it.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr
from sendgrid.helpers.mail import (
    Content,
    From,
    Mail,
    MailSettings,
    Personalization,
    SandBoxMode,
    Subject,
    To,
)

from app.http import HttpClient, HttpError
from app.notify.base import (
    ConfigurationError,
    Notification,
    Receipt,
    RejectedDeliveryError,
    TransientDeliveryError,
)

log = logging.getLogger(__name__)

# https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send: at most 1,000
# personalizations and 1,000 recipients per request.
MAX_RECIPIENTS = 1000
SEND_PATH = "/v3/mail/send"
RETRY_AFTER_BOUNDS = (1.0, 600.0)  # Eventarc's own backoff runs from 10 s to 600 s


@functools.lru_cache(maxsize=64)
def _addressing(sender: str, recipients: tuple[str, ...]) -> tuple[Any, list[Any]]:
    """`from` and one personalization per recipient (nobody sees the rest of the list), built
    with the package's helpers once per recipient list: they parse every address again on each
    call, and the list is the same for every event."""
    mail = Mail(from_email=From(sender))
    for recipient in reversed(recipients):  # add_personalization() prepends
        personalization = Personalization()
        personalization.add_to(To(recipient))
        mail.add_personalization(personalization)
    body = mail.get()
    return body["from"], body["personalizations"]


def build_body(notification: Notification, *, sandbox: bool) -> dict[str, Any]:
    """The v3 mail/send body; every part comes from the `sendgrid` package's helpers."""
    sender, personalizations = _addressing(notification.sender, notification.recipients)
    body: dict[str, Any] = {
        "from": sender,
        "subject": Subject(notification.subject).get(),
        "personalizations": personalizations,
        # SendGrid requires text/plain before text/html.
        "content": [
            Content("text/plain", notification.text).get(),
            Content("text/html", notification.html).get(),
        ],
    }
    if sandbox:
        settings = MailSettings()
        settings.sandbox_mode = SandBoxMode(True)
        body["mail_settings"] = settings.get()
    return body


def _error_messages(payload: bytes) -> list[str] | None:
    """SendGrid's error body is `{"errors": [{"message", "field", "help"}]}`; None if it is not."""
    try:
        errors = json.loads(payload)["errors"]
        return [
            f"{error.get('field')}: {error.get('message')}"
            if error.get("field")
            else str(error.get("message"))
            for error in errors
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _retry_after(headers: Mapping[str, str], now: float) -> float | None:
    try:
        seconds = float(headers.get("x-ratelimit-reset", "")) - now
    except (TypeError, ValueError):
        return None
    low, high = RETRY_AFTER_BOUNDS
    return min(max(seconds, low), high)


class SendGridNotifier:
    name = "sendgrid"
    max_recipients: int | None = MAX_RECIPIENTS

    def __init__(
        self, *, api_key: SecretStr, host: str, timeout: float, sandbox: bool = False
    ) -> None:
        self._sandbox = sandbox
        # The key goes into the client's fixed headers and nowhere else: never logged or shown.
        self._http = HttpClient(
            host,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key.get_secret_value()}"},
        )

    async def send(self, notification: Notification) -> Receipt:
        payload = json.dumps(build_body(notification, sandbox=self._sandbox)).encode()
        try:
            response = await self._http.post(SEND_PATH, payload, "application/json")
        except HttpError as error:
            if error.timed_out:
                raise TransientDeliveryError("SendGrid did not answer in time") from error
            raise TransientDeliveryError(f"SendGrid unreachable: {error}") from error
        if response.status in (200, 202):  # 200 is sandbox mode: validated, not delivered
            return Receipt(
                notifier=self.name,
                message_id=response.headers.get("x-message-id"),
                sandbox=response.status == 200,
            )
        raise self._failure(response.status, response.headers, response.body, notification)

    def _failure(
        self, status: int, headers: Mapping[str, str], payload: bytes, notification: Notification
    ) -> Exception:
        messages = _error_messages(payload)
        fields = {
            **notification.context,
            "sendgrid_status": status,
            "sendgrid_errors": messages if messages is not None else "unparsable error body",
        }
        if status in (401, 403):
            log.error(
                "SendGrid refused the API key or the sender: check SENDGRID_API_KEY, its "
                "Mail Send permission and that NOTIFY_FROM is a verified sender",
                extra=fields,
            )
            return ConfigurationError(f"SendGrid refused the request ({status})")
        if status in (400, 413):
            log.error("SendGrid rejected the message", extra=fields)
            detail = "; ".join(messages or [])[:500]
            return RejectedDeliveryError(f"SendGrid rejected the message ({status}): {detail}")
        log.warning("SendGrid failed, the event will be retried", extra=fields)
        retry_after = _retry_after(headers, time.time()) if status == 429 else None
        return TransientDeliveryError(f"SendGrid answered {status}", retry_after=retry_after)

    async def aclose(self) -> None:
        await self._http.aclose()
