"""A strict fake of SendGrid's v3 Mail Send API (`POST /v3/mail/send`) for tests and benchmarks.

It answers the way the documented API does, so the notifier is tested against something that
refuses what SendGrid refuses:

- https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send (request body, limits)
- https://www.twilio.com/docs/sendgrid/api-reference/mail-send/errors (error messages and fields)
- https://www.twilio.com/docs/sendgrid/for-developers/sending-email/sandbox-mode (200, not sent)
- https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/rate-limits

Two ways to run it:

- in-process, for pytest: `with FakeSendGrid() as fake: ...` serves on 127.0.0.1 from its own event
  loop in a background thread, and records every request for the test to inspect;
- as a process, for benchmarks: `python -m tests.fakes.sendgrid --port 8125 --latency-ms 100`
  prints its URL on one line when ready and serves until SIGTERM/SIGINT. `GET /__fake/stats`,
  `POST /__fake/reset`, `POST /__fake/script` and `POST /__fake/config` drive it from outside.

The API key is compared and then forgotten: records keep every header except `Authorization`, and
only whether the key matched.

For fault injection, a `chooser` (e.g. a seeded `Chaos`) may decide each mail send request's fate
(latency, 202, 5xx, 429, or no answer at all), and every record carries when it was received and
answered, so a test can tell which sends were accepted and when.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import enum
import hmac
import json
import os
import random
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from aiohttp import web

MAIL_SEND_PATH = "/v3/mail/send"
CONTROL_PREFIX = "/__fake/"

# The docs cap a message (body, headers and attachments) at 30 MB; read here as MiB.
MAX_BODY_BYTES = 30 * 1024 * 1024
MAX_PERSONALIZATIONS = 1000
MAX_RECIPIENTS = 1000  # to + cc + bcc, over all personalizations of one request
MAX_CATEGORIES = 10
MAX_CATEGORY_LENGTH = 255
MAX_GROUPS_TO_DISPLAY = 25
MAX_ARGS_BYTES = 10_000  # custom_args and substitutions: "may not exceed 10,000 bytes"
MAX_SEND_AT_AHEAD = 72 * 3600  # "A send cannot be scheduled more than 72 hours in advance."
# The schema's description of `headers`: "You may not override the following headers".
RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)
MAIL_SETTINGS = {
    "bypass_list_management": (),
    "bypass_spam_management": (),
    "bypass_bounce_management": (),
    "bypass_unsubscribe_management": (),
    "footer": ("text", "html"),
    "sandbox_mode": (),
}
TRACKING_SETTINGS = {
    "click_tracking": (),
    "open_tracking": ("substitution_tag",),
    "subscription_tracking": ("text", "html", "substitution_tag"),
    "ganalytics": ("utm_source", "utm_medium", "utm_term", "utm_content", "utm_campaign"),
}
BOOLEAN_SETTING_FLAGS = ("enable", "enable_text")

# The live API links each 400 to this page, anchored on the field.
ERRORS_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
# Both texts are what the live API answers (the first is also in the OpenAPI spec's 401 example).
MISSING_AUTH = "authorization required"
BAD_AUTH = "The provided authorization grant is invalid, expired, or revoked"
DEFAULT_MESSAGES = {
    400: "Bad Request",
    401: BAD_AUTH,
    403: (
        "The from address does not match a verified Sender Identity. Mail cannot be sent until "
        "this error is resolved. Visit "
        "https://sendgrid.com/docs/for-developers/sending-email/sender-identity/ "
        "to see the Sender Identity requirements"
    ),
    404: "not found",
    405: "method not allowed",
    413: "content too large",
    429: "too many requests",
    500: "internal server error",
    503: "service unavailable",
}
BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>{status} Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>{status} Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
# Only the value reported in X-RateLimit-Limit of a scripted 429; nothing is counted.
DEFAULT_RATE_LIMIT = 600
# A key shaped like SendGrid's ("SG.<22 chars>.<43 chars>"), for the CLI when none is given.
DEFAULT_CLI_API_KEY = "SG.fake-sendgrid-key00.local-benchmarks-only-never-a-real-key-000"

# Deliberately loose: SendGrid rejects addresses that do not look like local@domain.tld; it does
# not implement all of RFC 5322, and neither do we.
_EMAIL = re.compile(r"^[^\s@<>()\[\],;:\"\\]+@(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_]{2,}$")
_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _field(*parts: str | int) -> str:
    """A field path the way SendGrid names it in errors: `personalizations.0.to.1.email`."""
    return ".".join(map(str, parts))


@dataclasses.dataclass(frozen=True, slots=True)
class ApiError:
    """One entry of SendGrid's error body `{"errors": [{"message", "field", "help"}]}`."""

    message: str
    field: str | None = None

    @property
    def help(self) -> str | None:
        if self.field is None:
            return None
        return f"{ERRORS_HELP}#message.{_INDEX.sub('', self.field)}"

    def as_json(self) -> dict[str, str | None]:
        return {"message": self.message, "field": self.field, "help": self.help}


def error_body(*errors: ApiError) -> bytes:
    return json.dumps({"errors": [error.as_json() for error in errors]}).encode()


# --------------------------------------------------------------------------------------------
# Request body validation: the documented schema (mail_send_request.schema.json in
# twilio/sendgrid-oai) checked by hand, plus the rules its descriptions and the docs state in
# prose (recipient limits, unique addresses, content order, subject/content requirements).
# The schema sets no `additionalProperties: false`, so unknown keys are accepted, as SendGrid does.
# --------------------------------------------------------------------------------------------


