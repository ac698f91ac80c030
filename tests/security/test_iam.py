"""EVENT_AUTH=iam (issue 9, item 1): the token Cloud Run IAM checked, without its signature.

Tokens are minted and signed as Google's are, then their signature is replaced the way Cloud Run
IAM does it for a private service. Nothing is patched; coroutines run under `asyncio.run`.
"""

import asyncio
import base64
import json
import logging
import time
import traceback
from collections.abc import Awaitable
from typing import Any

import pytest

from app.security.errors import (
    EventAuthError,
    Forbidden,
    Unauthenticated,
    WrongEventAuthMode,
)
from app.security.iam import IamVerifier
from app.security.tokens import Claims
from tests.fakes.oidc import (
    GOOGLE_ISSUER,
    INVOKER,
    OMIT,
    SERVICE_HOST,
    SERVICE_URL,
    SigningKey,
    mint_token,
    remove_signature,
)

# Cloud Run terminates TLS: the app sees plain http on the service's host.
REQUEST_URL = f"http://{SERVICE_HOST}/?__GCP_CloudEventsMode=GCS_NOTIFICATION"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("google-key-1")


def forwarded(key: SigningKey, *, header: dict[str, object] | None = None, **claims: object) -> str:
    """`Authorization` as a private service receives it: Google's token, signature removed."""
    return f"Bearer {remove_signature(mint_token(key, header=header, **claims))}"


def verify_once(
    authorization: str | None,
    request_url: str = REQUEST_URL,
    *,
    serverless_authorization: str | None = None,
    **options: Any,
) -> Claims:
    options.setdefault("invokers", frozenset({INVOKER}))

    async def scenario() -> Claims:
        async with IamVerifier(**options) as verifier:
            return await verifier.verify(
                authorization, request_url, serverless_authorization=serverless_authorization
            )

    return asyncio.run(scenario())


def segment(document: bytes) -> str:
    return base64.urlsafe_b64encode(document).rstrip(b"=").decode()


def unsigned(payload: bytes, header: bytes = b'{"alg": "RS256", "kid": "k", "typ": "JWT"}') -> str:
    return f"Bearer {segment(header)}.{segment(payload)}.SIGNATURE_REMOVED_BY_GOOGLE"


# --- accepted -------------------------------------------------------------------------------


def test_the_invokers_token_with_its_signature_removed_yields_its_claims(key: SigningKey) -> None:
    now = int(time.time())

    claims = verify_once(forwarded(key, iat=now, exp=now + 3600))

    assert claims == Claims(
        email=INVOKER,
        sub="112233445566778899000",
        aud=SERVICE_URL,
        iss=GOOGLE_ISSUER,
        exp=now + 3600,
    )


@pytest.mark.parametrize("issuer", ["accounts.google.com", "https://accounts.google.com"])
def test_both_google_issuer_spellings_are_accepted(key: SigningKey, issuer: str) -> None:
    assert verify_once(forwarded(key, iss=issuer)).iss == issuer


def test_the_key_id_does_not_matter_since_no_signature_is_checked(key: SigningKey) -> None:
    assert verify_once(forwarded(key, header={"kid": OMIT})).email == INVOKER


def test_invokers_are_compared_case_insensitively(key: SigningKey) -> None:
    invokers = frozenset({INVOKER.title()})

    assert verify_once(forwarded(key, email=INVOKER.upper()), invokers=invokers).email == (
        INVOKER.upper()
    )


def test_a_verifier_without_invokers_is_refused() -> None:
    with pytest.raises(ValueError, match="invoker"):
        IamVerifier(invokers=frozenset())


# --- 403: another principal holding run.invoker ---------------------------------------------


@pytest.mark.parametrize(
    "email",
    [
        "someone-else@example-project.iam.gserviceaccount.com",
        "user@gmail.com",
        f"{INVOKER}.evil.example",
    ],
)
def test_another_accounts_token_is_forbidden(key: SigningKey, email: str) -> None:
    with pytest.raises(Forbidden, match=r"^service account is not an allowed invoker$"):
        verify_once(forwarded(key, email=email))


