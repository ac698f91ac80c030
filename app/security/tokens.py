"""What both ways of authenticating an event delivery share: the bearer token and its claims.

Eventarc delivers through a Pub/Sub push subscription, which sends `Authorization: Bearer <ID
token>`: a JWT signed by Google with RS256 whose `email` claim is the trigger's service account
(https://cloud.google.com/pubsub/docs/authenticate-push-subscriptions). Who checks the signature
depends on the service:

- public (`EVENT_AUTH=oidc`, app/security/oidc.py): Cloud Run lets every request through, so the
  service checks the signature against Google's certificates itself;
- private (`EVENT_AUTH=iam`, app/security/iam.py): Cloud Run IAM checks the token, then forwards
  it with its signature replaced by `SIGNATURE_REMOVED_BY_GOOGLE`
  (https://cloud.google.com/run/docs/troubleshooting#signature-removed).

Either way IAM only says the caller may invoke the service; what it asks of the token is checked
here, once, for both: a Google issuer, an audience naming this service, a verified email listed in
EVENT_INVOKERS (any principal holding `run.invoker` gets through IAM; only the trigger's account
may make the service send email).

No message, log record or exception chain produced here contains the token.
"""

import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Final, Self, TypeGuard
from urllib.parse import urlsplit

from google.auth import exceptions as google_exceptions
from google.auth import jwt

from app.security.errors import EventAuthError, Forbidden, Unauthenticated, WrongEventAuthMode

log = logging.getLogger(__name__)

# The issuers google.oauth2.id_token accepts for Google-signed ID tokens.
GOOGLE_ISSUERS: Final = frozenset({"accounts.google.com", "https://accounts.google.com"})
# What Cloud Run IAM puts in place of the signature of a token it checked.
SIGNATURE_REMOVED: Final = "SIGNATURE_REMOVED_BY_GOOGLE"

# Google's ID tokens are about 1 KB; anything far larger is not one and is not parsed.
_LONGEST_TOKEN: Final = 8192
_JWT_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

# What google-auth raises for a token it cannot decode or verify: its own errors (which subclass
# ValueError), and ValueError / TypeError from base64, JSON or claims of unexpected types. Their
# messages quote the token, so they never leave this package.
DECODE_ERRORS: Final = (google_exceptions.GoogleAuthError, ValueError, TypeError)


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of an event delivery's ID token."""

    email: str
    sub: str
    aud: str
    iss: str
    exp: int


class TokenVerifier(ABC):
    """Checks the ID token of an event delivery; subclasses say how its payload is trusted.

    `verify` raises `Unauthenticated` (401), `Forbidden` (403) or `CertificatesUnavailable`
    (503); the app's exception handler maps them. Use it as an async context manager, or call
    `close()` at shutdown.
    """

    mode: ClassVar[str]  # the EVENT_AUTH value this verifier implements

    def __init__(
        self,
        *,
        invokers: frozenset[str],
        audiences: frozenset[str] = frozenset(),
        clock_skew: int = 60,
    ) -> None:
        if not invokers:
            raise ValueError("at least one invoker service account is required")
        self._invokers = frozenset(invoker.strip().lower() for invoker in invokers)
        self._audiences = audiences
        self._clock_skew = clock_skew

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def close(self) -> None:
        """Release what the verifier holds open; it may be used again afterwards."""

    async def verify(
        self,
        authorization: str | None,
        request_url: str,
        *,
        serverless_authorization: str | None = None,
    ) -> Claims:
        """Return the claims of the request's token, or raise an `EventAuthError`.

        `authorization` is the Authorization header, `serverless_authorization` the
        X-Serverless-Authorization header (only `iam` reads it); `request_url` the URL the
        request came to, as the app sees it (only its host is used).
        """
        try:
            token = bearer_token(self._credentials(authorization, serverless_authorization))
            payload = await self._payload(token)
            claims = self._claims(payload, request_url)
        except WrongEventAuthMode as error:
            # A deployment mistake, not a stranger: every delivery fails until it is fixed.
            log.warning(
                error.advice,
                extra={
                    "event_auth": self.mode,
                    "reason": str(error),
                    "error_type": type(error).__name__,
                },
            )
            raise
        except EventAuthError as error:
            log.info(
                "event delivery refused",
                extra={"reason": str(error), "error_type": type(error).__name__},
            )
            raise
        log.debug("event delivery authenticated", extra={"invoker": claims.email})
        return claims

    def _credentials(
        self, authorization: str | None, serverless_authorization: str | None
    ) -> str | None:
        """The header holding the token this mode trusts."""
        return authorization

    @abstractmethod
    async def _payload(self, token: str) -> Mapping[str, object]:
        """The token's claims, once its signature (or Cloud Run's check of it) and its
        `iat`/`exp` window are accepted; raise `EventAuthError` otherwise."""

    def _claims(self, payload: Mapping[str, object], request_url: str) -> Claims:
        issuer = payload.get("iss")
        if not isinstance(issuer, str) or issuer not in GOOGLE_ISSUERS:
            raise Unauthenticated("token issuer is not Google")
        audience = payload.get("aud")
        if not isinstance(audience, str) or not self._addressed_to_us(audience, request_url):
            # The audience is a URL, not a secret: an operator comparing it with EVENT_AUDIENCE
            # (and with `gcloud run services describe --format='value(status.urls)'`) sees at once
            # which URL the trigger's tokens name.
            log.warning(
                "token audience does not match EVENT_AUDIENCE or the request's host",
                extra={
                    "token_audience": audience if isinstance(audience, str) else None,
                    "expected": sorted(self._audiences) or "https:// + the request's host",
                },
            )
            raise Unauthenticated("token audience does not match this service")
        subject, expiry = payload.get("sub"), payload.get("exp")
        if not isinstance(subject, str) or not isinstance(expiry, int | float):
            raise Unauthenticated("token claims are malformed")

        # From here the token is genuine and meant for us: the caller is authenticated, and what
        # remains is whether that identity may deliver events, hence 403 (RFC 9110 §15.5.4:
        # authenticating again would not help). An unverified email is refused the same way:
        # Google vouches for the token but not for the address in it, so it names no one we
        # could have listed.
        email = payload.get("email")
        if not isinstance(email, str):
            raise Forbidden("token carries no email")
        if payload.get("email_verified") is not True:
            raise Forbidden("email not verified")
        if email.lower() not in self._invokers:
            raise Forbidden("service account is not an allowed invoker")
        return Claims(email=email, sub=subject, aud=audience, iss=issuer, exp=int(expiry))

    def _addressed_to_us(self, audience: str, request_url: str) -> bool:
        if self._audiences:
            # "https://host" and "https://host/" name the same service.
            return audience.rstrip("/") in {known.rstrip("/") for known in self._audiences}
        # Without EVENT_AUDIENCE, Eventarc's token names the service URL and a Pub/Sub push
        # token names the full push endpoint (path and query included): any https URL of the
        # host the request came to. Cloud Run terminates TLS, so the app may see http: only the
        # host is taken from the request. The host comes from the Host header; configuring
        # EVENT_AUDIENCE removes even that from the caller's hands.
        origin = _https_origin(request_url)
        if origin is None:
            return False
        head, rest = audience[: len(origin)], audience[len(origin) :]
        return head.lower() == origin and (not rest or rest[0] in "/?")


