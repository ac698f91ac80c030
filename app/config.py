"""Every setting the service reads, validated once at start-up.

Precedence follows functions-framework: an explicit argument, then the environment (and an optional
`.env` file for local use), then the default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.durations import duration_text, parse_duration

# Deliberately simple: SendGrid validates addresses itself; this only catches typos and header
# injection (no whitespace or control characters can pass).
_ADDRESS = re.compile(r"^[^@\s\x00-\x1f\x7f<>,;\"]+@[^@\s\x00-\x1f\x7f<>,;\"]+$")

OUTBOX_DEFAULT_TO = "you@localhost"
OUTBOX_DEFAULT_FROM = "notifier@localhost"
MAX_EVENT_BYTES = 512 * 1024  # Eventarc's maximum event size.
# What may stand in a header the service sends (RFC 9110 §5.5 field-value, printable ASCII here):
# a key pasted with a trailing newline must stop start-up, not end a request head early.
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Done marks, digest deduplication and window records are kept this long (DEDUPE_RETENTION): a
# day more than the 7 days a change may come back, from Pub/Sub's retention or a dead-letter
# replay; never less than Eventarc's 24 hours of redelivery and an hour.
DEDUPE_RETENTION_SECONDS = 8 * 86400
MIN_DEDUPE_RETENTION_SECONDS = 25 * 3600
# A claim's lease covers one send (SENDGRID_TIMEOUT) begun right after the claim was checked, and
# this much more: the done mark's round trip and the clocks of two instances.
LEASE_MARGIN_SECONDS = 5.0
OUTBOX_SEND_SECONDS = 5.0  # the longest the outbox notifier takes to write one notification


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _check_address(address: str) -> str:
    if not _ADDRESS.match(address):
        raise ValueError(f"not an email address: {address!r}")
    return address


CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,
    )

    port: int = Field(default=8080, ge=1, le=65535)
    host: str = "0.0.0.0"  # Cloud Run requires 0.0.0.0; `make run` passes 127.0.0.1.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    google_cloud_project: str | None = None  # names the trace in Cloud Logging
    k_service: str | None = None  # set by Cloud Run: the service's name

    notifier: Literal["outbox", "sendgrid"] | None = None
    notify_to: CommaList = Field(default_factory=list)
    notify_from: str | None = None
    # A YAML rules file saying who hears about which change (README, "Routing rules"); unset:
    # every event to NOTIFY_TO.
    notify_rules: Path | None = None
    outbox_dir: Path = Path("outbox")

    sendgrid_api_key: SecretStr | None = None
    sendgrid_host: str = "https://api.sendgrid.com"
    sendgrid_timeout: float = Field(default=10.0, gt=0, le=300)
    sendgrid_sandbox: bool = False

    idempotency_store: str = "sqlite:///./state/notifier.db"
    claim_lease_seconds: float = Field(default=60.0, gt=0, le=3600)
    # How often the in-process timer sends due digest windows; 0: never (POST /digests/flush and
    # SIGTERM only, as on Cloud Run with CPU throttled between requests).
    digest_flush_seconds: float = Field(default=1.0, ge=0, le=3600)
    # One flush stops claiming windows after this long (Cloud Scheduler gives an attempt 30 s,
    # Cloud Run a request 60 s) and leaves the rest for the next one.
    digest_flush_budget_seconds: float = Field(default=20.0, gt=0, le=3600)
    # How long done marks, digest deduplication and sent windows are remembered: "8d", "36h".
    dedupe_retention: float = DEDUPE_RETENTION_SECONDS
    dead_letter_dir: Path = Path("dead-letter")

    # oidc: the service checks Google's signature itself (a public service). iam: Cloud Run IAM
    # checked it and forwarded the token with SIGNATURE_REMOVED_BY_GOOGLE (a private service).
    event_auth: Literal["none", "oidc", "iam"] = "none"
    event_invokers: CommaList = Field(default_factory=list)
    event_audience: CommaList = Field(default_factory=list)
    oidc_certs_url: str = "https://www.googleapis.com/oauth2/v1/certs"

    @field_validator("notify_to", "event_invokers", "event_audience", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("notify_to", "event_invokers")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        # Once each, whatever the case: SendGrid refuses a message naming an address twice.
        seen: set[str] = set()
        unique = []
        for address in value:
            if _check_address(address).lower() not in seen:
                seen.add(address.lower())
                unique.append(address)
        return unique

    @field_validator("notify_from")
    @classmethod
    def _sender(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("notifier", "event_auth", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("sendgrid_api_key", mode="before")
    @classmethod
    def _secret(cls, value: object) -> object:
        # `echo "$KEY" | gcloud secrets create --data-file=-` stores the key with a newline.
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return None
            if not _HEADER_SAFE.match(value):
                # Never echo the value: it is a secret.
                raise ValueError(
                    "must be printable ASCII with no spaces or control characters inside "
                    "(it is sent as an HTTP header)"
                )
        return value

    @field_validator("sendgrid_host")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value) or _CONTROL.search(value):
            raise ValueError("must be an http(s) base URL such as https://api.sendgrid.com")
        # A trailing slash would make the client call //v3/mail/send, which SendGrid 404s.
        return value.rstrip("/")

    @field_validator("dedupe_retention", mode="before")
    @classmethod
    def _retention(cls, value: object) -> object:
        if isinstance(value, float):
            return value
        seconds = parse_duration(value)
        if seconds < MIN_DEDUPE_RETENTION_SECONDS:
            raise ValueError(
                f"{duration_text(seconds)} is shorter than Eventarc's 24 hours of redelivery;"
                f" write {duration_text(MIN_DEDUPE_RETENTION_SECONDS)} or more (default"
                f" {duration_text(DEDUPE_RETENTION_SECONDS)}: 7 days of replay, plus a day)"
            )
        return float(seconds)

    @field_validator("idempotency_store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        return check_store_url(value)

    @field_validator("oidc_certs_url")
    @classmethod
    def _certs_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value) or _CONTROL.search(value):
            raise ValueError("must be an http(s) URL")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        """Field errors and the rules between fields, reported together in one refusal."""
        try:
            settings = handler(data)
        except ValidationError as error:
            problems = error.errors(include_url=False)
            failed = {str(problem["loc"][0]) for problem in problems if problem["loc"]}
            raw = data if isinstance(data, Mapping) else {}
            between = _between_fields(_RawView(raw), failed)
            if not between:
                raise
            details: list[InitErrorDetails] = [
                {
                    "type": PydanticCustomError(problem["type"], problem["msg"]),
                    "loc": problem["loc"],
                    "input": None,
                }
                for problem in problems
            ]
            raise ValidationError.from_exception_data(
                cls.__name__, [*details, *_as_errors(between)], hide_input=True
            ) from None
        between = _between_fields(settings, set())
        if between:
            raise ValidationError.from_exception_data(
                cls.__name__, _as_errors(between), hide_input=True
            )
        if settings.notifier is None:
            settings.notifier = "sendgrid" if settings.sendgrid_api_key else "outbox"
        if settings.notifier == "outbox":
            settings.notify_to = settings.notify_to or [OUTBOX_DEFAULT_TO]
            settings.notify_from = settings.notify_from or OUTBOX_DEFAULT_FROM
        return settings

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(self.notify_to)

    @property
    def sender(self) -> str:
        return self.notify_from or OUTBOX_DEFAULT_FROM


class _RawView:
    """The raw input seen through Settings' attribute names, for the rules between fields when
    some field failed: values are strings from the environment, or whatever was passed in."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = {str(key).lower(): value for key, value in values.items()}

    def __getattr__(self, name: str) -> Any:
        value = self._values.get(name)
        if name in ("notifier", "event_auth") and isinstance(value, str):
            return value.strip().lower() or None
        if name in ("notify_to", "event_invokers") and isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        if isinstance(value, str) and not value.strip():
            return None
        return value


