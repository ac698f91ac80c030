"""EVENT_AUTH=oidc and iam end to end: only a listed invoker's token gets an event notified."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import outbox_settings, read_outbox
from tests.factories import EVENTARC_PATH, binary
from tests.fakes.oidc import (
    INVOKER,
    SERVICE_HOST,
    SERVICE_URL,
    CertsServer,
    SigningKey,
    mint_token,
    remove_signature,
)
from tests.servers import ThreadedServer


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("key-1")


@pytest.fixture(scope="module")
def stranger_key() -> SigningKey:
    return SigningKey.generate("key-1")  # same kid, different key: a forgery


@pytest.fixture
def certs(key: SigningKey) -> Iterator[CertsServer]:
    with CertsServer(key) as server:
        yield server


@pytest.fixture
def service(certs: CertsServer, tmp_path: Path) -> Iterator[ThreadedServer]:
    settings = outbox_settings(
        tmp_path, event_auth="oidc", event_invokers=[INVOKER], oidc_certs_url=certs.url
    )
    with ThreadedServer(settings) as server:
        yield server


def deliver(
    service: ThreadedServer,
    authorization: str | None,
    *,
    serverless_authorization: str | None = None,
) -> httpx.Response:
    headers, body = binary()
    headers["host"] = SERVICE_HOST  # the audience Eventarc mints the token for
    if authorization is not None:
        headers["authorization"] = authorization
    if serverless_authorization is not None:
        headers["x-serverless-authorization"] = serverless_authorization
    return httpx.post(service.url + EVENTARC_PATH, headers=headers, content=body, timeout=10)


def test_a_valid_token_of_the_trigger_account_gets_the_event_notified(
    service: ThreadedServer, key: SigningKey, tmp_path: Path
) -> None:
    answer = deliver(service, f"Bearer {mint_token(key)}")
    assert answer.status_code == 200
    assert answer.json()["status"] == "sent"
    assert read_outbox(tmp_path / "outbox")  # one message per recipient


def test_push_endpoint_audience_with_path_and_query_is_accepted(
    service: ThreadedServer, key: SigningKey
) -> None:
    token = mint_token(key, aud=f"{SERVICE_URL}/?__GCP_CloudEventsMode=GCS_NOTIFICATION")
    assert deliver(service, f"Bearer {token}").status_code == 200


def now() -> int:
    return int(time.time())


REFUSED_401 = {
    "no token": lambda key, stranger: None,
    "not bearer": lambda key, stranger: f"Basic {mint_token(key)}",
    "garbage": lambda key, stranger: "Bearer not.a.jwt",
    "forged signature": lambda key, stranger: f"Bearer {mint_token(stranger)}",
    "expired": lambda key, stranger: (
        f"Bearer {mint_token(key, iat=now() - 7200, exp=now() - 3600)}"
    ),
    "wrong audience": lambda key, stranger: f"Bearer {mint_token(key, aud='https://evil.example')}",
    "wrong issuer": lambda key, stranger: f"Bearer {mint_token(key, iss='https://evil.example')}",
}


@pytest.mark.parametrize("make", REFUSED_401.values(), ids=REFUSED_401.keys())
def test_missing_or_invalid_tokens_get_401_and_no_email(
    service: ThreadedServer, key: SigningKey, stranger_key: SigningKey, tmp_path: Path, make: object
) -> None:
    authorization = make(key, stranger_key)  # type: ignore[operator]
    answer = deliver(service, authorization)
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["www-authenticate"].startswith("Bearer")
    if authorization:
        assert authorization.split(" ", 1)[1] not in answer.text
    assert read_outbox(tmp_path / "outbox") == []


OTHER_IDENTITIES = {
    "another account": lambda key: mint_token(key, email="someone@example.iam.gserviceaccount.com"),
    "unverified email": lambda key: mint_token(key, email_verified=False),
}


@pytest.mark.parametrize("make", OTHER_IDENTITIES.values(), ids=OTHER_IDENTITIES.keys())
def test_valid_tokens_of_other_identities_get_403(
    service: ThreadedServer, key: SigningKey, tmp_path: Path, make: object
) -> None:
    answer = deliver(service, f"Bearer {make(key)}")  # type: ignore[operator]
    assert answer.status_code == 403
    assert read_outbox(tmp_path / "outbox") == []


def test_unreachable_certificates_answer_503_so_eventarc_retries(
    service: ThreadedServer, certs: CertsServer, key: SigningKey
) -> None:
    certs.stop()
    answer = deliver(service, f"Bearer {mint_token(key)}")
    assert answer.status_code == 503
    assert "retry-after" in answer.headers


def test_certificates_are_not_fetched_per_request(
    service: ThreadedServer, certs: CertsServer, key: SigningKey
) -> None:
    for _ in range(5):
        assert deliver(service, f"Bearer {mint_token(key)}").status_code == 200
    assert certs.fetches == 1


def test_datetime_and_healthz_stay_public(service: ThreadedServer) -> None:
    assert httpx.get(service.url + "/datetime?requester=John").status_code == 200
    assert httpx.get(service.url + "/healthz").status_code == 200


def test_oidc_without_invokers_is_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="EVENT_INVOKERS"):
        outbox_settings(tmp_path, event_auth="oidc", event_invokers=[])


# --- EVENT_AUTH=iam: a private service, Cloud Run IAM checked the signature (issue 9, item 1) --


@pytest.fixture
def private_service(tmp_path: Path) -> Iterator[ThreadedServer]:
    settings = outbox_settings(tmp_path, event_auth="iam", event_invokers=[INVOKER])
    with ThreadedServer(settings) as server:
        yield server


def forwarded(token: str) -> str:
    """What a private service receives once Cloud Run IAM has checked the token."""
    return f"Bearer {remove_signature(token)}"


def test_iam_the_invokers_token_without_signature_gets_the_event_notified(
    private_service: ThreadedServer, key: SigningKey, tmp_path: Path
) -> None:
    answer = deliver(private_service, forwarded(mint_token(key)))
    assert answer.status_code == 200
    assert answer.json()["status"] == "sent"
    assert read_outbox(tmp_path / "outbox")  # one message per recipient


IAM_REFUSED = {
    "another account": (403, lambda key: forwarded(mint_token(key, email="x@example.com"))),
    "unverified email": (403, lambda key: forwarded(mint_token(key, email_verified=False))),
    "expired": (401, lambda key: forwarded(mint_token(key, iat=now() - 7200, exp=now() - 3600))),
    "wrong audience": (401, lambda key: forwarded(mint_token(key, aud="https://evil.example"))),
    "no token": (401, lambda key: None),
    "malformed": (401, lambda key: "Bearer not.a.SIGNATURE_REMOVED_BY_GOOGLE"),
}


@pytest.mark.parametrize(("status", "make"), IAM_REFUSED.values(), ids=IAM_REFUSED.keys())
def test_iam_other_identities_and_bad_tokens_are_refused_and_send_nothing(
    private_service: ThreadedServer, key: SigningKey, tmp_path: Path, status: int, make: object
) -> None:
    authorization = make(key)  # type: ignore[operator]
    answer = deliver(private_service, authorization)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/problem+json"
    if authorization:
        assert authorization.split(" ", 1)[1] not in answer.text
    assert read_outbox(tmp_path / "outbox") == []


def test_iam_a_signed_token_gets_401_and_a_log_line_naming_oidc(
    private_service: ThreadedServer,
    key: SigningKey,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = mint_token(key)
    with caplog.at_level(logging.WARNING):
        answer = deliver(private_service, f"Bearer {token}")
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert token not in answer.text
    assert any("set EVENT_AUTH=oidc" in record.getMessage() for record in caplog.records)
    assert not [r for r in caplog.records if token.split(".")[2] in f"{r.getMessage()}{vars(r)}"]
    assert read_outbox(tmp_path / "outbox") == []


def test_oidc_a_token_without_signature_gets_401_and_a_log_line_naming_iam(
    service: ThreadedServer,
    certs: CertsServer,
    key: SigningKey,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Today's deployment of a private service: every delivery refused, until EVENT_AUTH=iam.
    with caplog.at_level(logging.WARNING):
        answer = deliver(service, forwarded(mint_token(key)))
    assert answer.status_code == 401
    assert any("set EVENT_AUTH=iam" in record.getMessage() for record in caplog.records)
    assert certs.fetches == 0
    assert read_outbox(tmp_path / "outbox") == []


def test_iam_trusts_x_serverless_authorization_over_authorization(
    private_service: ThreadedServer, key: SigningKey, tmp_path: Path
) -> None:
    # With X-Serverless-Authorization present, Cloud Run IAM checks that header only: a
    # principal holding run.invoker could otherwise write the trigger's email in Authorization.
    stranger = mint_token(key, email="someone@example-project.iam.gserviceaccount.com")
    answer = deliver(
        private_service,
        forwarded(mint_token(key)),
        serverless_authorization=forwarded(stranger),
    )
    assert answer.status_code == 403
    assert read_outbox(tmp_path / "outbox") == []


def test_iam_without_invokers_is_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="EVENT_INVOKERS"):
        outbox_settings(tmp_path, event_auth="iam", event_invokers=[])