class _MailValidator:
    """Collects every violation, like the live API, which lists them all in one 400."""

    def __init__(self, now: float) -> None:
        self.errors: list[ApiError] = []
        self._now = now

    def fail(self, field: str | None, message: str) -> None:
        self.errors.append(ApiError(message, field))

    # ---- JSON types ------------------------------------------------------------------------

    def mapping(self, value: object, field: str) -> dict[str, object] | None:
        if isinstance(value, dict):
            return value
        self.fail(field, f"The {field} field must be an object.")
        return None

    def array(self, value: object, field: str, *, max_items: int | None = None) -> list[object]:
        if not isinstance(value, list):
            self.fail(field, f"The {field} field must be an array.")
            return []
        if max_items is not None and len(value) > max_items:
            self.fail(field, f"The {field} field may contain at most {max_items} items.")
        return value

    def string(
        self, value: object, field: str, *, min_len: int = 0, max_len: int | None = None
    ) -> str | None:
        if not isinstance(value, str):
            self.fail(field, f"The {field} field must be a string.")
            return None
        if len(value) < min_len:
            self.fail(field, f"The {field} field must be at least {min_len} character(s) long.")
        elif max_len is not None and len(value) > max_len:
            self.fail(field, f"The {field} field must be at most {max_len} characters long.")
        return value

    def integer(self, value: object, field: str) -> int | None:
        # JSON has no separate boolean-as-number; Python's bool is an int, so exclude it.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        self.fail(field, f"The {field} field must be an integer.")
        return None

    def boolean(self, value: object, field: str) -> None:
        if not isinstance(value, bool):
            self.fail(field, f"The {field} field must be a boolean.")

    # ---- Shared shapes ---------------------------------------------------------------------

    def email_object(self, value: object, field: str) -> str | None:
        """`{"email": ..., "name": ...}` (From/To Email Object); returns the address if valid."""
        email_object = self.mapping(value, field)
        if email_object is None:
            return None
        name = email_object.get("name")
        if name is not None:
            self.string(name, _field(field, "name"))
        email = email_object.get("email")
        if email is None:
            self.fail(_field(field, "email"), "The email parameter is required.")
            return None
        if not isinstance(email, str) or len(email) > 254 or not _EMAIL.match(email):
            self.fail(_field(field, "email"), "Does not contain a valid address.")
            return None
        return email

    def string_map(self, value: object, field: str, *, max_bytes: int | None = None) -> None:
        """An object whose values must all be strings (headers, substitutions, custom_args)."""
        mapping = self.mapping(value, field)
        if mapping is None:
            return
        for key, item in mapping.items():
            if not isinstance(item, str):
                self.fail(_field(field, key), f"The {field} values must be strings.")
        if max_bytes is not None and len(json.dumps(mapping).encode()) > max_bytes:
            self.fail(field, f"The {field} field may not exceed {max_bytes} bytes.")

    def headers(self, value: object, field: str) -> None:
        self.string_map(value, field)
        if isinstance(value, dict):
            for name in value:
                if name.lower() in RESERVED_HEADERS:
                    self.fail(_field(field, name), f"The {name} header cannot be overridden.")

    def send_at(self, value: object, field: str) -> None:
        send_at = self.integer(value, field)
        if send_at is not None and send_at > self._now + MAX_SEND_AT_AHEAD:
            self.fail(field, "A send cannot be scheduled more than 72 hours in advance.")

    def unique(self, items: Sequence[object], field: str) -> None:
        seen: list[object] = []
        for item in items:
            if item in seen:
                self.fail(field, f"The {field} field must contain unique items.")
                return
            seen.append(item)

    # ---- Personalizations ------------------------------------------------------------------

    def personalizations(self, value: object) -> list[dict[str, object]]:
        field = "personalizations"
        if not isinstance(value, list) or not value:
            # Live text; the schema only sets maxItems, but an empty list has nobody to send to.
            self.fail(
                field,
                "The personalizations field is required and must have at least one "
                "personalization.",
            )
            return []
        if len(value) > MAX_PERSONALIZATIONS:
            self.fail(
                field,
                f"The personalizations field must have no more than {MAX_PERSONALIZATIONS} "
                "personalizations.",
            )
        valid: list[dict[str, object]] = []
        for index, item in enumerate(value):
            personalization = self.mapping(item, _field(field, index))
            if personalization is not None:
                self.personalization(personalization, _field(field, index))
                valid.append(personalization)
        return valid

    def personalization(self, personalization: Mapping[str, object], field: str) -> None:
        to = personalization.get("to")
        if not isinstance(to, list) or not to:
            self.fail(
                _field(field, "to"),
                "The to array is required for all personalization objects, and must have at "
                "least one email object with a valid email address.",
            )
        else:
            self.recipients(to, _field(field, "to"))
        for kind in ("cc", "bcc"):
            recipients = personalization.get(kind)
            if recipients is not None:
                items = self.array(recipients, _field(field, kind), max_items=MAX_RECIPIENTS)
                self.recipients(items, _field(field, kind))
        self.personalization_extras(personalization, field)

    def recipients(self, items: Sequence[object], field: str) -> None:
        for index, item in enumerate(items):
            self.email_object(item, _field(field, index))

    def personalization_extras(self, personalization: Mapping[str, object], field: str) -> None:
        if (sender := personalization.get("from")) is not None:
            self.email_object(sender, _field(field, "from"))
        if (subject := personalization.get("subject")) is not None:
            self.string(subject, _field(field, "subject"), min_len=1)
        if (headers := personalization.get("headers")) is not None:
            self.headers(headers, _field(field, "headers"))
        if (substitutions := personalization.get("substitutions")) is not None:
            self.string_map(substitutions, _field(field, "substitutions"), max_bytes=MAX_ARGS_BYTES)
        if (data := personalization.get("dynamic_template_data")) is not None:
            self.mapping(data, _field(field, "dynamic_template_data"))
        if (custom_args := personalization.get("custom_args")) is not None:
            self.string_map(custom_args, _field(field, "custom_args"), max_bytes=MAX_ARGS_BYTES)
        if (send_at := personalization.get("send_at")) is not None:
            self.send_at(send_at, _field(field, "send_at"))

    def recipient_limits(self, personalizations: Sequence[Mapping[str, object]]) -> None:
        """At most 1000 recipients per request, and each address only once (case-insensitive)."""
        addresses = list(_addresses(personalizations))
        # Over 1000 personalizations is already reported, and implies over 1000 recipients.
        if len(addresses) > MAX_RECIPIENTS and len(personalizations) <= MAX_PERSONALIZATIONS:
            self.fail(
                "personalizations",
                f"The total number of recipients (to, cc and bcc) must be no more than "
                f"{MAX_RECIPIENTS}; this request has {len(addresses)}.",
            )
        seen: set[str] = set()
        for address, field in addresses:
            if address.lower() in seen:
                # Live wording; SendGrid reports the first duplicate only.
                self.fail(
                    field,
                    "Each email address in the personalization block should be unique between "
                    f"to, cc, and bcc. We found the first duplicate instance of [{address}] in "
                    f"the {field} field.",
                )
                return
            seen.add(address.lower())

    # ---- Message level ---------------------------------------------------------------------

    def sender(self, body: Mapping[str, object]) -> None:
        sender = body.get("from")
        if sender is None:
            self.fail(
                "from.email",
                "The from object must be provided for every email send. It is an object that "
                "requires the email parameter, but may also contain a name parameter.  e.g. "
                '{"email" : "example@example.com"}  or {"email" : "example@example.com", '
                '"name" : "Example Recipient"}.',
            )
            return
        self.email_object(sender, "from")

    def reply_to(self, body: Mapping[str, object]) -> None:
        reply_to, reply_to_list = body.get("reply_to"), body.get("reply_to_list")
        if reply_to is not None and reply_to_list is not None:
            self.fail("reply_to_list", "You can use either reply_to or reply_to_list, not both.")
        if reply_to is not None:
            self.email_object(reply_to, "reply_to")
        if reply_to_list is not None:
            items = self.array(reply_to_list, "reply_to_list", max_items=MAX_RECIPIENTS)
            self.recipients(items, "reply_to_list")
            self.unique(items, "reply_to_list")

    def subject(
        self, body: Mapping[str, object], personalizations: Sequence[Mapping[str, object]]
    ) -> None:
        subject = body.get("subject")
        if subject is not None:
            self.string(subject, "subject", min_len=1)
            return
        every_personalization_has_one = bool(personalizations) and all(
            p.get("subject") is not None for p in personalizations
        )
        if body.get("template_id") is None and not every_personalization_has_one:
            self.fail(
                "subject",
                "The subject is required. You can get around this requirement if you use a "
                "template with a subject defined or if every personalization has a subject "
                "defined.",
            )

    def content(self, body: Mapping[str, object]) -> None:
        content = body.get("content")
        if content is None or content == []:
            if body.get("template_id") is None:
                self.fail(
                    "content",
                    "Unless a valid template_id is provided, the content parameter is required. "
                    "There must be at least one defined content block. We typically suggest both "
                    "text/plain and text/html blocks are included, but only one block is required.",
                )
            return
        types = [
            self.content_block(item, _field("content", index))
            for index, item in enumerate(self.array(content, "content"))
        ]
        self.content_order([kind.lower() for kind in types if kind is not None])

    def content_block(self, value: object, field: str) -> str | None:
        block = self.mapping(value, field)
        if block is None:
            return None
        if not isinstance(block.get("value"), str) or not block.get("value"):
            self.fail(
                _field(field, "value"),
                "The content value must be a string at least one character in length.",
            )
        kind = self.string(block.get("type"), _field(field, "type"), min_len=1)
        if not kind:
            return None
        if any(char in kind for char in ";\r\n"):
            self.fail(_field(field, "type"), "The content type cannot contain ';', or CRLF.")
            return None
        return kind

    def content_order(self, types: Sequence[str]) -> None:
        """text/plain and text/html "must be the first indices of the array in this order"."""
        expected = [kind for kind in ("text/plain", "text/html") if kind in types]
        for kind in expected:
            if types.count(kind) > 1:
                self.fail("content", f"If present, {kind} may only be provided once.")
                return
        if types[: len(expected)] != expected:
            self.fail(
                "content",
                "If present, text/plain and text/html may only be provided once, text/plain must "
                "be first, followed by text/html, followed by any other content.",
            )

    def attachments(self, body: Mapping[str, object]) -> None:
        attachments = body.get("attachments")
        if attachments is None:
            return
        for index, item in enumerate(self.array(attachments, "attachments")):
            self.attachment(item, _field("attachments", index))

    def attachment(self, value: object, field: str) -> None:
        attachment = self.mapping(value, field)
        if attachment is None:
            return
        self.string(attachment.get("content"), _field(field, "content"), min_len=1)
        self.string(attachment.get("filename"), _field(field, "filename"))
        if (kind := attachment.get("type")) is not None:
            self.string(kind, _field(field, "type"), min_len=1)
        disposition = attachment.get("disposition", "attachment")
        if disposition not in ("inline", "attachment"):
            self.fail(
                _field(field, "disposition"),
                "The disposition must be one of: inline, attachment.",
            )
        content_id = attachment.get("content_id")
        if content_id is not None:
            self.string(content_id, _field(field, "content_id"))
        elif disposition == "inline":
            self.fail(
                _field(field, "content_id"),
                "The content_id is required when the disposition is inline.",
            )

    def categories(self, body: Mapping[str, object]) -> None:
        categories = body.get("categories")
        if categories is None:
            return
        items = self.array(categories, "categories", max_items=MAX_CATEGORIES)
        for index, item in enumerate(items):
            self.string(item, _field("categories", index), max_len=MAX_CATEGORY_LENGTH)
        self.unique(items, "categories")

    def custom_args(self, body: Mapping[str, object]) -> None:
        custom_args = body.get("custom_args")
        # The OpenAPI schema types the message-level custom_args as a string, but the docs, the
        # live API and the official client (`Mail.custom_arg`) use an object of strings: accept
        # both rather than reject what the client library builds.
        if custom_args is None or isinstance(custom_args, str):
            return
        self.string_map(custom_args, "custom_args", max_bytes=MAX_ARGS_BYTES)

    def asm(self, body: Mapping[str, object]) -> None:
        asm = body.get("asm")
        if asm is None or (asm := self.mapping(asm, "asm")) is None:
            return
        if asm.get("group_id") is None:
            self.fail("asm.group_id", "The asm.group_id field is required.")
        else:
            self.integer(asm["group_id"], "asm.group_id")
        groups = asm.get("groups_to_display")
        if groups is not None:
            field = "asm.groups_to_display"
            items = self.array(groups, field, max_items=MAX_GROUPS_TO_DISPLAY)
            for index, item in enumerate(items):
                self.integer(item, _field(field, index))

    def settings(
        self, body: Mapping[str, object], key: str, known: Mapping[str, Sequence[str]]
    ) -> None:
        """mail_settings / tracking_settings: objects of objects with boolean flags."""
        settings = body.get(key)
        if settings is None or (settings := self.mapping(settings, key)) is None:
            return
        for name, string_fields in known.items():
            value = settings.get(name)
            if value is None or (setting := self.mapping(value, _field(key, name))) is None:
                continue
            for flag in BOOLEAN_SETTING_FLAGS:
                if setting.get(flag) is not None:
                    self.boolean(setting[flag], _field(key, name, flag))
            for string_field in string_fields:
                if setting.get(string_field) is not None:
                    self.string(setting[string_field], _field(key, name, string_field))

    def scalars(self, body: Mapping[str, object]) -> None:
        if (template_id := body.get("template_id")) is not None:
            self.string(template_id, "template_id")
        if (batch_id := body.get("batch_id")) is not None:
            self.string(batch_id, "batch_id")
        if (ip_pool := body.get("ip_pool_name")) is not None:
            self.string(ip_pool, "ip_pool_name", min_len=2, max_len=64)
        if (send_at := body.get("send_at")) is not None:
            self.send_at(send_at, "send_at")
        if (headers := body.get("headers")) is not None:
            self.headers(headers, "headers")