@pytest.mark.parametrize("verified", [False, "true", 1, OMIT])
def test_unverified_email_is_forbidden(key: SigningKey, verified: object) -> None:
    with pytest.raises(Forbidden, match=r"^email not verified$"):
        verify_once(forwarded(key, email_verified=verified))


def test_token_without_email_is_forbidden(key: SigningKey) -> None:
    with pytest.raises(Forbidden, match=r"^token carries no email$"):
        verify_once(forwarded(key, email=OMIT))


# --- 401: expiry, with the clock skew of oidc -----------------------------------------------


def test_token_expired_beyond_the_clock_skew_is_unauthenticated(key: SigningKey) -> None:
    now = int(time.time())

    with pytest.raises(Unauthenticated, match=r"^token expired$"):
        verify_once(forwarded(key, iat=now - 3720, exp=now - 120), clock_skew=60)


def test_token_expired_within_the_clock_skew_is_accepted(key: SigningKey) -> None:
    now = int(time.time())

    assert verify_once(forwarded(key, iat=now - 3630, exp=now - 30), clock_skew=60).exp == now - 30


def test_expiry_is_judged_by_the_verifiers_clock(key: SigningKey) -> None:
    now = int(time.time())
    token = forwarded(key, iat=now, exp=now + 3600)

    assert verify_once(token, clock=lambda: now + 3600 + 59).email == INVOKER
    with pytest.raises(Unauthenticated, match=r"^token expired$"):
        verify_once(token, clock=lambda: now + 3600 + 61)


def test_token_issued_in_the_future_is_unauthenticated(key: SigningKey) -> None:
    now = int(time.time())

    with pytest.raises(Unauthenticated, match=r"^token used before it was issued$"):
        verify_once(forwarded(key, iat=now + 600, exp=now + 4200), clock_skew=60)


def test_token_without_iat_or_exp_is_unauthenticated(key: SigningKey) -> None:
    for token in [forwarded(key, iat=OMIT), forwarded(key, exp=OMIT)]:
        with pytest.raises(Unauthenticated, match=r"^token lacks iat or exp$"):
            verify_once(token)


@pytest.mark.parametrize(
    "times",
    [
        {"exp": "tomorrow"},
        {"iat": "today"},
        {"exp": None},
        {"exp": True},
        {"iat": [1]},
        {"iat": int(time.time()) + 60, "exp": int(time.time()) + 30},  # expires before issued
    ],
)
def test_token_with_nonsense_times_is_unauthenticated(
    key: SigningKey, times: dict[str, Any]
) -> None:
    token = remove_signature(mint_token(key, **times))

    with pytest.raises(Unauthenticated, match=r"^token is malformed$"):
        verify_once(f"Bearer {token}")


def test_a_token_that_never_expires_is_unauthenticated() -> None:
    # JSON has no infinity, but Python's json module reads one; Google never writes it.
    now = int(time.time())
    claims = {"iss": GOOGLE_ISSUER, "aud": SERVICE_URL, "sub": "1", "email": INVOKER, "iat": now}
    payload = json.dumps({**claims, "email_verified": True, "exp": float("inf")})
    assert '"exp": Infinity' in payload

    with pytest.raises(Unauthenticated, match=r"^token is malformed$"):
        verify_once(unsigned(payload.encode()))


# --- 401: audience and issuer, the same rules as oidc ---------------------------------------


@pytest.mark.parametrize(
    "audience",
    [
        "https://another-service-xyz-ew.a.run.app",
        f"https://{SERVICE_HOST}.evil.example/",
        f"https://{SERVICE_HOST}:8443/",
        f"http://{SERVICE_HOST}/",
        SERVICE_HOST,
        [SERVICE_URL],
        OMIT,
    ],
)
def test_token_for_another_audience_is_unauthenticated(key: SigningKey, audience: object) -> None:
    with pytest.raises(Unauthenticated, match=r"^token audience does not match this service$"):
        verify_once(forwarded(key, aud=audience))


def test_any_https_url_of_the_request_host_is_accepted_without_configured_audiences(
    key: SigningKey,
) -> None:
    audience = f"{SERVICE_URL}/?__GCP_CloudEventsMode=GCS_NOTIFICATION"

    assert verify_once(forwarded(key, aud=audience)).aud == audience


