"""Verify the OIDC identity token Eventarc sends with every event delivery (issue 4, item 1).

Eventarc delivers Cloud Storage events through a Pub/Sub push subscription, which sends
`Authorization: Bearer <ID token>`: a JWT signed by Google with RS256 whose `email` claim is
the trigger's service account. Its header and claims are those documented in
https://cloud.google.com/pubsub/docs/authenticate-push-subscriptions.

The signature and the `iat`/`exp` window are checked by `google.auth.jwt.decode`. The issuer
check follows `google.oauth2.id_token.verify_oauth2_token`, which is not used itself because it
fetches the certificates synchronously, on every call. Audience and invoker are checked here.

Errors map to HTTP statuses in the app's exception handler:

- `Unauthenticated` -> 401: missing, malformed, badly signed, expired, wrongly issued or
  wrongly addressed token.
- `Forbidden` -> 403: a genuine Google token for this service, but of an identity that is not
  an allowed invoker.
- `CertificatesUnavailable` -> 503: Google's certificates could not be fetched; not the
  caller's fault, and a 5xx makes Eventarc deliver the event again later.

No message, log record or exception chain produced here contains the token.
"""

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self
from urllib.parse import urlsplit

from google.auth import crypt, jwt
from google.auth import exceptions as google_exceptions

from app.http import HttpClient, HttpError
from app.security.errors import (
    CertificatesUnavailable,
    EventAuthError,
    Forbidden,
    Unauthenticated,
)

log = logging.getLogger(__name__)

__all__ = [
    "GOOGLE_CERTS_URL",
    "GOOGLE_ISSUERS",
    "CertificatesUnavailable",
    "Claims",
    "EventAuthError",
    "Forbidden",
    "OidcVerifier",
    "Unauthenticated",
]

GOOGLE_CERTS_URL: Final = "https://www.googleapis.com/oauth2/v1/certs"
# The issuers google.oauth2.id_token accepts for Google-signed ID tokens.
GOOGLE_ISSUERS: Final = frozenset({"accounts.google.com", "https://accounts.google.com"})

DEFAULT_CERTS_MAX_AGE: Final = 3600
# Google's own max-age is a few hours; a day bounds the damage of a misconfigured endpoint.
LONGEST_CERTS_MAX_AGE: Final = 86_400

# Google's ID tokens are about 1 KB; anything far larger is not one and is not parsed.
_LONGEST_TOKEN: Final = 8192
_JWT_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_MAX_AGE: Final = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)

# What google-auth raises for a token it cannot decode or verify: its own errors (which subclass
# ValueError), and ValueError / TypeError from base64, JSON or claims of unexpected types.
_DECODE_ERRORS: Final = (google_exceptions.GoogleAuthError, ValueError, TypeError)

# google.auth.jwt.decode reports every verification failure as InvalidValue or MalformedError;
# only the message tells them apart. The messages also quote the token, so they never leave
# this module: they are only matched here. A google-auth release that rewords them makes the
# tests fail, while the token is still refused, as "token is malformed".
_GOOGLE_AUTH_REASONS: Final = (
    ("Could not verify token signature", "token signature is invalid"),
    ("Token expired", "token expired"),
    ("Token used too early", "token used before it was issued"),
    ("Token does not contain required claim", "token lacks iat or exp"),
)


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of an event delivery's ID token."""

    email: str
    sub: str
    aud: str
    iss: str
    exp: int