def _addresses(
    personalizations: Sequence[Mapping[str, object]],
) -> Iterable[tuple[str, str]]:
    """(address, field) of every to/cc/bcc recipient with a string address, in request order."""
    for index, personalization in enumerate(personalizations):
        for kind in ("to", "cc", "bcc"):
            recipients = personalization.get(kind)
            if not isinstance(recipients, list):
                continue
            for position, recipient in enumerate(recipients):
                if isinstance(recipient, dict) and isinstance(recipient.get("email"), str):
                    email: str = recipient["email"]
                    yield email, _field("personalizations", index, kind, position, "email")


def validate_mail(body: object, *, now: float | None = None) -> list[ApiError]:
    """Every way `body` breaks SendGrid's documented Mail Send request; empty if it is valid."""
    if not isinstance(body, dict):
        return [ApiError(DEFAULT_MESSAGES[400])]
    check = _MailValidator(time.time() if now is None else now)
    personalizations = check.personalizations(body.get("personalizations"))
    check.recipient_limits(personalizations)
    check.sender(body)
    check.reply_to(body)
    check.subject(body, personalizations)
    check.content(body)
    check.attachments(body)
    check.categories(body)
    check.custom_args(body)
    check.asm(body)
    check.settings(body, "mail_settings", MAIL_SETTINGS)
    check.settings(body, "tracking_settings", TRACKING_SETTINGS)
    check.scalars(body)
    return check.errors


