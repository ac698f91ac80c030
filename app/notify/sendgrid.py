"""SendGrid v3 Mail Send: the body built with the `sendgrid` package, sent with aiohttp.

The `sendgrid` client itself is synchronous urllib with no timeout and a new connection per call,
so it would either block the event loop or need a thread per in-flight email. Its `Mail` helpers
still build the documented request body; one `aiohttp.ClientSession` (keep-alive connections, a
deadline per request, and header values checked for CR/LF) sends it.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import yarl
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

from app.notify.base import (
    ConfigurationError,
    Notification,
    Receipt,
    RejectedDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
)

log = logging.getLogger(__name__)

# https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send: at most 1,000
# personalizations and 1,000 recipients per request.
MAX_RECIPIENTS = 1000
SEND_PATH = "/v3/mail/send"
RETRY_AFTER_BOUNDS = (1.0, 600.0)  # Eventarc's own backoff runs from 10 s to 600 s
# The members of the request body (mail_send_request.schema.json in twilio/sendgrid-oai) that make
# up the message. A 400 naming one of them (`personalizations.0.to.0.email`, `from.email`,
# `subject`, `content.0.value`) is about this message. `mail_settings` and `tracking_settings` are
# the same for every message (SENDGRID_SANDBOX), so an error there is ours, not the message's.
MESSAGE_FIELDS = frozenset(
    {
        "personalizations",
        "from",
        "reply_to",
        "reply_to_list",
        "subject",
        "content",
        "attachments",
        "template_id",
        "headers",
        "categories",
        "custom_args",
        "send_at",
        "batch_id",
        "asm",
        "ip_pool_name",
    }
)
# What RFC 9110 §5.5 forbids in a field value, plus tab: no API key holds one. A line break would
# end the request head early (the bug of issue 9), so such a key is never sent.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def _errors(payload: bytes) -> list[dict[str, Any]] | None:
    """SendGrid's error body `{"errors": [{"message", "field", "help"}]}`; None if it is not one."""
    try:
        errors = json.loads(payload)["errors"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(errors, list) or not all(isinstance(error, dict) for error in errors):
        return None
    return errors


def _blames_the_message(error: Mapping[str, Any]) -> bool:
    """Whether this error names a field of the message (`personalizations.0.to.0.email`).

    SendGrid names no field (null, or the string "null" in its OpenAPI examples) when the request
    itself is wrong: a body that is not JSON ("Bad Request"), a wrong Content-Type, a bad key."""
    field = error.get("field")
    return isinstance(field, str) and re.split(r"[.\[]", field, maxsplit=1)[0] in MESSAGE_FIELDS


def _describe(error: Mapping[str, Any]) -> str:
    field = error.get("field")
    has_field = isinstance(field, str) and field and field != "null"
    return f"{field}: {error.get('message')}" if has_field else str(error.get("message"))


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
        self._url = yarl.URL(f"{host.rstrip('/')}{SEND_PATH}")  # parsed once, not per send
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.send_seconds = timeout
        # The key goes into the session's headers and nowhere else: never logged or shown.
        self._key = api_key.get_secret_value()
        self._key_unsendable = _CONTROL.search(self._key) is not None
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        """Created on first send, inside the running loop (a session is bound to its loop)."""
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=60),
            headers={
                "Authorization": f"Bearer {self._key}",
                "Content-Type": "application/json",
                # SendGrid's error table lists 406 for a missing Accept. (Headers are set here
                # rather than dropped with skip_auto_headers, which costs a copy per request.)
                "Accept": "application/json",
                "User-Agent": "gcs-notifier",
            },
            cookie_jar=aiohttp.DummyCookieJar(),  # an API answer sets no cookie worth keeping
        )

    async def send(self, notification: Notification) -> Receipt:
        if self._key_unsendable:
            log.error(
                "SENDGRID_API_KEY contains a control character (a trailing newline?): not sent",
                extra=notification.context,
            )
            raise ConfigurationError("SENDGRID_API_KEY contains a control character")
        payload = json.dumps(build_body(notification, sandbox=self._sandbox)).encode()
        if self._session is None:
            self._session = self._open_session()
        try:
            async with self._session.post(
                self._url, data=payload, timeout=self._timeout
            ) as response:
                status, headers, body = response.status, response.headers, await response.read()
        # aiohttp's errors keep the request (`request_info`, headers and key included), so none
        # is chained; their text names the host, never a header. Only a connection that was
        # never made proves the request was not sent; after that (a timeout, a connection that
        # broke) SendGrid may have accepted it, and the claim must stand until its lease ends.
        except aiohttp.ConnectionTimeoutError:
            raise TransientDeliveryError("SendGrid unreachable: no connection in time") from None
        except aiohttp.ClientConnectorError as error:
            raise TransientDeliveryError(f"SendGrid unreachable: {self._reason(error)}") from None
        except TimeoutError:  # asyncio.TimeoutError and aiohttp.ServerTimeoutError alike
            raise UncertainDeliveryError("SendGrid did not answer in time") from None
        except (aiohttp.ClientError, OSError) as error:
            raise UncertainDeliveryError(
                f"SendGrid connection broke: {self._reason(error)}"
            ) from None
        if status in (200, 202):  # 200 is sandbox mode: validated, not delivered
            return Receipt(
                notifier=self.name,
                message_id=headers.get("X-Message-Id"),
                sandbox=status == 200,
            )
        raise self._failure(status, headers, body, notification)

    def _reason(self, error: BaseException) -> str:
        return (str(error) or type(error).__name__).replace(self._key, "[redacted]")

    def _failure(
        self, status: int, headers: Mapping[str, str], payload: bytes, notification: Notification
    ) -> Exception:
        errors = _errors(payload)
        messages = [_describe(error) for error in errors or []]
        fields = {
            **notification.context,
            "sendgrid_status": status,
            "sendgrid_errors": messages if errors is not None else "unparsable error body",
        }
        if status in (401, 403):
            log.error(
                "SendGrid refused the API key or the sender: check SENDGRID_API_KEY, its "
                "Mail Send permission and that NOTIFY_FROM is a verified sender",
                extra=fields,
            )
            return ConfigurationError(f"SendGrid refused the request ({status})")
        detail = "; ".join(messages)[:500] or "unparsable error body"
        # A 400 dead-letters the message only when SendGrid blames the message for every error
        # it lists. One naming no field (a body that is not JSON, a missing Content-Type) means
        # this service framed the request wrongly: it would fail for every event alike, so it is
        # retried and alerted on, not dead-lettered.
        if status == 400 and not (errors and all(map(_blames_the_message, errors))):
            log.error(
                "SendGrid refused the request itself, not this message (a 400 naming no field "
                "of the message): a configuration or code error; the event will be retried",
                extra=fields,
            )
            return ConfigurationError(f"SendGrid refused the request as malformed (400): {detail}")
        if status in (400, 413):
            log.error("SendGrid rejected the message", extra=fields)
            return RejectedDeliveryError(f"SendGrid rejected the message ({status}): {detail}")
        log.warning("SendGrid failed, the event will be retried", extra=fields)
        retry_after = _retry_after(headers, time.time()) if status == 429 else None
        return TransientDeliveryError(f"SendGrid answered {status}", retry_after=retry_after)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
