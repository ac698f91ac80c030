"""Eventarc's identity token (issue 4, item 1), against a certificates endpoint on loopback.

Tokens are signed with keys generated here and verified by the real google-auth code; nothing
is patched. Coroutines run under `asyncio.run`, one event loop per scenario.
"""

import asyncio
import base64
import json
import logging
import time
import traceback
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
from google.auth import crypt, jwt

from app.security.errors import WrongEventAuthMode
from app.security.oidc import (
    CertificatesUnavailable,
    Claims,
    EventAuthError,
    Forbidden,
    OidcVerifier,
    Unauthenticated,
)
from tests.fakes.oidc import (
    GOOGLE_ISSUER,
    INVOKER,
    OMIT,
    SERVICE_HOST,
    SERVICE_URL,
    CertsServer,
    SigningKey,
    mint_token,
    remove_signature,
)

# Cloud Run terminates TLS: the app sees plain http on the service's host.
REQUEST_URL = f"http://{SERVICE_HOST}/?__GCP_CloudEventsMode=GCS_NOTIFICATION"


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("google-key-1")


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return SigningKey.generate("google-key-2")


@pytest.fixture
def certs(key: SigningKey) -> Iterator[CertsServer]:
    with CertsServer(key) as server:
        yield server


@pytest.fixture
def monotonic() -> FakeMonotonic:
    return FakeMonotonic()


def make_verifier(certs: CertsServer, **options: Any) -> OidcVerifier:
    options.setdefault("invokers", frozenset({INVOKER}))
    return OidcVerifier(certs_url=certs.url, **options)


def verify_once(
    certs: CertsServer,
    authorization: str | None,
    request_url: str = REQUEST_URL,
    **options: Any,
) -> Claims:
    async def scenario() -> Claims:
        async with make_verifier(certs, **options) as verifier:
            return await verifier.verify(authorization, request_url)

    return asyncio.run(scenario())


def bearer(token: str) -> str:
    return f"Bearer {token}"


def segment(document: bytes) -> str:
    return base64.urlsafe_b64encode(document).rstrip(b"=").decode()


# --- a valid token ------------------------------------------------------------------------


def test_valid_token_yields_its_claims(certs: CertsServer, key: SigningKey) -> None:
    now = int(time.time())
    token = mint_token(key, iat=now, exp=now + 3600)

    claims = verify_once(certs, bearer(token))

    assert claims == Claims(
        email=INVOKER,
        sub="112233445566778899000",
        aud=SERVICE_URL,
        iss=GOOGLE_ISSUER,
        exp=now + 3600,
    )


def test_a_token_encoded_by_google_auth_itself_is_accepted(
    certs: CertsServer, key: SigningKey
) -> None:
    now = int(time.time())
    signer = crypt.RSASigner(key.private_key, key_id=key.kid)  # type: ignore[no-untyped-call]
    claims = {"iss": GOOGLE_ISSUER, "aud": SERVICE_URL, "sub": "1", "email": INVOKER}
    encoded: bytes = jwt.encode(  # type: ignore[no-untyped-call]
        signer, {**claims, "email_verified": True, "iat": now, "exp": now + 600}
    )

    assert verify_once(certs, bearer(encoded.decode())).email == INVOKER


@pytest.mark.parametrize("issuer", ["accounts.google.com", "https://accounts.google.com"])
def test_both_google_issuer_spellings_are_accepted(
    certs: CertsServer, key: SigningKey, issuer: str
) -> None:
    assert verify_once(certs, bearer(mint_token(key, iss=issuer))).iss == issuer


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_bearer_scheme_is_case_insensitive(
    certs: CertsServer, key: SigningKey, scheme: str
) -> None:
    assert verify_once(certs, f"{scheme} {mint_token(key)}").email == INVOKER


# --- 401: no token, or not a token ----------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "", "   ", "Bearer", "Bearer    "])
def test_missing_token_is_unauthenticated(certs: CertsServer, authorization: str | None) -> None:
    with pytest.raises(Unauthenticated, match=r"^missing bearer token$"):
        verify_once(certs, authorization)
    assert certs.fetches == 0