class OidcVerifier:
    """Checks `Authorization: Bearer <Google ID token>` headers of event deliveries.

    Certificates are fetched from `certs_url` (Google's `{kid: PEM certificate}` format) on
    first use and kept for the response's `Cache-Control: max-age`. A token with a key id
    not in the cache triggers one refetch, but attempts are at most one per
    `min_refetch_interval` seconds, so tokens with made-up key ids cannot make the service
    hammer Google, and concurrent verifications waiting for certificates share one fetch.

    Fetches go through an `HttpClient` for the certificates URL's origin, created on first use
    in the running event loop and closed by `close()`.
    """

    def __init__(
        self,
        *,
        certs_url: str = GOOGLE_CERTS_URL,
        invokers: frozenset[str],
        audiences: frozenset[str] = frozenset(),
        clock_skew: int = 60,
        fetch_timeout: float = 5.0,
        min_refetch_interval: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not invokers:
            raise ValueError("at least one invoker service account is required")
        self._certs_url = certs_url
        self._invokers = frozenset(invoker.strip().lower() for invoker in invokers)
        self._audiences = audiences
        self._clock_skew = clock_skew
        self._fetch_timeout = fetch_timeout
        self._min_refetch_interval = min_refetch_interval
        self._monotonic = monotonic
        self._http: HttpClient | None = None
        self._lock = asyncio.Lock()
        self._certificates: dict[str, str] = {}
        self._certificates_expire_at = float("-inf")
        self._last_fetch_started_at: float | None = None
        self._last_fetch_failed = False
        self._fetches_finished = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP client's connections; a new client is made if used again."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None
            # A new client may run in a new event loop: so must the lock.
            self._lock = asyncio.Lock()

    async def verify(self, authorization: str | None, request_url: str) -> Claims:
        """Return the claims of the request's token, or raise an `EventAuthError`.

        `authorization` is the Authorization header; `request_url` the URL the request came
        to, as the app sees it (only its host is used).
        """
        try:
            claims = await self._verify(authorization, request_url)
        except EventAuthError as error:
            log.info(
                "event delivery refused",
                extra={"reason": str(error), "error_type": type(error).__name__},
            )
            raise
        log.debug("event delivery authenticated", extra={"invoker": claims.email})
        return claims

    async def _verify(self, authorization: str | None, request_url: str) -> Claims:
        token = _bearer_token(authorization)
        kid = _key_id(token)
        certificate = await self._certificate(kid)
        payload = _verified_payload(token, kid, certificate, self._clock_skew)

        issuer = payload.get("iss")
        if not isinstance(issuer, str) or issuer not in GOOGLE_ISSUERS:
            raise Unauthenticated("token issuer is not Google")
        audience = payload.get("aud")
        if not isinstance(audience, str) or not self._addressed_to_us(audience, request_url):
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
            return audience in self._audiences
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

    async def _certificate(self, kid: str) -> str:
        if self._monotonic() < self._certificates_expire_at and kid in self._certificates:
            return self._certificates[kid]
        fetches_seen = self._fetches_finished
        async with self._lock:
            # Whoever waited here while another verification fetched uses that result.
            if self._fetches_finished == fetches_seen and self._may_fetch():
                await self._fetch_certificates()
        certificate = self._certificates.get(kid)
        if certificate is not None:
            # Possibly past its max-age when a refetch failed or was not yet allowed: Google
            # publishes keys well before and withdraws them well after use, so it still serves.
            return certificate
        if self._last_fetch_failed:
            raise CertificatesUnavailable("Google's signing certificates are unavailable")
        raise Unauthenticated("token is signed by an unknown key")

    def _may_fetch(self) -> bool:
        started_at = self._last_fetch_started_at
        return started_at is None or self._monotonic() - started_at >= self._min_refetch_interval

    async def _fetch_certificates(self) -> None:
        started_at = self._last_fetch_started_at = self._monotonic()
        failed = True
        try:
            certificates, max_age = await self._download_certificates()
        except (HttpError, ValueError) as error:
            log.warning(
                "could not fetch signing certificates",
                extra={
                    "certs_url": self._certs_url,
                    "error_type": type(error).__name__,
                    "error": str(error),
                },
            )
        else:
            self._certificates = certificates
            self._certificates_expire_at = started_at + max_age
            failed = False
            log.info(
                "fetched signing certificates",
                extra={
                    "certs_url": self._certs_url,
                    "kids": sorted(certificates),
                    "max_age": max_age,
                },
            )
        finally:
            # Also on cancellation: the verifications waiting for this fetch must not hang on to
            # an outcome that never comes.
            self._last_fetch_failed = failed
            self._fetches_finished += 1

    async def _download_certificates(self) -> tuple[dict[str, str], int]:
        # HttpError when there is no answer; ValueError for a bad URL or answer. Redirects are
        # not followed: a 3xx is an answer other than 200.
        origin, target = _origin_and_target(self._certs_url)
        if self._http is None:
            self._http = HttpClient(origin, timeout=self._fetch_timeout)
        response = await self._http.get(target)
        if response.status != 200:
            raise ValueError(f"certificates endpoint answered HTTP {response.status}")
        body: object = json.loads(response.body)
        max_age = _max_age(response.headers.get("cache-control"))
        if not isinstance(body, dict):
            raise ValueError("certificates endpoint did not answer a JSON object")
        certificates = {
            kid: pem
            for kid, pem in body.items()
            if isinstance(kid, str) and isinstance(pem, str) and _is_certificate(kid, pem)
        }
        if not certificates:
            raise ValueError("certificates endpoint answered no usable certificate")
        return certificates, max_age


def _bearer_token(authorization: str | None) -> str:
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


def _key_id(token: str) -> str:
    header = _unverified_header(token)
    if header is None:
        raise Unauthenticated("token is malformed")
    # Google signs ID tokens with RS256 only; refusing anything else up front leaves no room for
    # algorithm confusion.
    if header.get("alg") != "RS256":
        raise Unauthenticated("token is not signed with RS256")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Unauthenticated("token has no key id")
    return kid


def _unverified_header(token: str) -> Mapping[str, object] | None:
    # Returns instead of raising so that no exception quoting the token is chained to ours.
    try:
        header = jwt.decode_header(token)  # type: ignore[no-untyped-call]
    except _DECODE_ERRORS:
        return None
    return header if isinstance(header, Mapping) else None


def _verified_payload(
    token: str, kid: str, certificate: str, clock_skew: int
) -> Mapping[str, object]:
    try:
        payload = jwt.decode(  # type: ignore[no-untyped-call]
            token,
            certs={kid: certificate},
            verify=True,
            audience=None,  # checked by the caller: it depends on the request
            clock_skew_in_seconds=clock_skew,
        )
    except _DECODE_ERRORS as error:
        reason = _rejection_reason(error)
    else:
        verified: Mapping[str, object] = payload  # a JSON object: google-auth checked it
        return verified
    # Raised outside the except clause, so google-auth's message is not its __context__.
    raise Unauthenticated(reason)


def _rejection_reason(error: Exception) -> str:
    message = str(error)
    for prefix, reason in _GOOGLE_AUTH_REASONS:
        if message.startswith(prefix):
            return reason
    return "token is malformed"


def _is_certificate(kid: str, pem: str) -> bool:
    try:
        crypt.RSAVerifier.from_string(pem)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError):
        log.warning("ignoring an unreadable signing certificate", extra={"kid": kid})
        return False
    return True


def _origin_and_target(url: str) -> tuple[str, str]:
    """`https://host:port/path?query` -> (`https://host:port`, `/path?query`)."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    return f"{parts.scheme}://{parts.netloc}", target


def _max_age(cache_control: str | None) -> int:
    match = _MAX_AGE.search(cache_control or "")
    if match is None:
        return DEFAULT_CERTS_MAX_AGE
    return min(int(match.group(1)), LONGEST_CERTS_MAX_AGE)


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