def _between_fields(settings: Any, failed: set[str]) -> list[str]:
    """The rules that tie variables together; `failed` fields have been reported already."""
    problems = []
    notifier = settings.notifier
    if notifier is None and "sendgrid_api_key" not in failed and settings.sendgrid_api_key:
        notifier = "sendgrid"
    if notifier == "sendgrid" and "notifier" not in failed:
        missing = [
            name
            for name, field in (
                ("SENDGRID_API_KEY", "sendgrid_api_key"),
                ("NOTIFY_TO", "notify_to"),
                ("NOTIFY_FROM", "notify_from"),
            )
            if field not in failed
            and not getattr(settings, field)
            # With a rules file the routes name the recipients.
            and not (field == "notify_to" and settings.notify_rules)
        ]
        if missing:
            problems.append(f"NOTIFIER=sendgrid requires {', '.join(missing)}")
    lease = _number(settings.claim_lease_seconds)
    if notifier == "sendgrid":
        send, bound = _number(settings.sendgrid_timeout), "SENDGRID_TIMEOUT"
    else:
        send, bound = OUTBOX_SEND_SECONDS, "the outbox's write bound"
    if failed & {"claim_lease_seconds", "sendgrid_timeout", "notifier"}:
        lease = None  # reported already
    if lease is not None and send is not None and lease < send + LEASE_MARGIN_SECONDS:
        problems.append(
            f"CLAIM_LEASE_SECONDS ({lease:g}) must be at least {bound} ({send:g})"
            f" + {LEASE_MARGIN_SECONDS:g}: a send must end inside its claim's lease, or another"
            " instance may send the same email again"
        )
    auth = settings.event_auth
    if auth in ("oidc", "iam") and "event_invokers" not in failed and not settings.event_invokers:
        problems.append(
            f"EVENT_AUTH={auth} requires EVENT_INVOKERS (the trigger's service account email)"
        )
    return problems