def test_non_bearer_schemes_are_unauthenticated(certs: CertsServer, key: SigningKey) -> None:
    token = mint_token(key)
    for authorization in ["Basic dXNlcjpwYXNzd29yZA==", f"Token {token}", token]:
        with pytest.raises(Unauthenticated, match=r"^authorization scheme is not Bearer$"):
            verify_once(certs, authorization)
    assert certs.fetches == 0


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "!!!.???.###",
        "Bearer.Bearer.Bearer",
        "x" * 10_000 + ".a.b",
        f"{segment(b'{not json')}.{segment(b'{}')}.{segment(b'sig')}",
        f"{segment(b'[1, 2]')}.{segment(b'{}')}.{segment(b'sig')}",
        f"{segment(bytes([0xFF, 0xFE]))}.{segment(b'{}')}.{segment(b'sig')}",
    ],
)
def test_garbage_token_is_unauthenticated(certs: CertsServer, token: str) -> None:
    with pytest.raises(Unauthenticated, match=r"^token is malformed$"):
        verify_once(certs, bearer(token))
    assert certs.fetches == 0


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"alg": "HS256"}, "token is not signed with RS256"),
        ({"alg": "none"}, "token is not signed with RS256"),
        ({"alg": OMIT}, "token is not signed with RS256"),
        ({"kid": OMIT}, "token has no key id"),
        ({"kid": ""}, "token has no key id"),
        ({"kid": 7}, "token has no key id"),
    ],
)
def test_token_header_must_name_rs256_and_a_key(
    certs: CertsServer, key: SigningKey, header: dict[str, object], reason: str
) -> None:
    with pytest.raises(Unauthenticated, match=f"^{reason}$"):
        verify_once(certs, bearer(mint_token(key, header=header)))


# --- 401: bad signature ---------------------------------------------------------------------


def test_token_signed_by_another_key_under_a_known_kid_is_unauthenticated(
    certs: CertsServer, key: SigningKey, other_key: SigningKey
) -> None:
    forged = mint_token(other_key, header={"kid": key.kid})

    with pytest.raises(Unauthenticated, match=r"^token signature is invalid$"):
        verify_once(certs, bearer(forged))
    assert certs.fetches == 1


def test_token_with_a_rewritten_payload_is_unauthenticated(
    certs: CertsServer, key: SigningKey
) -> None:
    header, _, signature = mint_token(key, email="someone-else@example.com").split(".")
    _, payload, _ = mint_token(key).split(".")

    with pytest.raises(Unauthenticated, match=r"^token signature is invalid$"):
        verify_once(certs, bearer(f"{header}.{payload}.{signature}"))


def test_unknown_kid_refetches_once_and_is_still_unauthenticated(
    certs: CertsServer, key: SigningKey, other_key: SigningKey, monotonic: FakeMonotonic
) -> None:
    async def scenario() -> None:
        async with make_verifier(certs, monotonic=monotonic) as verifier:
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            assert certs.fetches == 1

            monotonic.now += 31
            unknown = bearer(mint_token(other_key))
            with pytest.raises(Unauthenticated, match=r"^token is signed by an unknown key$"):
                await verifier.verify(unknown, REQUEST_URL)
            assert certs.fetches == 2

            with pytest.raises(Unauthenticated, match=r"^token is signed by an unknown key$"):
                await verifier.verify(unknown, REQUEST_URL)
            assert certs.fetches == 2

    asyncio.run(scenario())


def test_unknown_kids_within_the_refetch_interval_cause_no_fetch(
    certs: CertsServer, key: SigningKey, monotonic: FakeMonotonic
) -> None:
    async def scenario() -> None:
        async with make_verifier(certs, monotonic=monotonic) as verifier:
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            for n in range(20):
                monotonic.now += 1
                made_up = bearer(mint_token(key, header={"kid": f"made-up-{n}"}))
                with pytest.raises(Unauthenticated, match="unknown key"):
                    await verifier.verify(made_up, REQUEST_URL)
            assert certs.fetches == 1

            monotonic.now += 10
            with pytest.raises(Unauthenticated, match="unknown key"):
                await verifier.verify(made_up, REQUEST_URL)
            assert certs.fetches == 2

    asyncio.run(scenario())


def test_a_token_whose_signature_cloud_run_removed_is_refused_and_the_log_names_iam(
    certs: CertsServer, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    token = remove_signature(mint_token(key))

    with pytest.raises(WrongEventAuthMode, match=r"^token signature was removed") as caught:
        verify_once(certs, bearer(token))

    assert isinstance(caught.value, Unauthenticated)
    assert certs.fetches == 0
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        "token signature was removed by Cloud Run IAM: the service is private, set EVENT_AUTH=iam"
    )
    assert vars(warning)["event_auth"] == "oidc"
    assert token.split(".")[1] not in f"{warning.getMessage()}{vars(warning)!r}"