def test_configured_audiences_replace_the_request_host(key: SigningKey) -> None:
    audiences = frozenset({"https://events.example.com/notify"})

    token = forwarded(key, aud="https://events.example.com/notify")
    assert verify_once(token, audiences=audiences).aud == "https://events.example.com/notify"
    with pytest.raises(Unauthenticated, match=r"^token audience does not match this service$"):
        verify_once(forwarded(key, aud=SERVICE_URL), audiences=audiences)


@pytest.mark.parametrize(
    "issuer", ["https://evil.example", "http://accounts.google.com", ["accounts.google.com"], OMIT]
)
def test_token_of_another_issuer_is_unauthenticated(key: SigningKey, issuer: object) -> None:
    with pytest.raises(Unauthenticated, match=r"^token issuer is not Google$"):
        verify_once(forwarded(key, iss=issuer))


def test_token_with_malformed_claims_is_unauthenticated(key: SigningKey) -> None:
    for token in [forwarded(key, sub=OMIT), forwarded(key, sub=42)]:
        with pytest.raises(Unauthenticated, match=r"^token claims are malformed$"):
            verify_once(token)


# --- 401: a signed token means Cloud Run did not check it ----------------------------------


def test_a_fully_signed_token_is_refused_and_the_log_names_oidc(
    key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    token = mint_token(key)

    with pytest.raises(WrongEventAuthMode, match=r"^token is signed") as caught:
        verify_once(f"Bearer {token}")

    assert isinstance(caught.value, Unauthenticated)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        "token is signed, so Cloud Run did not check it (the service is public?): "
        "set EVENT_AUTH=oidc"
    )
    assert vars(warning)["event_auth"] == "iam"
    assert token.split(".")[2] not in f"{warning.getMessage()}{vars(warning)!r}"


@pytest.mark.parametrize(
    "signature",
    ["signature_removed_by_google", "SIGNATURE_REMOVED_BY_GOOGLEX", "XSIGNATURE_REMOVED_BY_GOOGLE"],
)
def test_only_the_exact_marker_counts_as_removed(key: SigningKey, signature: str) -> None:
    signed_part = mint_token(key).rpartition(".")[0]

    with pytest.raises(WrongEventAuthMode):
        verify_once(f"Bearer {signed_part}.{signature}")


# --- 401: no token, or not a token ----------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "", "   ", "Bearer", "Bearer    "])
def test_missing_token_is_unauthenticated(authorization: str | None) -> None:
    with pytest.raises(Unauthenticated, match=r"^missing bearer token$"):
        verify_once(authorization)


def test_non_bearer_schemes_are_unauthenticated(key: SigningKey) -> None:
    token = remove_signature(mint_token(key))
    for authorization in ["Basic dXNlcjpwYXNzd29yZA==", f"Token {token}", token]:
        with pytest.raises(Unauthenticated, match=r"^authorization scheme is not Bearer$"):
            verify_once(authorization)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer garbage",
        "Bearer a.b",
        "Bearer a.b.SIGNATURE_REMOVED_BY_GOOGLE",
        "Bearer a.b.c.SIGNATURE_REMOVED_BY_GOOGLE",
        "Bearer !!!.???.SIGNATURE_REMOVED_BY_GOOGLE",
        "Bearer " + "x" * 10_000 + ".a.SIGNATURE_REMOVED_BY_GOOGLE",
        unsigned(b"{}", header=b"{not json"),
        unsigned(b"{not json"),
        unsigned(b"[1, 2]"),
        unsigned(b'"a string"'),
        unsigned(bytes([0xFF, 0xFE])),
    ],
)
def test_malformed_token_is_unauthenticated(authorization: str) -> None:
    with pytest.raises(Unauthenticated, match=r"^token is malformed$"):
        verify_once(authorization)


@pytest.mark.parametrize("alg", ["HS256", "none", OMIT])
def test_a_header_google_does_not_write_is_unauthenticated(key: SigningKey, alg: object) -> None:
    with pytest.raises(Unauthenticated, match=r"^token is not signed with RS256$"):
        verify_once(forwarded(key, header={"alg": alg}))


# --- X-Serverless-Authorization: the token IAM checked is the one trusted -------------------