def _number(value: object) -> float | None:
    """A setting's number, or None when it is missing or failed its own check."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _as_errors(problems: list[str]) -> list[InitErrorDetails]:
    return [
        {"type": PydanticCustomError("settings", message), "loc": (), "input": None}
        for message in problems
    ]


def check_store_url(value: str) -> str:
    """`memory`, `sqlite:///PATH`, `redis[s]://HOST[:PORT][/DB]` or
    `firestore://[PROJECT]/DATABASE[?prefix=NAME]`, parsed now so a typo stops start-up rather
    than failing every event."""
    if value == "memory":
        return value
    if value.startswith("firestore:"):
        from app.stores.firestore import FirestoreLocation  # parsing imports no Google library

        FirestoreLocation.parse(value)
        return value
    if value.startswith("sqlite:///"):
        path = value.removeprefix("sqlite:///")
        if not path or path.endswith("/"):
            raise ValueError("sqlite:///PATH needs the path of a database file")
        return value
    if value.startswith(("redis://", "rediss://")):
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            raise ValueError("redis URL has an invalid port (redis://HOST:PORT/DB)") from None
        if not parts.hostname:
            raise ValueError("redis URL needs a host (redis://HOST:PORT/DB)")
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise ValueError("redis URL's database must be a number (redis://HOST:PORT/DB)")
        del port
        return value
    raise ValueError(
        "must be sqlite:///PATH, redis://HOST:PORT/DB, firestore://PROJECT/DATABASE or memory"
    )


def describe_error(error: ValidationError) -> str:
    """One line per problem, naming the environment variable, never echoing a value."""
    lines = []
    for problem in error.errors(include_url=False, include_input=False):
        name = "_".join(str(part) for part in problem["loc"]).upper()
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{name}: {message}" if name else message)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings() -> Settings:
    """Settings from the environment; an invalid value stops start-up with a clear message."""
    try:
        return Settings()
    except ValidationError as error:
        raise SystemExit(describe_error(error)) from None
