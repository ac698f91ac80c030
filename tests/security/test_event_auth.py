"""EVENT_AUTH=oidc end to end: only a valid token of a listed invoker gets an event notified."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import outbox_settings, read_outbox
from tests.factories import EVENTARC_PATH, binary
from tests.fakes.oidc import INVOKER, SERVICE_HOST, SERVICE_URL, CertsServer, SigningKey, mint_token
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


def deliver(service: ThreadedServer, authorization: str | None) -> httpx.Response:
    headers, body = binary()
    headers["host"] = SERVICE_HOST  # the audience Eventarc mints the token for
    if authorization is not None:
        headers["authorization"] = authorization
    return httpx.post(service.url + EVENTARC_PATH, headers=headers, content=body, timeout=10)


def test_a_valid_token_of_the_trigger_account_gets_the_event_notified(
    service: ThreadedServer, key: SigningKey, tmp_path: Path
) -> None:
    answer = deliver(service, f"Bearer {mint_token(key)}")
    assert answer.status_code == 200
    assert answer.json()["status"] == "sent"
    assert len(read_outbox(tmp_path / "outbox")) == 1


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