def test_with_x_serverless_authorization_the_authorization_header_is_ignored(
    key: SigningKey,
) -> None:
    # Cloud Run IAM checks X-Serverless-Authorization when a caller sends it and leaves
    # Authorization alone: whatever is there was written by the caller, not checked by Google.
    stranger = forwarded(key, email="someone@example-project.iam.gserviceaccount.com")
    forged = unsigned(
        json.dumps(
            {
                "iss": GOOGLE_ISSUER,
                "aud": SERVICE_URL,
                "sub": "1",
                "email": INVOKER,
                "email_verified": True,
                "iat": int(time.time()),
                "exp": int(time.time()) + 3600,
            }
        ).encode()
    )

    assert verify_once(forged).email == INVOKER  # alone, it would pass: only IAM stops it
    with pytest.raises(Forbidden, match="not an allowed invoker"):
        verify_once(forged, serverless_authorization=stranger)
    assert verify_once("Bearer garbage", serverless_authorization=forwarded(key)).email == INVOKER


# --- the token never leaks ------------------------------------------------------------------


def test_no_error_or_log_record_contains_the_token(
    key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    now = int(time.time())
    valid = remove_signature(mint_token(key))
    header, payload, _ = valid.split(".")
    signed = mint_token(key)
    tokens = [
        valid,
        remove_signature(mint_token(key, email="someone-else@example.com")),
        remove_signature(mint_token(key, email_verified=False)),
        remove_signature(mint_token(key, iat=now - 7200, exp=now - 3600)),
        remove_signature(mint_token(key, iat=now + 7200, exp=now + 9000)),
        remove_signature(mint_token(key, aud="https://elsewhere.example")),
        remove_signature(mint_token(key, exp="tomorrow")),
        signed,
        f"{segment(b'{not json')}.{payload}.SIGNATURE_REMOVED_BY_GOOGLE",
        f"{header}.{segment(b'{broken')}.SIGNATURE_REMOVED_BY_GOOGLE",
    ]
    attempts = [f"Bearer {token}" for token in tokens] + [valid, f"Basic {valid}"]

    async def scenario() -> list[Claims | BaseException]:
        async with IamVerifier(invokers=frozenset({INVOKER})) as verifier:
            return [
                await _outcome(verifier.verify(authorization, REQUEST_URL))
                for authorization in attempts
            ]

    outcomes = asyncio.run(scenario())

    assert isinstance(outcomes[0], Claims)
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(errors) == len(attempts) - 1
    secrets = [*tokens, payload, signed.split(".")[1], signed.split(".")[2]]
    for error in errors:
        assert isinstance(error, EventAuthError)
        assert error.__cause__ is None
        assert error.__context__ is None
        shown = f"{error}\n{error!r}\n{''.join(traceback.format_exception(error))}"
        assert not [secret for secret in secrets if secret in shown]
    assert caplog.records
    for record in caplog.records:
        logged = f"{record.getMessage()}\n{vars(record)!r}"
        assert not [secret for secret in secrets if secret in logged]


async def _outcome(verification: Awaitable[Claims]) -> Claims | BaseException:
    try:
        claims = await verification
    except EventAuthError as error:
        return error
    return claims


def test_a_configured_audience_matches_with_or_without_a_trailing_slash(key: SigningKey) -> None:
    audiences = frozenset({"https://notifier-123.us-central1.run.app"})
    for aud in (
        "https://notifier-123.us-central1.run.app/",
        "https://notifier-123.us-central1.run.app",
    ):
        assert verify_once(forwarded(key, aud=aud), audiences=audiences).aud == aud


def test_an_audience_mismatch_logs_the_tokens_audience_so_it_can_be_configured(
    key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    audiences = frozenset({"https://notifier-123.us-central1.run.app"})
    token = forwarded(key, aud="https://notifier-abcdefgh-uc.a.run.app")
    with pytest.raises(Unauthenticated):
        verify_once(token, audiences=audiences)
    [record] = [r for r in caplog.records if r.getMessage().startswith("token audience")]
    assert record.levelname == "WARNING"
    assert getattr(record, "token_audience", None) == "https://notifier-abcdefgh-uc.a.run.app"
    assert token not in caplog.text
