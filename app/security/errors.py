"""Why an event delivery's caller was refused; importable without google-auth."""

from __future__ import annotations


class EventAuthError(Exception):
    """An event delivery whose caller could not be accepted; `str(error)` is safe to show."""


class Unauthenticated(EventAuthError):
    """No valid Google ID token addressed to this service: answer 401."""


class WrongEventAuthMode(Unauthenticated):
    """A token that fits the other EVENT_AUTH mode: answer 401; `advice` names the mode that fits.

    Under `oidc`, a token whose signature Cloud Run IAM removed (the service is private); under
    `iam`, a token still signed (Cloud Run did not check it: the service is public).
    """

    def __init__(self, reason: str, *, advice: str) -> None:
        super().__init__(reason)
        self.advice = advice


class Forbidden(EventAuthError):
    """A valid token of an identity that may not deliver events: answer 403."""


class CertificatesUnavailable(EventAuthError):
    """Google's signing certificates could not be fetched: answer 503 so Eventarc retries."""