def is_sandboxed(body: Mapping[str, object]) -> bool:
    """`mail_settings.sandbox_mode.enable`: validated, answered 200, never delivered."""
    settings = body.get("mail_settings")
    sandbox = settings.get("sandbox_mode") if isinstance(settings, dict) else None
    return isinstance(sandbox, dict) and sandbox.get("enable") is True


def recipients_of(body: Mapping[str, object]) -> list[str]:
    """Every to, cc and bcc address of a (valid) body, in order."""
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list):
        return []
    valid = [p for p in personalizations if isinstance(p, dict)]
    return [address for address, _ in _addresses(valid)]


# --------------------------------------------------------------------------------------------
# Scripted replies
# --------------------------------------------------------------------------------------------


class ReplyKind(enum.StrEnum):
    NORMAL = "normal"  # what the fake does when nothing is scripted: check, then accept
    ACCEPT = "accept"  # 202 without any check
    ERROR = "error"  # a status with SendGrid's JSON error body
    RATE_LIMITED = "rate_limited"  # 429 with the X-RateLimit-* headers
    HTML = "html"  # a proxy's HTML error page (502 by default)
    HANG = "hang"  # no answer (for `seconds`, then NORMAL; or until the server stops)
    DROP = "drop"  # no answer ever: closed after `seconds` (None: when the client leaves)


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """What the fake answers to one mail send request, instead of its normal checks.

    Scripted replies are consumed one per `POST /v3/mail/send`, in order; the request is still
    recorded.
    """

    kind: ReplyKind
    status: int = 202
    message: str | None = None
    field: str | None = None
    seconds: float | None = None
    limit: int = DEFAULT_RATE_LIMIT
    errors: tuple[ApiError, ...] = ()  # several entries in one error body (`errors`)
    # Seconds to wait before answering; a client that leaves meanwhile gets nothing, and nothing
    # is accepted (SendGrid's timeout-then-accept would make a second email no sender can avoid).
    delay: float = 0.0
    # Not answered at all if the answer would leave later than this after the request came in
    # (a busy machine delayed it): the sender's timeout may have passed meanwhile.
    within: float | None = None

    @classmethod
    def normal(cls) -> Reply:
        return cls(ReplyKind.NORMAL)

    @classmethod
    def accept(cls) -> Reply:
        return cls(ReplyKind.ACCEPT)

    @classmethod
    def error(cls, status: int, message: str | None = None, *, field: str | None = None) -> Reply:
        if not 400 <= status <= 599:
            raise ValueError(f"an error status is 4xx or 5xx, not {status}")
        return cls(ReplyKind.ERROR, status=status, message=message, field=field)

    @classmethod
    def errors_of(cls, status: int, *errors: ApiError) -> Reply:
        """A status whose error body lists several entries, as SendGrid's 400s may."""
        if not errors:
            raise ValueError("give at least one error")
        return dataclasses.replace(cls.error(status), errors=errors)

    @classmethod
    def rate_limited(cls, *, reset_in: float = 1.0, limit: int = DEFAULT_RATE_LIMIT) -> Reply:
        """429; `X-RateLimit-Reset` is the epoch second `reset_in` seconds after the answer."""
        return cls(ReplyKind.RATE_LIMITED, status=429, seconds=reset_in, limit=limit)

    @classmethod
    def bad_gateway(cls, status: int = 502) -> Reply:
        """An HTML error page, as a proxy in front of the API answers (not SendGrid's JSON)."""
        return cls(ReplyKind.HTML, status=status)

    @classmethod
    def hang(cls, seconds: float | None = None) -> Reply:
        """Answer nothing: for `seconds` then handle normally (a slow API), or until stopped."""
        if seconds is not None and seconds < 0:
            raise ValueError("seconds must be >= 0")
        return cls(ReplyKind.HANG, seconds=seconds)

    @classmethod
    def drop(cls, seconds: float | None = None) -> Reply:
        """Never answer, never accept: the connection is closed after `seconds`, or as soon as
        the client leaves (its timeout), or when the server stops."""
        if seconds is not None and seconds < 0:
            raise ValueError("seconds must be >= 0")
        return cls(ReplyKind.DROP, seconds=seconds)

    def after(self, seconds: float) -> Reply:
        """This reply, answered `seconds` later if the client is still waiting by then."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        return dataclasses.replace(self, delay=seconds)

    def answered_within(self, seconds: float) -> Reply:
        """This reply, or none at all if it could not leave within `seconds` of the request."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        return dataclasses.replace(self, within=seconds)

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> Reply:
        """The `POST /__fake/script` form: `{"kind": "error", "status": 500, ...}`."""
        kind = ReplyKind(spec["kind"])
        if kind is ReplyKind.ERROR:
            return cls.error(int(spec["status"]), spec.get("message"), field=spec.get("field"))
        if kind is ReplyKind.RATE_LIMITED:
            return cls.rate_limited(
                reset_in=float(spec.get("reset_in", 1.0)),
                limit=int(spec.get("limit", DEFAULT_RATE_LIMIT)),
            )
        if kind is ReplyKind.HTML:
            return cls.bad_gateway(int(spec.get("status", 502)))
        if kind is ReplyKind.HANG:
            seconds = spec.get("seconds")
            return cls.hang(None if seconds is None else float(seconds))
        if kind is ReplyKind.DROP:
            seconds = spec.get("seconds")
            return cls.drop(None if seconds is None else float(seconds))
        return cls(kind)