def bearer_token(authorization: str | None) -> str:
    """The token of `Bearer <token>`, shaped like a JWT, or `Unauthenticated`."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if not scheme:
        raise Unauthenticated("missing bearer token")
    if scheme.lower() != "bearer":
        raise Unauthenticated("authorization scheme is not Bearer")
    token = credentials.strip()
    if not token:
        raise Unauthenticated("missing bearer token")
    if len(token) > _LONGEST_TOKEN or not _JWT_SHAPE.fullmatch(token):
        raise Unauthenticated("token is malformed")
    return token


def signature_removed(token: str) -> bool:
    return token.rpartition(".")[2] == SIGNATURE_REMOVED


def google_header(token: str) -> Mapping[str, object]:
    """The token's header, checked to be one Google writes: RS256, whatever the key."""
    header = _unverified_header(token)
    if header is None:
        raise Unauthenticated("token is malformed")
    # Google signs ID tokens with RS256 only; refusing anything else up front leaves no room for
    # algorithm confusion.
    if header.get("alg") != "RS256":
        raise Unauthenticated("token is not signed with RS256")
    return header


def check_lifetime(payload: Mapping[str, object], clock_skew: int, now: float) -> None:
    """What `google.auth.jwt.decode` checks of `iat` and `exp` when it verifies a signature,
    for a token whose signature is not checked here; `iat` must also precede `exp`."""
    if "iat" not in payload or "exp" not in payload:
        raise Unauthenticated("token lacks iat or exp")
    issued_at, expires_at = payload["iat"], payload["exp"]
    # JSON has no infinity, but Python's parser accepts `Infinity`: a token that never expires.
    if not _is_time(issued_at) or not _is_time(expires_at) or expires_at < issued_at:
        raise Unauthenticated("token is malformed")
    if now < issued_at - clock_skew:
        raise Unauthenticated("token used before it was issued")
    if expires_at + clock_skew < now:
        raise Unauthenticated("token expired")


def _is_time(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _unverified_header(token: str) -> Mapping[str, object] | None:
    # Returns instead of raising so that no exception quoting the token is chained to ours.
    try:
        header = jwt.decode_header(token)  # type: ignore[no-untyped-call]
    except DECODE_ERRORS:
        return None
    return header if isinstance(header, Mapping) else None


def _https_origin(request_url: str) -> str | None:
    try:
        parts = urlsplit(request_url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    # A Host header may carry the default port of either scheme; an audience never does.
    netloc = host if port in (None, 80, 443) else f"{host}:{port}"
    return f"https://{netloc}"
