"""Why an event delivery's caller was refused; importable without google-auth."""

from __future__ import annotations


class EventAuthError(Exception):
    """An event delivery whose caller could not be accepted; `str(error)` is safe to show."""


class Unauthenticated(EventAuthError):
    """No valid Google ID token addressed to this service: answer 401."""


class Forbidden(EventAuthError):
    """A valid token of an identity that may not deliver events: answer 403."""


class CertificatesUnavailable(EventAuthError):
    """Google's signing certificates could not be fetched: answer 503 so Eventarc retries."""
