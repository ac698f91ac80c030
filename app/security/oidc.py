"""EVENT_AUTH=oidc: the service checks the signature of Eventarc's ID token (issue 4, item 1).

For a public service: Cloud Run lets every request through, so the token's RS256 signature is
checked here against Google's certificates. The signature and the `iat`/`exp` window are checked
by `google.auth.jwt.decode`; the issuer check follows `google.oauth2.id_token.verify_oauth2_token`,
which is not used itself because it fetches the certificates synchronously, on every call.
Audience, issuer and invoker are checked in app/security/tokens.py, as for EVENT_AUTH=iam.

Errors map to HTTP statuses in the app's exception handler:

- `Unauthenticated` -> 401: missing, malformed, badly signed, expired, wrongly issued or
  wrongly addressed token; also a token whose signature Cloud Run IAM removed (the service is
  private: EVENT_AUTH=iam fits), logged at WARNING.
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
from typing import ClassVar, Final

import aiohttp
from google.auth import crypt, jwt

from app.security.errors import (
    CertificatesUnavailable,
    EventAuthError,
    Forbidden,
    Unauthenticated,
    WrongEventAuthMode,
)
from app.security.tokens import (
    DECODE_ERRORS,
    GOOGLE_ISSUERS,
    Claims,
    TokenVerifier,
    google_header,
    signature_removed,
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

DEFAULT_CERTS_MAX_AGE: Final = 3600
# Google's own max-age is a few hours; a day bounds the damage of a misconfigured endpoint.
LONGEST_CERTS_MAX_AGE: Final = 86_400

_MAX_AGE: Final = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)

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


class OidcVerifier(TokenVerifier):
    """Checks `Authorization: Bearer <Google ID token>` headers of event deliveries.

    Certificates are fetched from `certs_url` (Google's `{kid: PEM certificate}` format) on
    first use and kept for the response's `Cache-Control: max-age`. A token with a key id
    not in the cache triggers one refetch, but attempts are at most one per
    `min_refetch_interval` seconds, so tokens with made-up key ids cannot make the service
    hammer Google, and concurrent verifications waiting for certificates share one fetch.

    Fetches go through one aiohttp `ClientSession`, created on first use in the running event
    loop and closed by `close()`; each has `fetch_timeout` seconds in all and follows no
    redirect.
    """

    mode: ClassVar[str] = "oidc"

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
        super().__init__(invokers=invokers, audiences=audiences, clock_skew=clock_skew)
        self._certs_url = certs_url
        self._fetch_timeout = aiohttp.ClientTimeout(total=fetch_timeout)
        self._min_refetch_interval = min_refetch_interval
        self._monotonic = monotonic
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._certificates: dict[str, str] = {}
        self._certificates_expire_at = float("-inf")
        self._last_fetch_started_at: float | None = None
        self._last_fetch_failed = False
        self._fetches_finished = 0

    async def close(self) -> None:
        """Close the HTTP session's connections; a new session is made if used again."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
            # A new session may run in a new event loop: so must the lock.
            self._lock = asyncio.Lock()

    async def _payload(self, token: str) -> Mapping[str, object]:
        kid = _key_id(google_header(token))
        if signature_removed(token):
            raise WrongEventAuthMode(
                "token signature was removed by Cloud Run IAM",
                advice=(
                    "token signature was removed by Cloud Run IAM: the service is private, "
                    "set EVENT_AUTH=iam"
                ),
            )
        certificate = await self._certificate(kid)
        return _verified_payload(token, kid, certificate, self._clock_skew)

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
        except TimeoutError as error:  # aiohttp's own timeouts subclass it (and ClientError)
            self._log_failure(type(error).__name__, "no answer in time")
        except (aiohttp.ClientError, ValueError, RecursionError) as error:
            # RecursionError: json.loads of a document nested thousands deep.
            self._log_failure(type(error).__name__, str(error) or type(error).__name__)
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

    def _log_failure(self, error_type: str, error: str) -> None:
        log.warning(
            "could not fetch signing certificates",
            extra={"certs_url": self._certs_url, "error_type": error_type, "error": error},
        )

    async def _download_certificates(self) -> tuple[dict[str, str], int]:
        # aiohttp.ClientError or TimeoutError when there is no answer; ValueError for an answer
        # that is not a certificates document. A redirect is not followed: a 3xx is an answer
        # other than 200, and the URL fetched is the one configured.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), headers={"Accept": "application/json"}
            )
        async with self._session.get(
            self._certs_url, allow_redirects=False, timeout=self._fetch_timeout
        ) as response:
            if response.status != 200:
                raise ValueError(f"certificates endpoint answered HTTP {response.status}")
            body: object = json.loads(await response.read())
            max_age = _max_age(response.headers.get("Cache-Control"))
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


def _key_id(header: Mapping[str, object]) -> str:
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Unauthenticated("token has no key id")
    return kid


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
    except DECODE_ERRORS as error:
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


def _max_age(cache_control: str | None) -> int:
    match = _MAX_AGE.search(cache_control or "")
    if match is None:
        return DEFAULT_CERTS_MAX_AGE
    return min(int(match.group(1)), LONGEST_CERTS_MAX_AGE)
