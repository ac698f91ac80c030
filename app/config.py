"""Every setting the service reads, validated once at start-up.

Precedence follows functions-framework: an explicit argument, then the environment (and an optional
`.env` file for local use), then the default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Deliberately simple: SendGrid validates addresses itself; this only catches typos and header
# injection (no whitespace or control characters can pass).
_ADDRESS = re.compile(r"^[^@\s\x00-\x1f\x7f<>,;\"]+@[^@\s\x00-\x1f\x7f<>,;\"]+$")

OUTBOX_DEFAULT_TO = "you@localhost"
OUTBOX_DEFAULT_FROM = "notifier@localhost"
MAX_EVENT_BYTES = 512 * 1024  # Eventarc's maximum event size.
DONE_RETENTION_SECONDS = 25 * 3600  # longer than Eventarc's 24 hours of redelivery


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

    notifier: Literal["outbox", "sendgrid"] | None = None
    notify_to: CommaList = Field(default_factory=list)
    notify_from: str | None = None
    outbox_dir: Path = Path("outbox")

    sendgrid_api_key: SecretStr | None = None
    sendgrid_host: str = "https://api.sendgrid.com"
    sendgrid_timeout: float = Field(default=10.0, gt=0, le=300)
    sendgrid_sandbox: bool = False

    idempotency_store: str = "sqlite:///./state/notifier.db"
    claim_lease_seconds: float = Field(default=60.0, gt=0, le=3600)
    dead_letter_dir: Path = Path("dead-letter")

    event_auth: Literal["none", "oidc"] = "none"
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
        return [_check_address(address) for address in value]

    @field_validator("notify_from")
    @classmethod
    def _sender(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("sendgrid_host")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http(s) base URL such as https://api.sendgrid.com")
        # A trailing slash would make the client call //v3/mail/send, which SendGrid 404s.
        return value.rstrip("/")

    @field_validator("idempotency_store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value == "memory" or value.startswith(("sqlite:///", "redis://", "rediss://")):
            return value
        raise ValueError("must be sqlite:///PATH, redis://HOST:PORT/DB or memory")

    @model_validator(mode="after")
    def _notifier_requirements(self) -> Settings:
        if self.notifier is None:
            self.notifier = "sendgrid" if self.sendgrid_api_key else "outbox"
        if self.notifier == "outbox":
            self.notify_to = self.notify_to or [OUTBOX_DEFAULT_TO]
            self.notify_from = self.notify_from or OUTBOX_DEFAULT_FROM
        else:
            missing = [
                name
                for name, value in (
                    ("SENDGRID_API_KEY", self.sendgrid_api_key),
                    ("NOTIFY_TO", self.notify_to),
                    ("NOTIFY_FROM", self.notify_from),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"NOTIFIER=sendgrid requires {', '.join(missing)}")
        if self.event_auth == "oidc" and not self.event_invokers:
            raise ValueError(
                "EVENT_AUTH=oidc requires EVENT_INVOKERS (the trigger's service account email)"
            )
        return self

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(self.notify_to)

    @property
    def sender(self) -> str:
        return self.notify_from or OUTBOX_DEFAULT_FROM


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