Chooser = Callable[["RecordedRequest"], "Reply | None"]
CLIENT_POLL_SECONDS = 0.05  # how often a delayed or dropped request checks its client is there


@dataclasses.dataclass(eq=False)
class Chaos:
    """A seeded chooser (`FakeSendGrid.chooser = Chaos(seed, ...)`): a random fate per mail send.

    The n-th request with a given subject gets its reply from `random.Random` seeded with the
    seed, the subject and n, so one email's attempts meet the same fates whatever order requests
    arrive in. Fates: accepted after a latency in `latency`; a 5xx (`error`), a 429
    (`rate_limited`) or a proxy's 502 page (`bad_gateway`) after a short latency; `hang`: no
    answer until the client gives up; `slow`: no answer for a time drawn from `slow_seconds`
    (past the client's timeout), then the connection closed. Neither of the last two is ever
    accepted, and an accepted reply whose client left during its latency is not accepted either:
    a send SendGrid accepted after the sender stopped waiting would be a second email no sender
    could prevent, not what a test of the sender wants to see; `answer_within` also leaves
    unanswered whatever a busy machine would answer later than that after the request came in.
    `enabled = False` answers every request normally from then on; `fates` counts what was
    chosen.
    """

    seed: int | str
    latency: tuple[float, float] = (0.0, 1.0)
    error: float = 0.0
    rate_limited: float = 0.0
    bad_gateway: float = 0.0
    hang: float = 0.0
    slow: float = 0.0
    slow_seconds: tuple[float, float] = (2.0, 3.0)
    answer_within: float | None = None  # Reply.answered_within for every reply
    enabled: bool = True
    fates: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter, init=False
    )
    _seen: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter, init=False, repr=False
    )
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.error + self.rate_limited + self.bad_gateway + self.hang + self.slow > 1:
            raise ValueError("the fates' chances add up to more than 1")

    def __call__(self, record: RecordedRequest) -> Reply | None:
        if not self.enabled:
            return None
        body = record.body
        subject = body.get("subject") if isinstance(body, dict) else None
        key = subject if isinstance(subject, str) else "(no subject)"
        with self._lock:
            attempt = self._seen[key]
            self._seen[key] += 1
        draw = random.Random(f"{self.seed}:{key}:{attempt}")
        fate, reply = self._fate(draw)
        with self._lock:
            self.fates[fate] += 1
        if self.answer_within is not None:
            reply = reply.answered_within(self.answer_within)
        return reply

    def _fate(self, draw: random.Random) -> tuple[str, Reply]:
        roll = draw.random()
        quick = draw.uniform(0.0, min(self.latency[1], 0.5))
        for fate, chance in (
            ("error", self.error),
            ("rate_limited", self.rate_limited),
            ("bad_gateway", self.bad_gateway),
            ("hang", self.hang),
            ("slow", self.slow),
        ):
            if roll < chance:
                return fate, self._reply(fate, draw).after(quick if fate != "slow" else 0.0)
            roll -= chance
        return "accepted", Reply.normal().after(draw.uniform(*self.latency))

    def _reply(self, fate: str, draw: random.Random) -> Reply:
        if fate == "error":
            return Reply.error(draw.choice((500, 502, 503, 504)))
        if fate == "rate_limited":
            return Reply.rate_limited(reset_in=draw.uniform(0.5, 2.0))
        if fate == "bad_gateway":
            return Reply.bad_gateway()
        if fate == "hang":
            return Reply.drop()
        return Reply.drop(draw.uniform(*self.slow_seconds))


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class RecordedRequest:
    """One request as received. `headers` never holds `Authorization`; `auth_matched` says
    whether it carried `Bearer <the configured key>`. `status` is None while (or if never)
    answered."""

    method: str
    path: str
    headers: dict[str, str]
    auth_matched: bool
    body: object | None  # parsed JSON; None if the body was not JSON (or over 30 MB)
    size: int
    client_port: int | None = None  # one per connection: shows whether a client reuses them
    status: int | None = None
    message_id: str | None = None
    delivered: bool = False
    sandboxed: bool = False
    errors: tuple[ApiError, ...] = ()
    received_at: float = 0.0  # time.time() when the request arrived
    answered_at: float | None = None  # time.time() when answered (for a 202: accepted)
    gone: bool = False  # the client left (or the server stopped) before an answer


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How the fake answered one request; `response` None means: dropped without an answer."""

    response: web.StreamResponse | None
    message_id: str | None = None
    delivered: bool = False
    sandboxed: bool = False
    errors: tuple[ApiError, ...] = ()
    gone: bool = False  # nothing answered because the client left or the server stopped

    @property
    def status(self) -> int | None:
        return None if self.response is None else self.response.status


class Recorder:
    """Thread-safe log of what the fake received and delivered.

    Written from the server's event loop, read from test threads or the stats endpoint. The
    counters are exact; `max_records` only bounds the kept request and message bodies, so a long
    benchmark does not grow without limit.
    """

    def __init__(self, max_records: int | None = None) -> None:
        self._changed = threading.Condition()
        self._requests: collections.deque[RecordedRequest] = collections.deque(maxlen=max_records)
        self._accepted: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_records)
        self._script: collections.deque[Reply] = collections.deque()
        self._counts: collections.Counter[str] = collections.Counter()
        self._by_status: collections.Counter[int] = collections.Counter()

    def begin(self, record: RecordedRequest) -> None:
        with self._changed:
            self._requests.append(record)
            self._counts["requests"] += 1
            self._changed.notify_all()

    def finish(self, record: RecordedRequest, outcome: Outcome) -> None:
        """Apply the outcome to the record at once, so readers never see half of it."""
        with self._changed:
            record.status = outcome.status
            record.message_id = outcome.message_id
            record.delivered = outcome.delivered and isinstance(record.body, dict)
            record.sandboxed = outcome.sandboxed
            record.errors = outcome.errors
            record.gone = outcome.gone
            if outcome.status is not None:
                record.answered_at = time.time()
                self._by_status[outcome.status] += 1
            if record.delivered and isinstance(record.body, dict):
                self._accepted.append(record.body)
                self._counts["accepted"] += 1
                self._counts["recipients"] += len(recipients_of(record.body))
            if record.sandboxed:
                self._counts["sandboxed"] += 1
            self._changed.notify_all()

    def push_script(self, replies: Iterable[Reply]) -> None:
        with self._changed:
            self._script.extend(replies)

    def next_reply(self) -> Reply | None:
        with self._changed:
            return self._script.popleft() if self._script else None

    def requests(self) -> list[RecordedRequest]:
        with self._changed:
            return [dataclasses.replace(record) for record in self._requests]

    def accepted(self) -> list[dict[str, Any]]:
        with self._changed:
            return list(self._accepted)

    def delivered_recipients(self) -> list[str]:
        return [address for body in self.accepted() for address in recipients_of(body)]

    def stats(self) -> dict[str, Any]:
        with self._changed:
            return {
                "requests": self._counts["requests"],
                "accepted": self._counts["accepted"],
                "sandboxed": self._counts["sandboxed"],
                "recipients": self._counts["recipients"],
                "by_status": {str(status): n for status, n in sorted(self._by_status.items())},
                "pending_script": len(self._script),
            }

    def reset(self) -> None:
        """Forget every record, counter and pending scripted reply."""
        with self._changed:
            self._requests.clear()
            self._accepted.clear()
            self._script.clear()
            self._counts.clear()
            self._by_status.clear()
            self._changed.notify_all()

    def wait_for_requests(self, count: int, timeout: float) -> bool:
        """Block until at least `count` requests were received (answered or not)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._counts["requests"] >= count, timeout)