# --- 401: expiry ----------------------------------------------------------------------------


def test_token_expired_beyond_the_clock_skew_is_unauthenticated(
    certs: CertsServer, key: SigningKey
) -> None:
    now = int(time.time())
    expired = mint_token(key, iat=now - 3720, exp=now - 120)

    with pytest.raises(Unauthenticated, match=r"^token expired$"):
        verify_once(certs, bearer(expired), clock_skew=60)


def test_token_expired_within_the_clock_skew_is_accepted(
    certs: CertsServer, key: SigningKey
) -> None:
    now = int(time.time())
    just_expired = mint_token(key, iat=now - 3630, exp=now - 30)

    assert verify_once(certs, bearer(just_expired), clock_skew=60).exp == now - 30


def test_token_issued_in_the_future_is_unauthenticated(certs: CertsServer, key: SigningKey) -> None:
    now = int(time.time())
    early = mint_token(key, iat=now + 600, exp=now + 4200)

    with pytest.raises(Unauthenticated, match=r"^token used before it was issued$"):
        verify_once(certs, bearer(early), clock_skew=60)


def test_token_without_iat_or_exp_is_unauthenticated(certs: CertsServer, key: SigningKey) -> None:
    for token in [mint_token(key, iat=OMIT), mint_token(key, exp=OMIT)]:
        with pytest.raises(Unauthenticated, match=r"^token lacks iat or exp$"):
            verify_once(certs, bearer(token))


# --- 401: audience --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "audience",
    [
        "https://another-service-xyz-ew.a.run.app",
        f"https://{SERVICE_HOST}.evil.example",
        f"https://{SERVICE_HOST}.evil.example/",
        f"https://{SERVICE_HOST}evil.example/",
        f"https://{SERVICE_HOST}:8443/",
        f"http://{SERVICE_HOST}/",
        SERVICE_HOST,
        "32555940559.apps.googleusercontent.com",
        [SERVICE_URL],
        OMIT,
    ],
)
def test_token_for_another_audience_is_unauthenticated(
    certs: CertsServer, key: SigningKey, audience: object
) -> None:
    with pytest.raises(Unauthenticated, match=r"^token audience does not match this service$"):
        verify_once(certs, bearer(mint_token(key, aud=audience)))


@pytest.mark.parametrize(
    "audience",
    [
        SERVICE_URL,
        f"{SERVICE_URL}/",
        f"{SERVICE_URL}/?__GCP_CloudEventsMode=GCS_NOTIFICATION",
        f"{SERVICE_URL}/events/storage?a=1&b=2",
        f"{SERVICE_URL}?a=1",
    ],
)
def test_any_https_url_of_the_request_host_is_accepted_without_configured_audiences(
    certs: CertsServer, key: SigningKey, audience: str
) -> None:
    assert verify_once(certs, bearer(mint_token(key, aud=audience))).aud == audience


@pytest.mark.parametrize(
    ("request_url", "audience"),
    [
        (f"https://{SERVICE_HOST.upper()}/any/path?q=1", SERVICE_URL),
        (f"http://{SERVICE_HOST}:443/", SERVICE_URL),
        (f"http://{SERVICE_HOST}:80/", f"{SERVICE_URL}/"),
        ("http://localhost:8080/", "https://localhost:8080/"),
        ("http://[::1]:8080/", "https://[::1]:8080"),
    ],
)
def test_only_the_host_of_the_request_url_matters(
    certs: CertsServer, key: SigningKey, request_url: str, audience: str
) -> None:
    token = mint_token(key, aud=audience)

    assert verify_once(certs, bearer(token), request_url=request_url).aud == audience


@pytest.mark.parametrize(
    "request_url", ["http://localhost:8080/", "/relative/only", "", "http://host:99999/"]
)
def test_request_url_without_a_matching_host_matches_no_audience(
    certs: CertsServer, key: SigningKey, request_url: str
) -> None:
    token = mint_token(key, aud="https://localhost/")

    with pytest.raises(Unauthenticated, match="audience"):
        verify_once(certs, bearer(token), request_url=request_url)


