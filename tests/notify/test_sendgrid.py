"""The SendGrid notifier against a local fake that checks requests the way SendGrid does."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from app.notify.base import (
    ConfigurationError,
    Notification,
    Receipt,
    RejectedDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
)
from app.notify.sendgrid import SendGridNotifier
from tests.fakes.sendgrid import ApiError, FakeSendGrid, Reply


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


def send_many(fake: FakeSendGrid, count: int, *, concurrently: bool = False) -> list[Receipt]:
    """`count` sends through one notifier (one session), one after another or all at once."""

    async def main() -> list[Receipt]:
        notifier = SendGridNotifier(api_key=SecretStr(fake.api_key), host=fake.url, timeout=5)
        try:
            if concurrently:
                return list(
                    await asyncio.gather(*(notifier.send(notification()) for _ in range(count)))
                )
            return [await notifier.send(notification()) for _ in range(count)]
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


@pytest.mark.parametrize(
    "field",
    [
        "personalizations.0.to.0.email",
        "personalizations.0",
        "personalizations",
        "from.email",
        "subject",
        "content.0.value",
        "reply_to",
    ],
)
def test_a_400_naming_a_field_of_the_message_rejects_it_for_good(
    fake: FakeSendGrid, field: str
) -> None:
    fake.script(Reply.error(400, "Does not contain a valid address.", field=field))
    with pytest.raises(RejectedDeliveryError) as caught:
        send(fake, notification())
    assert caught.value.reason == (
        f"SendGrid rejected the message (400): {field}: Does not contain a valid address."
    )


@pytest.mark.parametrize("field", [None, "subject"], ids=["no-field", "subject"])
def test_a_413_rejects_the_message_for_good(fake: FakeSendGrid, field: str | None) -> None:
    fake.script(Reply.error(413, field=field))
    with pytest.raises(RejectedDeliveryError, match="content too large"):
        send(fake, notification())


FRAMING_400S = {
    # What SendGrid answers a body that is not JSON (and what the fake answers it too).
    "bad-request-no-field": Reply.error(400),
    # The OpenAPI spec's own example spells the missing field as the string "null".
    "field-string-null": Reply.error(400, "invalid request", field="null"),
    "content-type": Reply.error(400, "Content-Type should be application/json."),
    "empty-field": Reply.error(400, "Bad Request", field=""),
    "not-a-message-field": Reply.error(400, "error message", field="field_name"),
    # Sandbox mode comes from SENDGRID_SANDBOX, the same for every message.
    "mail-settings": Reply.error(
        400,
        "The mail_settings.sandbox_mode.enable field must be a boolean.",
        field="mail_settings.sandbox_mode.enable",
    ),
    "one-entry-without-a-field": Reply.errors_of(
        400, ApiError("Bad Request"), ApiError("The subject is required.", "subject")
    ),
    "html-page": Reply.bad_gateway(400),
}


@pytest.mark.parametrize("reply", FRAMING_400S.values(), ids=FRAMING_400S.keys())
def test_a_400_naming_no_field_of_the_message_is_a_configuration_error(
    fake: FakeSendGrid, reply: Reply, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script(reply)
    with caplog.at_level(logging.INFO), pytest.raises(ConfigurationError) as caught:
        send(fake, notification())
    assert caught.value.reason.startswith("SendGrid refused the request as malformed (400)")
    [record] = [r for r in caplog.records if r.name == "app.notify.sendgrid"]
    assert record.levelno == logging.ERROR
    assert "configuration or code error" in record.getMessage()
    assert record.sendgrid_status == 400  # type: ignore[attr-defined]


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


def test_a_hang_becomes_uncertain_after_the_timeout(fake: FakeSendGrid) -> None:
    """The request was sent: SendGrid may have accepted it, so the claim must stand."""
    fake.script(Reply.hang())
    started = time.monotonic()
    with pytest.raises(UncertainDeliveryError, match="in time"):
        send(fake, notification(), timeout=0.5)
    assert time.monotonic() - started < 5  # bounded by SENDGRID_TIMEOUT, not by the hang


def test_unreachable_sendgrid_is_transient_and_certainly_not_sent() -> None:
    async def main() -> None:
        notifier = SendGridNotifier(api_key=SecretStr("SG.x"), host="http://127.0.0.1:9", timeout=2)
        try:
            with pytest.raises(TransientDeliveryError, match="unreachable") as caught:
                await notifier.send(notification())
            assert not isinstance(caught.value, UncertainDeliveryError)
        finally:
            await notifier.aclose()

    asyncio.run(main())


def test_a_thousand_recipients_fit_one_request(fake: FakeSendGrid) -> None:
    recipients = tuple(f"user{i}@example.com" for i in range(1000))
    send(fake, notification(recipients))
    assert sorted(fake.delivered_recipients()) == sorted(recipients)


def test_requests_are_json_with_the_bearer_key(fake: FakeSendGrid) -> None:
    send(fake, notification())
    [request] = fake.requests()
    assert request.auth_matched
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"] == "gcs-notifier"
    assert "Cookie" not in request.headers


def test_one_session_reuses_its_connection(fake: FakeSendGrid) -> None:
    send_many(fake, 5)
    ports = {request.client_port for request in fake.requests()}
    assert len(fake.accepted()) == 5
    assert len(ports) == 1


def test_concurrent_sends_share_the_session(fake: FakeSendGrid) -> None:
    fake.latency = 0.05
    receipts = send_many(fake, 40, concurrently=True)
    assert len({receipt.message_id for receipt in receipts}) == 40
    assert len(fake.accepted()) == 40


def test_a_notifier_closed_then_used_again_opens_a_new_session(fake: FakeSendGrid) -> None:
    async def main() -> None:
        notifier = SendGridNotifier(api_key=SecretStr(fake.api_key), host=fake.url, timeout=5)
        await notifier.aclose()  # before any send: nothing to close
        await notifier.send(notification())
        await notifier.aclose()
        await notifier.send(notification())
        await notifier.aclose()

    asyncio.run(main())
    assert len(fake.accepted()) == 2


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\r\nX-Injected: 1"])
def test_a_key_with_a_line_break_is_never_sent(
    fake: FakeSendGrid, suffix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The bug of issue 9: `echo "$KEY" | gcloud secrets create` stores the key with a newline,
    # which ended the request head early; SendGrid's 400 then dead-lettered every event.
    key = fake.api_key + suffix
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigurationError) as caught:
        send(fake, notification(), key=key)
    assert "SENDGRID_API_KEY" in caught.value.reason
    assert fake.requests() == []
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert "SENDGRID_API_KEY" in errors[0].getMessage()
    assert fake.api_key not in caplog.text
    assert fake.api_key not in caught.value.reason


def shown(error: BaseException) -> str:
    """Everything an exception could put in a log: its text, repr and formatted traceback."""
    return "".join([str(error), repr(error), *traceback.format_exception(error)])


def test_a_connection_error_never_shows_the_key(caplog: pytest.LogCaptureFixture) -> None:
    key = "SG.connection-error.never-to-be-shown"

    async def main() -> TransientDeliveryError:
        notifier = SendGridNotifier(api_key=SecretStr(key), host="http://127.0.0.1:9", timeout=2)
        try:
            with pytest.raises(TransientDeliveryError) as caught:
                await notifier.send(notification())
            return caught.value
        finally:
            await notifier.aclose()

    with caplog.at_level(logging.DEBUG):
        error = asyncio.run(main())
    assert error.reason.startswith("SendGrid unreachable: ")
    assert "127.0.0.1:9" in error.reason
    assert key not in shown(error)
    assert key not in caplog.text


def test_a_timeout_never_shows_the_key(
    fake: FakeSendGrid, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script(Reply.hang())
    with caplog.at_level(logging.DEBUG), pytest.raises(TransientDeliveryError) as caught:
        send(fake, notification(), timeout=0.3)
    assert caught.value.reason == "SendGrid did not answer in time"
    assert fake.api_key not in shown(caught.value)
    assert fake.api_key not in caplog.text


def test_a_connection_closed_without_an_answer_is_uncertain() -> None:
    fake = FakeSendGrid().start()
    fake.script(Reply.hang())  # the fake closes hung connections, unanswered, when it stops

    def stop_once_received() -> None:
        fake.wait_for_requests(1)
        fake.stop()

    stopper = threading.Thread(target=stop_once_received)
    stopper.start()
    try:
        with pytest.raises(UncertainDeliveryError, match="connection broke") as caught:
            send(fake, notification())
    finally:
        stopper.join(timeout=10)
        fake.stop()
    assert fake.api_key not in shown(caught.value)
