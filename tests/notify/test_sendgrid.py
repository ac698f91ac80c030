"""The SendGrid notifier against a local fake that checks requests the way SendGrid does."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from app.notify.base import (
    ConfigurationError,
    Notification,
    Receipt,
    RejectedDeliveryError,
    TransientDeliveryError,
)
from app.notify.sendgrid import SendGridNotifier
from tests.fakes.sendgrid import FakeSendGrid, Reply


@pytest.fixture
def fake() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as server:
        yield server


def notification(recipients: tuple[str, ...] = ("a@example.com", "b@example.com")) -> Notification:
    return Notification(
        key="k",
        subject="[gs://demo] finalized: ü.txt",
        text="plain body",
        html="<p>html body</p>",
        recipients=recipients,
        sender="notifier@example.com",
        context={"event_id": "e1"},
    )


def send(
    fake: FakeSendGrid,
    item: Notification,
    *,
    sandbox: bool = False,
    timeout: float = 5,
    key: str | None = None,
) -> Receipt:
    async def main() -> Receipt:
        notifier = SendGridNotifier(
            api_key=SecretStr(key or fake.api_key),
            host=fake.url + "/",
            timeout=timeout,
            sandbox=sandbox,
        )
        try:
            return await notifier.send(item)
        finally:
            await notifier.aclose()

    return asyncio.run(main())


def test_accepted_mail_gives_each_recipient_a_personalization(fake: FakeSendGrid) -> None:
    receipt = send(fake, notification())
    assert receipt.notifier == "sendgrid"
    assert receipt.message_id
    assert not receipt.sandbox
    [body] = fake.accepted()
    assert sorted(p["to"][0]["email"] for p in body["personalizations"]) == [
        "a@example.com",
        "b@example.com",
    ]
    assert all(len(p["to"]) == 1 for p in body["personalizations"])
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert body["from"] == {"email": "notifier@example.com"}
    assert body["subject"] == "[gs://demo] finalized: ü.txt"


def test_trailing_slash_in_host_still_reaches_v3_mail_send(fake: FakeSendGrid) -> None:
    send(fake, notification())
    assert [request.path for request in fake.requests()] == ["/v3/mail/send"]


def test_sandbox_mode_is_validated_not_delivered(fake: FakeSendGrid) -> None:
    receipt = send(fake, notification(), sandbox=True)
    assert receipt.sandbox
    assert fake.accepted() == []


def test_429_is_transient_with_retry_after_from_rate_limit_reset(fake: FakeSendGrid) -> None:
    fake.script(Reply.rate_limited(reset_in=30))
    with pytest.raises(TransientDeliveryError) as caught:
        send(fake, notification())
    assert caught.value.retry_after is not None
    assert 25 <= caught.value.retry_after <= 31


@pytest.mark.parametrize(
    "reply",
    [Reply.error(500), Reply.error(503), Reply.bad_gateway()],
    ids=["500", "503", "502-html"],
)
def test_server_errors_are_transient(fake: FakeSendGrid, reply: Reply) -> None:
    fake.script(reply)
    with pytest.raises(TransientDeliveryError) as caught:
        send(fake, notification())
    assert not isinstance(caught.value, ConfigurationError)


def test_wrong_key_is_a_configuration_error_logged_without_the_key(
    fake: FakeSendGrid, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "SG.wrong-key-value.never-to-be-logged"
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigurationError):
        send(fake, notification(), key=wrong)
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert errors
    assert "SENDGRID_API_KEY" in errors[0].getMessage()
    assert wrong not in caplog.text
    assert fake.api_key not in caplog.text


def test_403_unverified_sender_is_a_configuration_error(fake: FakeSendGrid) -> None:
    fake.script(Reply.error(403, "The from address does not match a verified Sender Identity."))
    with pytest.raises(ConfigurationError):
        send(fake, notification())


@pytest.mark.parametrize("status", [400, 413])
def test_rejections_are_permanent_and_carry_sendgrid_messages(
    fake: FakeSendGrid, status: int
) -> None:
    fake.script(Reply.error(status, "Invalid subject", field="subject"))
    with pytest.raises(RejectedDeliveryError) as caught:
        send(fake, notification())
    assert "Invalid subject" in caught.value.reason


def test_sendgrid_error_body_is_logged(
    fake: FakeSendGrid, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script(
        Reply.error(400, "Does not contain a valid address.", field="personalizations.0.to")
    )
    with caplog.at_level(logging.ERROR), pytest.raises(RejectedDeliveryError):
        send(fake, notification())
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.sendgrid_errors == ["personalizations.0.to: Does not contain a valid address."]  # type: ignore[attr-defined]


def test_a_hang_becomes_transient_after_the_timeout(fake: FakeSendGrid) -> None:
    fake.script(Reply.hang())
    started = time.monotonic()
    with pytest.raises(TransientDeliveryError, match="in time"):
        send(fake, notification(), timeout=0.5)
    assert time.monotonic() - started < 5  # bounded by SENDGRID_TIMEOUT, not by the hang


def test_unreachable_sendgrid_is_transient() -> None:
    async def main() -> None:
        notifier = SendGridNotifier(api_key=SecretStr("SG.x"), host="http://127.0.0.1:9", timeout=2)
        try:
            with pytest.raises(TransientDeliveryError, match="unreachable"):
                await notifier.send(notification())
        finally:
            await notifier.aclose()

    asyncio.run(main())


def test_a_thousand_recipients_fit_one_request(fake: FakeSendGrid) -> None:
    recipients = tuple(f"user{i}@example.com" for i in range(1000))
    send(fake, notification(recipients))
    assert sorted(fake.delivered_recipients()) == sorted(recipients)