def test_configured_audiences_replace_the_request_host(certs: CertsServer, key: SigningKey) -> None:
    audiences = frozenset({"https://events.example.com/notify", "notifier-events"})

    for audience in sorted(audiences):
        token = mint_token(key, aud=audience)
        assert verify_once(certs, bearer(token), audiences=audiences).aud == audience
    with pytest.raises(Unauthenticated, match=r"^token audience does not match this service$"):
        verify_once(certs, bearer(mint_token(key, aud=SERVICE_URL)), audiences=audiences)


# --- 401: issuer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "issuer",
    [
        "https://evil.example",
        "accounts.google.com.evil.example",
        "http://accounts.google.com",
        "https://securetoken.google.com/example-project",
        ["accounts.google.com"],
        OMIT,
    ],
)
def test_token_of_another_issuer_is_unauthenticated(
    certs: CertsServer, key: SigningKey, issuer: object
) -> None:
    with pytest.raises(Unauthenticated, match=r"^token issuer is not Google$"):
        verify_once(certs, bearer(mint_token(key, iss=issuer)))


def test_token_with_malformed_claims_is_unauthenticated(
    certs: CertsServer, key: SigningKey
) -> None:
    for token in [mint_token(key, sub=OMIT), mint_token(key, sub=42)]:
        with pytest.raises(Unauthenticated, match=r"^token claims are malformed$"):
            verify_once(certs, bearer(token))
    # google-auth itself trips over an exp it cannot add the clock skew to.
    with pytest.raises(Unauthenticated, match=r"^token is malformed$"):
        verify_once(certs, bearer(mint_token(key, exp="tomorrow")))


# --- 403: a genuine token of the wrong identity -------------------------------------------


@pytest.mark.parametrize("verified", [False, "true", 1, OMIT])
def test_unverified_email_is_forbidden(
    certs: CertsServer, key: SigningKey, verified: object
) -> None:
    with pytest.raises(Forbidden, match=r"^email not verified$"):
        verify_once(certs, bearer(mint_token(key, email_verified=verified)))


@pytest.mark.parametrize(
    "email",
    [
        "someone-else@example-project.iam.gserviceaccount.com",
        "user@gmail.com",
        f"{INVOKER}.evil.example",
    ],
)
def test_token_of_another_account_is_forbidden(
    certs: CertsServer, key: SigningKey, email: str
) -> None:
    with pytest.raises(Forbidden, match=r"^service account is not an allowed invoker$") as caught:
        verify_once(certs, bearer(mint_token(key, email=email)))
    assert not isinstance(caught.value, Unauthenticated)


def test_token_without_email_is_forbidden(certs: CertsServer, key: SigningKey) -> None:
    with pytest.raises(Forbidden, match=r"^token carries no email$"):
        verify_once(certs, bearer(mint_token(key, email=OMIT)))


def test_invokers_are_compared_case_insensitively(certs: CertsServer, key: SigningKey) -> None:
    token = mint_token(key, email=INVOKER.upper())
    invokers = frozenset({"other@example.iam.gserviceaccount.com", INVOKER.title()})

    assert verify_once(certs, bearer(token), invokers=invokers).email == INVOKER.upper()


def test_a_verifier_without_invokers_is_refused() -> None:
    with pytest.raises(ValueError, match="invoker"):
        OidcVerifier(certs_url="http://127.0.0.1:9/", invokers=frozenset())


# --- certificates: cache, rotation, coalescing ---------------------------------------------


def test_known_kid_is_never_refetched_while_the_cache_is_fresh(
    certs: CertsServer, key: SigningKey, monotonic: FakeMonotonic
) -> None:
    certs.cache_control = "public, max-age=120, must-revalidate, no-transform"

    async def scenario() -> None:
        async with make_verifier(certs, monotonic=monotonic) as verifier:
            for _ in range(10):
                await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            monotonic.now += 119
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            assert certs.fetches == 1

            monotonic.now += 2
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            assert certs.fetches == 2

    asyncio.run(scenario())


def test_cache_lasts_an_hour_without_max_age(
    certs: CertsServer, key: SigningKey, monotonic: FakeMonotonic
) -> None:
    certs.cache_control = None

    async def scenario() -> None:
        async with make_verifier(certs, monotonic=monotonic) as verifier:
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            monotonic.now += 3599
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            assert certs.fetches == 1

            monotonic.now += 2
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            assert certs.fetches == 2

    asyncio.run(scenario())