# --------------------------------------------------------------------------------------------
# The HTTP server
# --------------------------------------------------------------------------------------------


_T = TypeVar("_T")
_Handler = Coroutine[Any, Any, web.StreamResponse]


def _json_error(status: int, *errors: ApiError) -> web.Response:
    return web.Response(status=status, body=error_body(*errors), content_type="application/json")


def _default_error(status: int) -> web.Response:
    return _json_error(status, ApiError(DEFAULT_MESSAGES.get(status, "error")))


async def _read_body(request: web.BaseRequest) -> tuple[bytes | None, int]:
    """The body (None when over 30 MB) and its size. Always reads to the end, so the client
    finishes sending and gets our answer instead of a reset connection."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        else:
            chunks.clear()
    return (b"".join(chunks) if size <= MAX_BODY_BYTES else None), size


def _parse_json(raw: bytes | None) -> tuple[bool, object | None]:
    if raw is None:
        return False, None
    try:
        return True, json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False, None


def _client_port(request: web.BaseRequest) -> int | None:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return peer[1] if isinstance(peer, tuple) else None


def _bearer_key(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive, RFC 9110)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class FakeSendGridServer:
    """The asyncio side: an aiohttp low-level server and its request handling.

    Use `FakeSendGrid` in tests (it runs this in a thread) or `serve()` from a process.
    """

    def __init__(
        self,
        api_key: str,
        *,
        latency: float = 0.0,
        verified_senders: Iterable[str] | None = None,
        max_records: int | None = None,
        shutdown_timeout: float = 1.0,
    ) -> None:
        self._api_key = api_key.encode()
        self.latency = latency
        # None: every sender is verified. Otherwise a `from` outside the set gets SendGrid's 403.
        self._verified = None if verified_senders is None else {s.lower() for s in verified_senders}
        self.recorder = Recorder(max_records)
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.ServerRunner | None = None
        self._stopping: asyncio.Event | None = None
        # Decides each mail send request's reply when no scripted one is queued (None: NORMAL).
        self.chooser: Chooser | None = None
        self._control: dict[tuple[str, str], Callable[[web.BaseRequest], _Handler]] = {
            ("GET", "stats"): self._stats,
            ("POST", "reset"): self._reset,
            ("POST", "script"): self._script,
            ("POST", "config"): self._config,
        }

    @property
    def latency(self) -> float:
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency = float(seconds)  # one attribute store: safe to set from another thread

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen (port 0: the OS picks a free one) and return the base URL."""
        self._stopping = asyncio.Event()
        # access_log=None: formatting a log line per request costs more than handling it.
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        if ":" in bound_host:  # IPv6 literal
            bound_host = f"[{bound_host}]"
        return f"http://{bound_host}:{bound_port}"

    async def close(self) -> None:
        """Stop listening; wake hung requests (they get no answer); let the rest finish."""
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- dispatch --------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # raw_path, not path: `//v3/mail/send` (a host with a trailing slash) must not be
        # normalised into the real route, since SendGrid answers it 404.
        path = request.raw_path.partition("?")[0]
        if path.startswith(CONTROL_PREFIX):
            handler = self._control.get((request.method, path[len(CONTROL_PREFIX) :]))
            return await handler(request) if handler else _default_error(404)
        return await self._api(request, path)

    async def _api(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        raw, size = await _read_body(request)
        _, body = _parse_json(raw)
        record = RecordedRequest(
            method=request.method,
            path=path,
            headers={k: v for k, v in request.headers.items() if k.lower() != "authorization"},
            auth_matched=self._auth_matches(request),
            body=body,
            size=size,
            client_port=_client_port(request),
            received_at=time.time(),
        )
        self.recorder.begin(record)
        outcome = Outcome(None)  # if the server cancels us while stopping
        try:
            outcome = await self._answer(request, path, raw, record)
        finally:
            self.recorder.finish(record, outcome)
        return outcome.response if outcome.response is not None else _dropped(request)

    def _auth_matches(self, request: web.BaseRequest) -> bool:
        key = _bearer_key(request.headers.get("Authorization"))
        # Constant-time, as a real credential check would be.
        return key is not None and hmac.compare_digest(key.encode(), self._api_key)

    async def _answer(
        self, request: web.BaseRequest, path: str, raw: bytes | None, record: RecordedRequest
    ) -> Outcome:
        if self._latency:
            await asyncio.sleep(self._latency)
        if path != MAIL_SEND_PATH:
            return Outcome(_default_error(404))
        if request.method != "POST":
            response = _default_error(405)
            response.headers["Allow"] = "POST"
            return Outcome(response)
        reply = self.recorder.next_reply() or self._choose(record) or Reply.normal()
        if reply.delay and not await self._client_waits(request, reply.delay):
            return Outcome(None, gone=True)
        if reply.within is not None and time.time() - record.received_at > reply.within:
            return Outcome(None, gone=True)
        if reply.kind is ReplyKind.DROP:
            await self._client_waits(request, reply.seconds)
            return Outcome(None, gone=True)
        if reply.kind is ReplyKind.HANG:
            if not await self._hang(reply.seconds):
                return Outcome(None)
            reply = Reply.normal()
        return self._scripted(reply) or self._mail_send(request, raw, record)

    def _choose(self, record: RecordedRequest) -> Reply | None:
        chooser = self.chooser
        return None if chooser is None else chooser(dataclasses.replace(record))

    async def _client_waits(self, request: web.BaseRequest, seconds: float | None) -> bool:
        """Wait `seconds` (None: for ever) while the client keeps its connection open. False as
        soon as it leaves or the server is stopping; True if it is still there at the end."""
        assert self._stopping is not None
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while True:
            if request.transport is None or request.transport.is_closing():
                return False
            left = CLIENT_POLL_SECONDS if deadline is None else deadline - loop.time()
            if left <= 0:
                return True
            try:
                await asyncio.wait_for(self._stopping.wait(), min(left, CLIENT_POLL_SECONDS))
            except TimeoutError:
                continue
            return False

    async def _hang(self, seconds: float | None) -> bool:
        """Wait `seconds` (None: forever). False if the server is stopping meanwhile."""
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return True
        return False

    # ---- outcomes --------------------------------------------------------------------------

    def _scripted(self, reply: Reply) -> Outcome | None:
        """The scripted outcome; None for NORMAL (handle the request as usual)."""
        if reply.kind is ReplyKind.ACCEPT:
            return _accepted()
        if reply.kind is ReplyKind.ERROR:
            message = reply.message or DEFAULT_MESSAGES.get(reply.status, "error")
            errors = reply.errors or (ApiError(message, reply.field),)
            return Outcome(_json_error(reply.status, *errors))
        if reply.kind is ReplyKind.RATE_LIMITED:
            return Outcome(_rate_limited(reply))
        if reply.kind is ReplyKind.HTML:
            html = BAD_GATEWAY_HTML.format(status=reply.status)
            return Outcome(web.Response(status=reply.status, text=html, content_type="text/html"))
        return None

    def _mail_send(
        self, request: web.BaseRequest, raw: bytes | None, record: RecordedRequest
    ) -> Outcome:
        """SendGrid's own order: credentials, media type, size, JSON, body, sender identity."""
        if not record.auth_matched:
            missing = request.headers.get("Authorization") is None
            return Outcome(_json_error(401, ApiError(MISSING_AUTH if missing else BAD_AUTH)))
        if request.content_type != "application/json":
            error = ApiError("Content-Type should be application/json.")
            return Outcome(_json_error(400, error))
        if raw is None:
            return Outcome(_default_error(413))
        body = record.body
        if not isinstance(body, dict):  # not JSON, or JSON but not an object
            return Outcome(_default_error(400))
        if errors := tuple(validate_mail(body)):
            return Outcome(_json_error(400, *errors), errors=errors)
        if not self._sender_verified(body):
            return Outcome(_default_error(403))
        if is_sandboxed(body):
            return Outcome(web.Response(status=200), sandboxed=True)
        return _accepted()

    def _sender_verified(self, body: Mapping[str, Any]) -> bool:
        if self._verified is None:
            return True
        senders = [body["from"]["email"]]
        senders += [p["from"]["email"] for p in body["personalizations"] if p.get("from")]
        return all(sender.lower() in self._verified for sender in senders)

    # ---- control endpoints -----------------------------------------------------------------

    async def _stats(self, request: web.BaseRequest) -> web.Response:
        return web.json_response({**self.recorder.stats(), "latency_ms": self._latency * 1000})

    async def _reset(self, request: web.BaseRequest) -> web.Response:
        self.recorder.reset()
        return web.Response(status=204)

    async def _script(self, request: web.BaseRequest) -> web.Response:
        """Body: a JSON list of replies, e.g. `[{"kind": "rate_limited", "reset_in": 2}]`."""
        try:
            specs = await request.json()
            replies = [Reply.from_json(spec) for spec in specs]
        except (ValueError, KeyError, TypeError) as error:
            return _json_error(400, ApiError(f"bad script: {error}"))
        self.recorder.push_script(replies)
        return web.Response(status=204)

    async def _config(self, request: web.BaseRequest) -> web.Response:
        """Body: `{"latency_ms": 100}`."""
        try:
            self.latency = float((await request.json())["latency_ms"]) / 1000
        except (ValueError, KeyError, TypeError) as error:
            return _json_error(400, ApiError(f"bad config: {error}"))
        return web.Response(status=204)


def _accepted() -> Outcome:
    # Live message ids are 22 URL-safe base64 characters, e.g. "HuC3RxGjQ4-_4GxN8rG2Ng".
    message_id = secrets.token_urlsafe(16)
    response = web.Response(status=202, headers={"X-Message-Id": message_id})
    return Outcome(response, message_id=message_id, delivered=True)


def _rate_limited(reply: Reply) -> web.Response:
    # https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/rate-limits
    reset_at = int(time.time() + (reply.seconds or 0.0)) + 1  # epoch seconds, rounded up
    response = _default_error(429)
    response.headers["X-RateLimit-Limit"] = str(reply.limit)
    response.headers["X-RateLimit-Remaining"] = "0"
    response.headers["X-RateLimit-Reset"] = str(reset_at)
    return response


def _dropped(request: web.BaseRequest) -> web.Response:
    """Close the connection without an answer (a hung request when the server stops).

    aiohttp then fails to write the returned placeholder, sees a client disconnection, and
    moves on quietly.
    """
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


# --------------------------------------------------------------------------------------------
# In-process use (pytest)
# --------------------------------------------------------------------------------------------


class FakeSendGrid:
    """The fake on 127.0.0.1, served from a background thread with its own event loop.

    with FakeSendGrid() as fake:
        notifier = SendGridNotifier(api_key=fake.api_key, host=fake.url, ...)
        fake.script(Reply.rate_limited(), Reply.accept())
        ...
        assert fake.delivered_recipients() == [...]
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        latency: float = 0.0,
        verified_senders: Iterable[str] | None = None,
        max_records: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        # Shaped like a real key ("SG.<22>.<43>"), random so no test depends on its value.
        self._api_key = api_key or f"SG.{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(32)}"
        self._server = FakeSendGridServer(
            self._api_key,
            latency=latency,
            verified_senders=verified_senders,
            max_records=max_records,
        )
        self._host, self._port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    def __repr__(self) -> str:  # never show the key
        return f"FakeSendGrid(url={self._url!r})"

    @property
    def api_key(self) -> str:
        return self._api_key

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`, without a trailing slash (a slash would give `//v3/...`)."""
        if self._url is None:
            raise RuntimeError("FakeSendGrid is not started")
        return self._url

    @property
    def latency(self) -> float:
        """Seconds added before every answer; may be changed while serving."""
        return self._server.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self._server.latency = seconds

    @property
    def chooser(self) -> Chooser | None:
        """Decides each mail send request's reply when nothing is scripted (None: normal
        handling); may be changed while serving."""
        return self._server.chooser

    @chooser.setter
    def chooser(self, chooser: Chooser | None) -> None:
        self._server.chooser = chooser  # one attribute store: safe from another thread

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FakeSendGrid is already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name="fake-sendgrid", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._url = self._call(self._server.start(self._host, self._port), timeout=10)
        except BaseException:
            self._stop_loop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving: hung requests are dropped, others get up to 1 s to finish."""
        if self._loop is None:
            return
        try:
            self._call(self._server.close(), timeout=10)
        finally:
            self._stop_loop()
            self._url = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coroutine: Coroutine[Any, Any, _T], *, timeout: float) -> _T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)

    # ---- scripting and records (thread-safe) -----------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next mail send requests, one each, before normal handling."""
        self._server.recorder.push_script(replies)

    def requests(self) -> list[RecordedRequest]:
        return self._server.recorder.requests()

    def accepted(self) -> list[dict[str, Any]]:
        """Bodies of delivered messages (202), in order; sandboxed ones are not delivered."""
        return self._server.recorder.accepted()

    def delivered_recipients(self) -> list[str]:
        """Every to, cc and bcc address of the delivered messages, in order."""
        return self._server.recorder.delivered_recipients()

    def stats(self) -> dict[str, Any]:
        return self._server.recorder.stats()

    def reset(self) -> None:
        self._server.recorder.reset()

    def wait_for_requests(self, count: int = 1, timeout: float = 5.0) -> bool:
        return self._server.recorder.wait_for_requests(count, timeout)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # Anything still pending (a connection aiohttp had not yet closed) is cancelled here
        # rather than destroyed with the loop, which would warn.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# --------------------------------------------------------------------------------------------
# Separate process (benchmarks): python -m tests.fakes.sendgrid --port N
# --------------------------------------------------------------------------------------------


async def serve(
    server: FakeSendGridServer, host: str, port: int, ready: Callable[[str], None]
) -> None:
    """Serve until SIGTERM or SIGINT; `ready` gets the URL once listening."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    url = await server.start(host, port)
    ready(url)
    try:
        await stop.wait()
    finally:
        await server.close()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.sendgrid",
        description="A strict fake of SendGrid's POST /v3/mail/send, for benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    parser.add_argument(
        "--api-key",
        default=None,
        help="bearer key to require (default: $FAKE_SENDGRID_API_KEY, else a fixed fake key)",
    )
    parser.add_argument(
        "--max-records",
        type=int,
        default=10_000,
        help="request and message bodies kept in memory (counters are always exact)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    api_key = args.api_key or os.environ.get("FAKE_SENDGRID_API_KEY") or DEFAULT_CLI_API_KEY
    server = FakeSendGridServer(
        api_key,
        latency=args.latency_ms / 1000,
        max_records=args.max_records,
        shutdown_timeout=2.0,
    )

    def ready(url: str) -> None:
        sys.stdout.write(url + "\n")  # the one line a benchmark waits for
        sys.stdout.flush()

    with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
        runner.run(serve(server, args.host, args.port, ready))
    return 0


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (it is a runtime dependency): about twice the requests per core."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
