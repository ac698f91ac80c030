"""The SendGrid key and bearer tokens never appear in logs, answers, reprs or /docs."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from app.config import Settings
from tests.factories import EVENTARC_PATH, binary
from tests.fakes.oidc import (
    INVOKER,
    SERVICE_HOST,
    CertsServer,
    SigningKey,
    mint_token,
    remove_signature,
)
from tests.fakes.sendgrid import FakeSendGrid, Reply
from tests.servers import ServiceProcess


def test_key_and_tokens_never_reach_the_log_or_answers(tmp_path: Path) -> None:
    key = SigningKey.generate("k1")
    forged = SigningKey.generate("k1")
    with FakeSendGrid() as fake, CertsServer(key) as certs:
        env = {
            "NOTIFIER": "sendgrid",
            "SENDGRID_API_KEY": fake.api_key,
            "SENDGRID_HOST": fake.url,
            "NOTIFY_TO": "ops@example.com",
            "NOTIFY_FROM": "notifier@example.com",
            "IDEMPOTENCY_STORE": "memory",
            "EVENT_AUTH": "oidc",
            "EVENT_INVOKERS": INVOKER,
            "OIDC_CERTS_URL": certs.url,
            "LOG_LEVEL": "DEBUG",
        }
        tokens = [
            mint_token(key),
            mint_token(forged),
            mint_token(key, email="x@example.com"),
            mint_token(key),
            remove_signature(mint_token(key)),  # a private service's token under oidc
        ]
        fake.script(Reply.normal(), Reply.error(401), Reply.error(400, "bad"))
        answers = []
        with ServiceProcess(env, tmp_path) as service:
            for token in tokens:
                headers, body = binary()
                headers.update({"host": SERVICE_HOST, "authorization": f"Bearer {token}"})
                answers.append(
                    httpx.post(
                        service.url + EVENTARC_PATH, headers=headers, content=body, timeout=15
                    )
                )
            answers.append(httpx.get(service.url + "/openapi.json"))
            answers.append(httpx.get(service.url + "/docs"))
            service.signal(signal.SIGTERM)
            service.wait(timeout=15)
        log = service.output()
    assert [answer.status_code for answer in answers[:5]] == [200, 401, 403, 503, 401]
    assert "SendGrid refused" in log  # the 401 from SendGrid was logged ...
    assert "set EVENT_AUTH=iam" in log  # ... and the removed signature, with the mode that fits
    secrets = [fake.api_key, *tokens, *(token.split(".")[2] for token in tokens[:4])]
    secrets += [token.split(".")[1] for token in tokens]
    for secret in secrets:
        assert secret not in log  # ... without the key or any token
        for answer in answers:
            assert secret not in answer.text


def test_settings_repr_hides_the_key() -> None:
    settings = Settings.model_validate(
        {
            "sendgrid_api_key": "SG.very-secret",
            "notify_to": ["a@example.com"],
            "notify_from": "b@example.com",
        }
    )
    assert "SG.very-secret" not in repr(settings)
    assert "SG.very-secret" not in str(settings.model_dump())