def test_key_rotation_costs_exactly_one_refetch(
    certs: CertsServer, key: SigningKey, other_key: SigningKey, monotonic: FakeMonotonic
) -> None:
    async def scenario() -> None:
        async with make_verifier(certs, monotonic=monotonic) as verifier:
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            assert certs.fetches == 1

            certs.publish(other_key)
            monotonic.now += 31
            claims = await verifier.verify(bearer(mint_token(other_key)), REQUEST_URL)
            assert claims.email == INVOKER
            assert certs.fetches == 2

            for signer in [other_key, key, other_key]:
                await verifier.verify(bearer(mint_token(signer)), REQUEST_URL)
            assert certs.fetches == 2

    asyncio.run(scenario())


def test_withdrawn_key_is_refused_once_the_cache_expires(
    certs: CertsServer, key: SigningKey, other_key: SigningKey, monotonic: FakeMonotonic
) -> None:
    certs.publish(other_key)
    certs.cache_control = "max-age=300"

    async def scenario() -> None:
        async with make_verifier(certs, monotonic=monotonic) as verifier:
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            certs.withdraw(key.kid)
            monotonic.now += 301
            with pytest.raises(Unauthenticated, match="unknown key"):
                await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            await verifier.verify(bearer(mint_token(other_key)), REQUEST_URL)
            assert certs.fetches == 2

    asyncio.run(scenario())


def test_concurrent_verifications_with_an_unknown_kid_share_one_fetch(
    certs: CertsServer, other_key: SigningKey
) -> None:
    certs.delay = 0.2
    unknown = bearer(mint_token(other_key))

    async def scenario() -> list[Claims | BaseException]:
        async with make_verifier(certs) as verifier:
            return await asyncio.gather(
                *(verifier.verify(unknown, REQUEST_URL) for _ in range(50)),
                return_exceptions=True,
            )

    outcomes = asyncio.run(scenario())

    assert certs.fetches == 1
    assert all(isinstance(outcome, Unauthenticated) for outcome in outcomes)


def test_concurrent_verifications_with_a_new_kid_share_one_refetch(
    certs: CertsServer, key: SigningKey, other_key: SigningKey, monotonic: FakeMonotonic
) -> None:
    async def scenario() -> list[Claims]:
        async with make_verifier(certs, monotonic=monotonic) as verifier:
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            certs.publish(other_key)
            certs.delay = 0.2
            monotonic.now += 31
            return await asyncio.gather(
                *(verifier.verify(bearer(mint_token(other_key)), REQUEST_URL) for _ in range(50))
            )

    claims = asyncio.run(scenario())

    assert certs.fetches == 2
    assert {c.email for c in claims} == {INVOKER}


def test_a_closed_verifier_keeps_its_certificates_and_fetches_again_in_a_new_loop(
    certs: CertsServer, key: SigningKey, monotonic: FakeMonotonic
) -> None:
    verifier = make_verifier(certs, monotonic=monotonic)

    async def verify_then_close() -> Claims:
        try:
            return await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
        finally:
            await verifier.close()

    assert asyncio.run(verify_then_close()).email == INVOKER
    assert asyncio.run(verify_then_close()).email == INVOKER  # cached: no fetch
    assert certs.fetches == 1

    monotonic.now += 3601
    assert asyncio.run(verify_then_close()).email == INVOKER
    assert certs.fetches == 2


# --- 503: certificates unavailable ----------------------------------------------------------


@pytest.mark.parametrize(
    "outage",
    [
        "refused",
        "hung up",
        "http 500",
        "not json",
        "not utf-8",
        "not an object",
        "no certificates",
        "unreadable pem",
    ],
)
def test_unreachable_certificates_are_a_distinct_error(
    certs: CertsServer, key: SigningKey, outage: str
) -> None:
    match outage:
        case "refused":
            certs.stop()
        case "hung up":
            certs.hang_up = True
        case "http 500":
            certs.status = 500
        case "not json":
            certs.body = b"<html>Service Unavailable</html>"
        case "not utf-8":
            certs.body = b'{"k": "\xff"}'
        case "not an object":
            certs.body = b'["a", "b"]'
        case "no certificates":
            certs.body = b"{}"
        case "unreadable pem":
            certs.body = json.dumps({key.kid: "-----BEGIN CERTIFICATE-----\nAAAA"}).encode()

    with pytest.raises(CertificatesUnavailable) as caught:
        verify_once(certs, bearer(mint_token(key)))
    assert not isinstance(caught.value, Unauthenticated | Forbidden)
    assert str(caught.value) == "Google's signing certificates are unavailable"


