"""EVENT_AUTH=iam: Cloud Run IAM checked the ID token's signature; the service checks the rest.

For a private service (no `allUsers` invoker): Cloud Run IAM verifies the trigger's Google-signed
ID token before the request reaches the container, and forwards it with the signature replaced by
`SIGNATURE_REMOVED_BY_GOOGLE` (https://cloud.google.com/run/docs/troubleshooting#signature-removed).
The signature cannot be checked again, and need not be: nothing reaches the container without
passing IAM. IAM only asks that the caller hold `run.invoker`, though, so the claims are still
checked here (app/security/tokens.py): Google issuer, audience, `iat`/`exp` with the same clock
skew as `oidc`, a verified email listed in EVENT_INVOKERS.

Only a token whose signature Google removed is accepted. A signed one means Cloud Run did not
check it: the service is public, anyone could have written the claims, and EVENT_AUTH=oidc fits;
it is refused with 401 and a WARNING saying so.

A caller may send its token in `X-Serverless-Authorization` instead; Cloud Run IAM then checks
that header only and leaves `Authorization` to the application. The token
IAM checked is the only one trusted: with X-Serverless-Authorization present, `Authorization` is
ignored, or any principal holding `run.invoker` could write whatever claims it likes there.
"""

import time
from collections.abc import Callable, Mapping
from typing import ClassVar

from google.auth import jwt

from app.security.errors import Unauthenticated, WrongEventAuthMode
from app.security.tokens import (
    DECODE_ERRORS,
    TokenVerifier,
    check_lifetime,
    google_header,
    signature_removed,
)

__all__ = ["IamVerifier"]


class IamVerifier(TokenVerifier):
    """Checks the claims of the ID token Cloud Run IAM verified and forwarded without signature."""

    mode: ClassVar[str] = "iam"

    def __init__(
        self,
        *,
        invokers: frozenset[str],
        audiences: frozenset[str] = frozenset(),
        clock_skew: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(invokers=invokers, audiences=audiences, clock_skew=clock_skew)
        self._clock = clock

    async def close(self) -> None:
        """Nothing to release: no certificates are fetched."""

    def _credentials(
        self, authorization: str | None, serverless_authorization: str | None
    ) -> str | None:
        return authorization if serverless_authorization is None else serverless_authorization

    async def _payload(self, token: str) -> Mapping[str, object]:
        google_header(token)
        if not signature_removed(token):
            raise WrongEventAuthMode(
                "token is signed: Cloud Run IAM did not check it",
                advice=(
                    "token is signed, so Cloud Run did not check it (the service is public?): "
                    "set EVENT_AUTH=oidc"
                ),
            )
        payload = _unverified_payload(token)
        check_lifetime(payload, self._clock_skew, self._clock())
        return payload


def _unverified_payload(token: str) -> Mapping[str, object]:
    # Returns or raises our own error only, so that no exception quoting the token is chained.
    try:
        payload = jwt.decode(token, verify=False)  # type: ignore[no-untyped-call]
    except DECODE_ERRORS:
        payload = None
    if not isinstance(payload, Mapping):
        raise Unauthenticated("token is malformed")
    decoded: Mapping[str, object] = payload
    return decoded
