"""Pub/Sub pushes and 1st-gen events are authenticated exactly as Eventarc deliveries (issue 12):
a push subscription's OIDC token names its service account and its audience, and the same
EVENT_AUTH checks decide, whatever the body's form."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.emit import FORMS, new_change
from app.events.models import EventType
from tests.conftest import outbox_settings, read_outbox
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

PUSH_FORMS = ["pubsub", "pubsub-unwrapped", "messagepublished", "legacy", "legacy-flat"]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("key-1")


@pytest.fixture(params=["oidc", "iam"])
def service(
    request: pytest.FixtureRequest, key: SigningKey, tmp_path: Path
) -> Iterator[tuple[str, ThreadedServer]]:
    with CertsServer(key) as certs:
        settings = outbox_settings(
            tmp_path, event_auth=request.param, event_invokers=[INVOKER], oidc_certs_url=certs.url
        )
        with ThreadedServer(settings) as server:
            yield request.param, server


def push(server: ThreadedServer, form: str, authorization: str | None) -> httpx.Response:
    message = FORMS[form](new_change(EventType.FINALIZED, "some-bucket", f"in/{form}.txt"))
    headers = {**message.headers, "host": SERVICE_HOST}
    if authorization is not None:
        headers["authorization"] = authorization
    return httpx.post(server.url + "/", headers=headers, content=message.body, timeout=10)


def token(mode: str, key: SigningKey, *, aud: str = SERVICE_URL, email: str = INVOKER) -> str:
    """What the service receives: the push's token as signed by Google (oidc), or as Cloud Run
    IAM forwards it to a private service (iam)."""
    signed = mint_token(key, aud=aud, email=email)
    return f"Bearer {signed if mode == 'oidc' else remove_signature(signed)}"


@pytest.mark.parametrize("form", PUSH_FORMS)
def test_a_push_with_the_subscription_accounts_token_is_notified(
    service: tuple[str, ThreadedServer], key: SigningKey, tmp_path: Path, form: str
) -> None:
    mode, server = service
    # Pub/Sub's default audience is the push endpoint URL: the service's URL with its path.
    answer = push(server, form, token(mode, key, aud=f"{SERVICE_URL}/"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "sent"
    assert read_outbox(tmp_path / "outbox")


@pytest.mark.parametrize("form", PUSH_FORMS)
def test_a_push_without_a_token_or_from_another_account_sends_nothing(
    service: tuple[str, ThreadedServer], key: SigningKey, tmp_path: Path, form: str
) -> None:
    mode, server = service
    assert push(server, form, None).status_code == 401
    stranger = token(mode, key, email="someone@example-project.iam.gserviceaccount.com")
    assert push(server, form, stranger).status_code == 403
    assert push(server, form, token(mode, key, aud="https://evil.example")).status_code == 401
    assert read_outbox(tmp_path / "outbox") == []