def test_a_redirect_is_not_followed(
    certs: CertsServer, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    with CertsServer(key) as elsewhere:
        certs.redirect_to = elsewhere.url

        with pytest.raises(CertificatesUnavailable):
            verify_once(certs, bearer(mint_token(key)))

        assert (certs.fetches, elsewhere.fetches) == (1, 0)
    [warning] = [r for r in caplog.records if r.getMessage().startswith("could not fetch")]
    assert vars(warning)["error"] == "certificates endpoint answered HTTP 302"


def test_a_certificates_endpoint_slower_than_the_fetch_timeout_is_unavailable(
    certs: CertsServer, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    certs.delay = 1.0

    started = time.monotonic()
    with pytest.raises(CertificatesUnavailable):
        verify_once(certs, bearer(mint_token(key)), fetch_timeout=0.2)

    assert time.monotonic() - started < 0.9
    [warning] = [r for r in caplog.records if r.getMessage().startswith("could not fetch")]
    assert vars(warning)["error"] == "no answer in time"


def test_an_outage_is_not_retried_on_every_request(
    certs: CertsServer, key: SigningKey, monotonic: FakeMonotonic
) -> None:
    certs.status = 503

    async def scenario() -> None:
        async with make_verifier(certs, monotonic=monotonic) as verifier:
            for _ in range(5):
                with pytest.raises(CertificatesUnavailable):
                    await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
                monotonic.now += 5
            assert certs.fetches == 1

            certs.status = 200
            monotonic.now += 10
            assert (await verifier.verify(bearer(mint_token(key)), REQUEST_URL)).email == INVOKER
            assert certs.fetches == 2

    asyncio.run(scenario())


def test_cached_certificates_outlive_a_failed_refresh(
    certs: CertsServer, key: SigningKey, monotonic: FakeMonotonic
) -> None:
    certs.cache_control = "max-age=60"

    async def scenario() -> None:
        async with make_verifier(certs, monotonic=monotonic) as verifier:
            await verifier.verify(bearer(mint_token(key)), REQUEST_URL)
            certs.status = 500
            monotonic.now += 61
            assert (await verifier.verify(bearer(mint_token(key)), REQUEST_URL)).email == INVOKER
            assert certs.fetches == 2

    asyncio.run(scenario())


# --- the token never leaks ------------------------------------------------------------------


def test_no_error_or_log_record_contains_the_token(
    certs: CertsServer,
    key: SigningKey,
    other_key: SigningKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    now = int(time.time())
    valid = mint_token(key)
    header, payload, signature = valid.split(".")
    tokens = [
        valid,
        mint_token(key, email="someone-else@example.com"),
        mint_token(key, email_verified=False),
        mint_token(other_key, header={"kid": key.kid}),
        mint_token(other_key),
        mint_token(key, iat=now - 7200, exp=now - 3600),
        mint_token(key, iat=now + 7200, exp=now + 9000),
        mint_token(key, aud="https://elsewhere.example"),
        mint_token(key, iss="https://evil.example"),
        mint_token(key, header={"alg": "HS256"}),
        f"{segment(b'{not json')}.{payload}.{signature}",
        f"{header}.{segment(b'{broken')}.{signature}",
        f"{header}.{payload}.{signature}.{signature}",
    ]
    attempts = [bearer(token) for token in tokens] + [valid, f"Basic {valid}"]

    async def scenario() -> list[Claims | BaseException]:
        async with make_verifier(certs) as verifier:
            return [
                await _outcome(verifier.verify(authorization, REQUEST_URL))
                for authorization in attempts
            ]

    outcomes = asyncio.run(scenario())

    assert isinstance(outcomes[0], Claims)
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(errors) == len(attempts) - 1
    assert all(isinstance(error, EventAuthError) for error in errors)
    secrets = [*tokens, payload, signature]
    for error in errors:
        assert error.__cause__ is None
        assert error.__context__ is None
        shown = f"{error}\n{error!r}\n{''.join(traceback.format_exception(error))}"
        assert not [secret for secret in secrets if secret in shown]
    refusals = [r for r in caplog.records if r.getMessage() == "event delivery refused"]
    assert len(refusals) == len(errors)
    for record in caplog.records:
        logged = f"{record.getMessage()}\n{vars(record)!r}"
        assert not [secret for secret in secrets if secret in logged]


async def _outcome(verification: Awaitable[Claims]) -> Claims | BaseException:
    try:
        claims = await verification
    except EventAuthError as error:
        return error
    return claims
