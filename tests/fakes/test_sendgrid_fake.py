"""The SendGrid fake answers like the documented v3 Mail Send API, over real HTTP."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from python_http_client.exceptions import HTTPError as SendGridHTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import (
    Attachment,
    Bcc,
    Category,
    Cc,
    Content,
    CustomArg,
    Disposition,
    FileContent,
    FileName,
    FileType,
    From,
    Header,
    Mail,
    MailSettings,
    Personalization,
    ReplyTo,
    SandBoxMode,
    To,
)

from tests.fakes.sendgrid import (
    MAIL_SEND_PATH,
    ApiError,
    FakeSendGrid,
    Reply,
    validate_mail,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
JSON = dict[str, Any]


def valid_body() -> JSON:
    return {
        "personalizations": [
            {
                "to": [{"email": "alex@example.com", "name": "Alex"}],
                "cc": [{"email": "charlie@example.com"}],
                "bcc": [{"email": "dana@example.com"}],
            },
            {"to": [{"email": "ira@example.com"}]},
        ],
        "from": {"email": "notifier@example.com", "name": "Bucket notifier"},
        "subject": "New object: gs://bucket/report.csv",
        "content": [
            {"type": "text/plain", "value": "report.csv was uploaded"},
            {"type": "text/html", "value": "<p>report.csv was uploaded</p>"},
        ],
    }


@pytest.fixture(scope="module")
def shared_fake() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as server:
        yield server


@pytest.fixture
def fake(shared_fake: FakeSendGrid) -> FakeSendGrid:
    """One server for the module, with no records, script or latency left by other tests."""
    shared_fake.reset()
    shared_fake.latency = 0
    return shared_fake


@pytest.fixture(scope="module")
def shared_client(shared_fake: FakeSendGrid) -> Iterator[httpx.Client]:
    # One client for the module: building an httpx.Client (its TLS context) takes ~0.1 s.
    auth = {"Authorization": f"Bearer {shared_fake.api_key}"}
    with httpx.Client(base_url=shared_fake.url, headers=auth, timeout=5) as http:
        yield http


@pytest.fixture
def client(fake: FakeSendGrid, shared_client: httpx.Client) -> httpx.Client:
    """An httpx client for `fake`, sending its key."""
    return shared_client


def send(client: httpx.Client, body: object) -> httpx.Response:
    return client.post(MAIL_SEND_PATH, json=body)


def error_fields(response: httpx.Response) -> list[str | None]:
    errors = response.json()["errors"]
    for error in errors:
        assert set(error) == {"message", "field", "help"}
        assert isinstance(error["message"], str)
        assert error["message"]
    return [error["field"] for error in errors]


def recipients(count: int, domain: str = "example.com") -> list[JSON]:
    return [{"email": f"user{i}@{domain}"} for i in range(count)]


# ---- success ---------------------------------------------------------------------------------


def test_a_valid_request_is_accepted_with_a_message_id(
    fake: FakeSendGrid, client: httpx.Client
) -> None:
    response = send(client, valid_body())

    assert response.status_code == 202
    assert response.content == b""
    message_id = response.headers["X-Message-Id"]
    assert len(message_id) == 22
    assert fake.accepted() == [valid_body()]
    assert fake.delivered_recipients() == [
        "alex@example.com",
        "charlie@example.com",
        "dana@example.com",
        "ira@example.com",
    ]
    [record] = fake.requests()
    assert (record.method, record.path, record.status) == ("POST", MAIL_SEND_PATH, 202)
    assert record.message_id == message_id
    assert record.auth_matched
    assert record.delivered


def test_message_ids_differ(client: httpx.Client) -> None:
    ids = {send(client, valid_body()).headers["X-Message-Id"] for _ in range(5)}
    assert len(ids) == 5


def test_sandbox_mode_answers_200_and_delivers_nothing(
    fake: FakeSendGrid, client: httpx.Client
) -> None:
    body = valid_body() | {"mail_settings": {"sandbox_mode": {"enable": True}}}

    response = send(client, body)

    assert response.status_code == 200
    assert response.content == b""
    assert fake.accepted() == []
    assert fake.delivered_recipients() == []
    [record] = fake.requests()
    assert record.sandboxed
    assert not record.delivered
    assert fake.stats()["sandboxed"] == 1


def test_sandbox_mode_still_validates(fake: FakeSendGrid, client: httpx.Client) -> None:
    body = valid_body() | {"mail_settings": {"sandbox_mode": {"enable": True}}}
    del body["subject"]

    response = send(client, body)

    assert response.status_code == 400
    assert error_fields(response) == ["subject"]


def _subject_in_every_personalization(body: JSON) -> None:
    for personalization in body["personalizations"]:
        personalization["subject"] = "Per recipient"
    del body["subject"]


def _template_instead_of_subject_and_content(body: JSON) -> None:
    body["template_id"] = "d-0123456789abcdef"
    del body["subject"], body["content"]


def _unknown_top_level_key(body: JSON) -> None:
    # The schema sets no additionalProperties: false.
    body["x_unknown_key"] = 1


def _exactly_1000_recipients(body: JSON) -> None:
    body["personalizations"] = [{"to": recipients(600), "cc": recipients(400, "example.org")}]


def _html_only(body: JSON) -> None:
    body["content"] = [{"type": "text/html", "value": "<p>only</p>"}]


def _custom_args_object(body: JSON) -> None:
    # The OpenAPI schema says string; the docs and the sendgrid package use an object.
    body["custom_args"] = {"bucket": "b", "generation": "7"}


@pytest.mark.parametrize(
    "change",
    [
        _subject_in_every_personalization,
        _template_instead_of_subject_and_content,
        _unknown_top_level_key,
        _exactly_1000_recipients,
        _html_only,
        _custom_args_object,
    ],
)
def test_valid_variants_are_accepted(client: httpx.Client, change: Callable[[JSON], None]) -> None:
    body = valid_body()
    change(body)
    response = send(client, body)
    assert response.status_code == 202, response.text


def test_every_documented_field_in_use_is_accepted(client: httpx.Client) -> None:
    body = valid_body() | {
        "reply_to": {"email": "support@example.com", "name": "Support"},
        "attachments": [
            {
                "content": "aGVsbG8=",
                "filename": "hello.txt",
                "type": "text/plain",
                "disposition": "attachment",
            },
            {
                "content": "iVBORw0KGgo=",
                "filename": "logo.png",
                "type": "image/png",
                "disposition": "inline",
                "content_id": "logo",
            },
        ],
        "headers": {"X-Bucket": "bucket"},
        "categories": ["gcs", "notifications"],
        "custom_args": {"bucket": "bucket"},
        "send_at": int(time.time()) + 3600,
        "batch_id": "batch-1",
        "asm": {"group_id": 1, "groups_to_display": [1, 2]},
        "ip_pool_name": "transactional",
        "mail_settings": {
            "bypass_list_management": {"enable": False},
            "footer": {"enable": True, "text": "bye", "html": "<p>bye</p>"},
            "sandbox_mode": {"enable": False},
        },
        "tracking_settings": {
            "click_tracking": {"enable": True, "enable_text": False},
            "open_tracking": {"enable": True, "substitution_tag": "%open%"},
            "ganalytics": {"enable": False, "utm_source": "gcs"},
        },
    }
    body["personalizations"][0] |= {
        "subject": "Hello",
        "headers": {"X-Recipient": "alex"},
        "substitutions": {"-name-": "Alex"},
        "custom_args": {"recipient": "alex"},
        "send_at": int(time.time()) + 60,
    }
    response = send(client, body)
    assert response.status_code == 202, response.text


# ---- authentication, media type, size, JSON ---------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "authorization required"),
        ("Bearer SG.wrong.key", "The provided authorization grant is invalid, expired, or revoked"),
        ("Bearer", "The provided authorization grant is invalid, expired, or revoked"),
        ("Basic dXNlcjpwYXNz", "The provided authorization grant is invalid, expired, or revoked"),
    ],
)
def test_missing_or_wrong_bearer_key_is_401(
    fake: FakeSendGrid, authorization: str | None, message: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.post(fake.url + MAIL_SEND_PATH, json=valid_body(), headers=headers)

    assert response.status_code == 401
    assert response.json() == {"errors": [{"message": message, "field": None, "help": None}]}
    assert fake.accepted() == []
    assert not fake.requests()[0].auth_matched


def test_bearer_scheme_is_case_insensitive(fake: FakeSendGrid) -> None:
    headers = {"Authorization": f"bearer {fake.api_key}"}
    response = httpx.post(fake.url + MAIL_SEND_PATH, json=valid_body(), headers=headers)
    assert response.status_code == 202


def test_auth_is_checked_before_the_body(fake: FakeSendGrid) -> None:
    response = httpx.post(fake.url + MAIL_SEND_PATH, content=b"not json")
    assert response.status_code == 401


def test_content_type_must_be_json(client: httpx.Client) -> None:
    response = client.post(
        MAIL_SEND_PATH, content=json.dumps(valid_body()), headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 400
    assert error_fields(response) == [None]


def test_content_type_with_charset_is_json(client: httpx.Client) -> None:
    response = client.post(
        MAIL_SEND_PATH,
        content=json.dumps(valid_body()),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 202


@pytest.mark.parametrize("payload", [b"{not json", b"", b"[]", b'"text"', b"null"])
def test_a_body_that_is_not_a_json_object_is_400(
    fake: FakeSendGrid, client: httpx.Client, payload: bytes
) -> None:
    response = client.post(
        MAIL_SEND_PATH, content=payload, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"errors": [{"message": "Bad Request", "field": None, "help": None}]}
    assert fake.accepted() == []


def test_a_body_over_30_mb_is_413(fake: FakeSendGrid, client: httpx.Client) -> None:
    body = valid_body()
    body["content"][0]["value"] = "x" * (30 * 1024 * 1024)

    response = send(client, body)

    assert response.status_code == 413
    assert response.json()["errors"][0]["message"] == "content too large"
    [record] = fake.requests()
    assert record.body is None
    assert record.size > 30 * 1024 * 1024


# ---- schema violations ------------------------------------------------------------------------


def _set(path: str, value: object) -> Callable[[JSON], None]:
    """A change that sets the dotted `path` (list indexes as numbers) to `value`."""

    def change(body: JSON) -> None:
        *parents, last = path.split(".")
        target: Any = body
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


def _drop(key: str) -> Callable[[JSON], None]:
    def change(body: JSON) -> None:
        del body[key]

    return change


INVALID = [
    # (id, change, field SendGrid names)
    ("no-personalizations", _drop("personalizations"), "personalizations"),
    ("empty-personalizations", _set("personalizations", []), "personalizations"),
    (
        "1001-personalizations",
        _set("personalizations", [{"to": [{"email": f"u{i}@example.com"}]} for i in range(1001)]),
        "personalizations",
    ),
    ("personalization-not-object", _set("personalizations.1", "ira"), "personalizations.1"),
    ("no-to", _set("personalizations.1", {"cc": [{"email": "x@example.com"}]}), None),
    ("empty-to", _set("personalizations.1.to", []), "personalizations.1.to"),
    ("to-not-array", _set("personalizations.1.to", "ira@example.com"), "personalizations.1.to"),
    ("invalid-to-email", _set("personalizations.0.to.0.email", "alex"), None),
    ("to-without-email", _set("personalizations.0.to.0", {"name": "Alex"}), None),
    ("to-name-not-string", _set("personalizations.0.to.0.name", 7), None),
    ("cc-not-object", _set("personalizations.0.cc.0", "c@example.com"), None),
    ("invalid-bcc-email", _set("personalizations.0.bcc.0.email", "dana@"), None),
    (
        "over-1000-recipients",
        _set("personalizations", [{"to": recipients(600), "bcc": recipients(401, "x.org")}]),
        "personalizations",
    ),
    (
        "duplicate-across-personalizations",
        _set("personalizations.1.to.0.email", "ALEX@example.com"),
        "personalizations.1.to.0.email",
    ),
    (
        "duplicate-to-and-bcc",
        _set("personalizations.0.bcc.0.email", "alex@example.com"),
        "personalizations.0.bcc.0.email",
    ),
    ("no-from", _drop("from"), "from.email"),
    ("invalid-from", _set("from", {"email": "not an address"}), "from.email"),
    ("from-not-object", _set("from", "notifier@example.com"), "from"),
    ("invalid-personalization-from", _set("personalizations.0.from", {"email": "x"}), None),
    ("no-subject", _drop("subject"), "subject"),
    ("empty-subject", _set("subject", ""), "subject"),
    ("subject-not-string", _set("subject", 42), "subject"),
    ("empty-personalization-subject", _set("personalizations.0.subject", ""), None),
    ("no-content", _drop("content"), "content"),
    ("empty-content", _set("content", []), "content"),
    ("empty-content-value", _set("content.0.value", ""), "content.0.value"),
    ("content-without-type", _set("content.1", {"value": "<p>x</p>"}), "content.1.type"),
    ("content-type-with-crlf", _set("content.0.type", "text/plain\r\nBcc: x"), "content.0.type"),
    (
        "html-before-plain",
        _set(
            "content",
            [{"type": "text/html", "value": "<p>x</p>"}, {"type": "text/plain", "value": "x"}],
        ),
        "content",
    ),
    (
        "plain-not-first",
        _set(
            "content",
            [{"type": "text/calendar", "value": "BEGIN"}, {"type": "text/plain", "value": "x"}],
        ),
        "content",
    ),
    (
        "plain-twice",
        _set(
            "content", [{"type": "text/plain", "value": "x"}, {"type": "text/plain", "value": "y"}]
        ),
        "content",
    ),
    (
        "reply-to-and-reply-to-list",
        lambda body: body.update(
            reply_to={"email": "a@example.com"}, reply_to_list=[{"email": "b@example.com"}]
        ),
        "reply_to_list",
    ),
    (
        "attachment-without-filename",
        _set("attachments", [{"content": "aGVsbG8="}]),
        "attachments.0.filename",
    ),
    (
        "inline-attachment-without-content-id",
        _set("attachments", [{"content": "aGk=", "filename": "a.png", "disposition": "inline"}]),
        "attachments.0.content_id",
    ),
    (
        "bad-disposition",
        _set("attachments", [{"content": "aGk=", "filename": "a", "disposition": "embedded"}]),
        "attachments.0.disposition",
    ),
    ("11-categories", _set("categories", [f"c{i}" for i in range(11)]), "categories"),
    ("duplicate-categories", _set("categories", ["a", "a"]), "categories"),
    ("long-category", _set("categories", ["x" * 256]), "categories.0"),
    ("reserved-header", _set("headers", {"From": "evil@example.com"}), "headers.From"),
    ("header-not-string", _set("headers", {"X-Count": 3}), "headers.X-Count"),
    ("asm-without-group", _set("asm", {"groups_to_display": [1]}), "asm.group_id"),
    ("short-ip-pool", _set("ip_pool_name", "x"), "ip_pool_name"),
    ("send-at-not-integer", _set("send_at", "tomorrow"), "send_at"),
    ("send-at-over-72-hours", _set("send_at", int(time.time()) + 73 * 3600), "send_at"),
    (
        "sandbox-enable-not-boolean",
        _set("mail_settings", {"sandbox_mode": {"enable": "true"}}),
        "mail_settings.sandbox_mode.enable",
    ),
    (
        "tracking-not-object",
        _set("tracking_settings", {"click_tracking": True}),
        "tracking_settings.click_tracking",
    ),
    (
        "custom-args-not-strings",
        _set("custom_args", {"generation": 7}),
        "custom_args.generation",
    ),
]
# Where no field is given above, it is the one the change touched.
DEFAULT_FIELDS = {
    "no-to": "personalizations.1.to",
    "invalid-to-email": "personalizations.0.to.0.email",
    "to-without-email": "personalizations.0.to.0.email",
    "to-name-not-string": "personalizations.0.to.0.name",
    "cc-not-object": "personalizations.0.cc.0",
    "invalid-bcc-email": "personalizations.0.bcc.0.email",
    "invalid-personalization-from": "personalizations.0.from.email",
    "empty-personalization-subject": "personalizations.0.subject",
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param(change, field or DEFAULT_FIELDS[name], id=name)
        for name, change, field in INVALID
    ],
)
def test_each_schema_violation_is_400_naming_the_field(
    fake: FakeSendGrid, client: httpx.Client, change: Callable[[JSON], None], field: str
) -> None:
    body = valid_body()
    change(body)

    response = send(client, body)

    assert response.status_code == 400, response.text
    assert error_fields(response) == [field]
    error = response.json()["errors"][0]
    assert error["help"].startswith("http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/")
    assert fake.accepted() == []
    assert fake.requests()[0].errors[0].field == field


def test_every_violation_is_reported_at_once(client: httpx.Client) -> None:
    body = valid_body()
    del body["from"], body["subject"]
    body["content"] = [{"type": "text/plain", "value": ""}]

    response = send(client, body)

    assert response.status_code == 400
    assert error_fields(response) == ["from.email", "subject", "content.0.value"]


def test_only_the_first_duplicate_is_reported(client: httpx.Client) -> None:
    body = valid_body()
    body["personalizations"] = [{"to": [{"email": "same@example.com"}]} for _ in range(5)]

    response = send(client, body)

    assert error_fields(response) == ["personalizations.1.to.0.email"]
    assert "same@example.com" in response.json()["errors"][0]["message"]


def test_validate_mail_rejects_a_non_object() -> None:
    assert [error.message for error in validate_mail([])] == ["Bad Request"]


# ---- routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["//v3/mail/send", "/v3/mail/send/", "/v3/mail/batch", "/", "/v3/mail%2Fsend"]
)
def test_other_paths_are_404(fake: FakeSendGrid, client: httpx.Client, path: str) -> None:
    response = client.post(path, json=valid_body())

    assert response.status_code == 404
    assert response.json()["errors"][0]["message"] == "not found"
    assert fake.accepted() == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(client: httpx.Client, method: str) -> None:
    response = client.request(method, MAIL_SEND_PATH)

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.json()["errors"][0]["message"] == "method not allowed"


def test_a_host_with_a_trailing_slash_404s_with_the_sendgrid_client(fake: FakeSendGrid) -> None:
    sendgrid = SendGridAPIClient(fake.api_key, host=fake.url + "/")
    sendgrid.client.timeout = 5

    with pytest.raises(SendGridHTTPError) as raised:
        sendgrid.send(Mail("notifier@example.com", "alex@example.com", "s", "text"))

    assert raised.value.status_code == 404
    assert fake.requests()[0].path == "//v3/mail/send"
    assert fake.accepted() == []


# ---- the real sendgrid package's bodies ------------------------------------------------------


def test_a_body_built_with_the_sendgrid_helpers_is_accepted(
    fake: FakeSendGrid, client: httpx.Client
) -> None:
    mail = Mail(from_email=From("notifier@example.com", "Notifier, GCS"), subject="New object")
    alex = Personalization()
    alex.add_to(To("alex@example.com", "Alex"))
    alex.add_cc(Cc("charlie@example.com"))
    bola = Personalization()
    bola.add_to(To("bola@example.com"))
    bola.add_bcc(Bcc("dana@example.com"))
    mail.add_personalization(alex)
    mail.add_personalization(bola)  # note: add_personalization inserts at index 0
    # Added html first on purpose: the helper moves text/plain to the front, as SendGrid requires.
    mail.add_content(Content("text/html", "<p>report.csv</p>"))
    mail.add_content(Content("text/plain", "report.csv"))
    mail.reply_to = ReplyTo("support@example.com")
    mail.category = Category("gcs")
    mail.custom_arg = CustomArg("bucket", "my-bucket")
    mail.header = Header("X-Bucket", "my-bucket")
    mail.attachment = Attachment(
        FileContent("aGVsbG8="),
        FileName("hello.txt"),
        FileType("text/plain"),
        Disposition("attachment"),
    )
    body = mail.get()

    response = send(client, body)

    assert response.status_code == 202, response.text
    assert fake.accepted() == [body]
    assert fake.delivered_recipients() == [
        "bola@example.com",
        "dana@example.com",
        "alex@example.com",
        "charlie@example.com",
    ]


def test_the_sendgrid_client_itself_gets_202_and_sandbox_200(fake: FakeSendGrid) -> None:
    sendgrid = SendGridAPIClient(fake.api_key, host=fake.url)
    sendgrid.client.timeout = 5
    mail = Mail("notifier@example.com", "alex@example.com", "Subject", "text", "<p>html</p>")

    assert sendgrid.send(mail).status_code == 202
    mail.mail_settings = MailSettings(sandbox_mode=SandBoxMode(True))
    assert sendgrid.send(mail).status_code == 200
    assert fake.delivered_recipients() == ["alex@example.com"]


# ---- scripted replies -------------------------------------------------------------------------


def test_scripted_replies_are_used_in_order_then_normal_handling(
    fake: FakeSendGrid, client: httpx.Client
) -> None:
    fake.script(Reply.error(500), Reply.error(403), Reply.normal(), Reply.error(400, "nope"))

    statuses = [send(client, valid_body()).status_code for _ in range(5)]

    assert statuses == [500, 403, 202, 400, 202]
    assert [record.status for record in fake.requests()] == statuses
    assert len(fake.accepted()) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 413, 500, 503])
def test_a_scripted_error_has_sendgrid_error_body(
    client: httpx.Client, fake: FakeSendGrid, status: int
) -> None:
    fake.script(Reply.error(status))

    response = send(client, valid_body())

    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert error_fields(response) == [None]


def test_a_scripted_error_can_name_a_field(client: httpx.Client, fake: FakeSendGrid) -> None:
    fake.script(Reply.error(400, "Does not contain a valid address.", field="from.email"))
    response = send(client, valid_body())
    assert response.json()["errors"][0]["message"] == "Does not contain a valid address."
    assert error_fields(response) == ["from.email"]


def test_a_scripted_error_can_list_several_entries(
    client: httpx.Client, fake: FakeSendGrid
) -> None:
    fake.script(
        Reply.errors_of(
            400, ApiError("Bad Request"), ApiError("The subject is required.", "subject")
        )
    )
    response = send(client, valid_body())
    assert response.status_code == 400
    assert error_fields(response) == [None, "subject"]
    assert response.json()["errors"][0]["message"] == "Bad Request"


def test_a_scripted_error_list_needs_an_entry_and_an_error_status() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Reply.errors_of(400)
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Reply.errors_of(202, ApiError("x"))


def test_scripted_replies_replace_the_checks_but_requests_are_recorded(fake: FakeSendGrid) -> None:
    fake.script(Reply.error(500))
    response = httpx.post(fake.url + MAIL_SEND_PATH, content=b"garbage")  # no key either

    assert response.status_code == 500
    [record] = fake.requests()
    assert (record.status, record.body, record.auth_matched) == (500, None, False)


def test_scripted_accept_skips_the_checks(fake: FakeSendGrid, client: httpx.Client) -> None:
    body = valid_body()
    del body["subject"]
    fake.script(Reply.accept())

    response = send(client, body)

    assert response.status_code == 202
    assert response.headers["X-Message-Id"]
    assert fake.accepted() == [body]


def test_scripted_429_carries_the_rate_limit_headers(
    fake: FakeSendGrid, client: httpx.Client
) -> None:
    fake.script(Reply.rate_limited(reset_in=30, limit=600))
    before = time.time()

    response = send(client, valid_body())

    assert response.status_code == 429
    assert response.headers["X-RateLimit-Limit"] == "600"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    reset = int(response.headers["X-RateLimit-Reset"])  # epoch seconds
    assert before + 30 <= reset <= time.time() + 32
    assert response.json()["errors"][0]["message"] == "too many requests"
    assert fake.accepted() == []
    assert send(client, valid_body()).status_code == 202


def test_scripted_502_is_an_html_page(fake: FakeSendGrid, client: httpx.Client) -> None:
    fake.script(Reply.bad_gateway())

    response = send(client, valid_body())

    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<h1>502 Bad Gateway</h1>" in response.text
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_a_scripted_hang_times_the_client_out_and_stop_returns_promptly() -> None:
    fake = FakeSendGrid().start()
    auth = {"Authorization": f"Bearer {fake.api_key}"}
    fake.script(Reply.hang(), Reply.hang())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake.url + MAIL_SEND_PATH, json=valid_body(), headers=auth, timeout=0.3)

    # A second hung request still in flight while the server stops: it gets no answer.
    outcome: list[BaseException] = []

    def in_flight() -> None:
        try:
            httpx.post(fake.url + MAIL_SEND_PATH, json=valid_body(), headers=auth, timeout=30)
        except httpx.HTTPError as error:
            outcome.append(error)

    thread = threading.Thread(target=in_flight)
    thread.start()
    assert fake.wait_for_requests(2, timeout=5)
    started = time.monotonic()
    fake.stop()
    stopped_in = time.monotonic() - started
    thread.join(timeout=5)

    assert stopped_in < 1.0
    assert not thread.is_alive()
    assert [type(error) for error in outcome] == [httpx.RemoteProtocolError]
    assert [record.status for record in fake.requests()] == [None, None]
    assert fake.accepted() == []


def test_a_timed_hang_then_answers_normally(fake: FakeSendGrid, client: httpx.Client) -> None:
    fake.script(Reply.hang(0.3))
    started = time.monotonic()

    response = send(client, valid_body())

    assert response.status_code == 202
    assert time.monotonic() - started >= 0.3


def test_latency_applies_to_every_request_and_can_change(
    fake: FakeSendGrid, client: httpx.Client
) -> None:
    fake.latency = 0.2
    started = time.monotonic()
    assert send(client, valid_body()).status_code == 202
    assert send(client, {}).status_code == 400
    assert time.monotonic() - started >= 0.4

    fake.latency = 0
    started = time.monotonic()
    send(client, valid_body())
    assert time.monotonic() - started < 0.2


def test_latency_cannot_be_negative(fake: FakeSendGrid) -> None:
    with pytest.raises(ValueError, match="latency"):
        fake.latency = -1


def test_a_scripted_error_status_must_be_an_error() -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Reply.error(202)


def test_a_sender_outside_the_verified_ones_is_403() -> None:
    with FakeSendGrid(verified_senders=["notifier@example.com"]) as fake:
        auth = {"Authorization": f"Bearer {fake.api_key}"}
        body = valid_body()
        assert httpx.post(fake.url + MAIL_SEND_PATH, json=body, headers=auth).status_code == 202
        body["from"]["email"] = "someone@example.com"
        response = httpx.post(fake.url + MAIL_SEND_PATH, json=body, headers=auth)

    assert response.status_code == 403
    assert "verified Sender Identity" in response.json()["errors"][0]["message"]


# ---- records ---------------------------------------------------------------------------------


def test_the_key_is_never_recorded(fake: FakeSendGrid, client: httpx.Client) -> None:
    send(client, valid_body())
    client.post(MAIL_SEND_PATH, json={"oops": True})
    httpx.post(fake.url + MAIL_SEND_PATH, json=valid_body(), headers={"Authorization": "Bearer x"})
    client.post("//v3/mail/send", json=valid_body())

    records = fake.requests()

    assert [record.auth_matched for record in records] == [True, True, False, True]
    for record in records:
        assert "authorization" not in {name.lower() for name in record.headers}
    dumped = repr(records) + json.dumps([r.headers for r in records]) + repr(fake.stats())
    assert fake.api_key not in dumped
    assert fake.api_key not in repr(fake)


def test_each_connection_is_recorded_by_its_client_port(fake: FakeSendGrid) -> None:
    auth = {"Authorization": f"Bearer {fake.api_key}"}
    with (
        httpx.Client(base_url=fake.url, headers=auth) as one,
        httpx.Client(base_url=fake.url, headers=auth) as other,
    ):
        for http in (one, one, other):
            send(http, valid_body())
    ports = [record.client_port for record in fake.requests()]
    assert all(isinstance(port, int) for port in ports)
    assert ports[0] == ports[1] != ports[2]


def test_headers_are_recorded(fake: FakeSendGrid, client: httpx.Client) -> None:
    client.post(MAIL_SEND_PATH, json=valid_body(), headers={"User-Agent": "gcs-notifier"})
    assert fake.requests()[0].headers["User-Agent"] == "gcs-notifier"


def test_reset_forgets_records_and_pending_script(fake: FakeSendGrid, client: httpx.Client) -> None:
    send(client, valid_body())
    fake.script(Reply.error(500))
    fake.reset()

    assert fake.requests() == []
    assert fake.accepted() == []
    assert fake.stats()["requests"] == 0
    assert send(client, valid_body()).status_code == 202


def test_records_are_consistent_under_concurrent_requests(
    fake: FakeSendGrid, client: httpx.Client
) -> None:
    def one(i: int) -> int:
        body = copy.deepcopy(valid_body())
        body["personalizations"] = [{"to": [{"email": f"user{i}@example.com"}]}]
        return send(client, body).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(one, range(64)))

    assert statuses == [202] * 64
    assert sorted(fake.delivered_recipients()) == sorted(f"user{i}@example.com" for i in range(64))
    assert fake.stats()["by_status"] == {"202": 64}


def test_max_records_bounds_the_bodies_kept_not_the_counts() -> None:
    with FakeSendGrid(max_records=2) as fake:
        auth = {"Authorization": f"Bearer {fake.api_key}"}
        for _ in range(5):
            httpx.post(fake.url + MAIL_SEND_PATH, json=valid_body(), headers=auth)
        assert len(fake.requests()) == 2
        assert len(fake.accepted()) == 2
        assert fake.stats()["accepted"] == 5
        assert fake.stats()["recipients"] == 20


def test_start_is_fast_and_binds_localhost() -> None:
    started = time.monotonic()
    fake = FakeSendGrid().start()
    try:
        assert time.monotonic() - started < 1.0
        assert fake.url.startswith("http://127.0.0.1:")
        with pytest.raises(RuntimeError):
            fake.start()
    finally:
        fake.stop()
    fake.stop()  # a second stop is harmless
    with pytest.raises(RuntimeError):
        _ = fake.url


# ---- control endpoints -----------------------------------------------------------------------


def test_control_endpoints(fake: FakeSendGrid, client: httpx.Client) -> None:
    send(client, valid_body())
    send(client, {})

    stats = client.get("/__fake/stats").json()
    assert stats["requests"] == 2
    assert stats["accepted"] == 1
    assert stats["recipients"] == 4
    assert stats["by_status"] == {"202": 1, "400": 1}

    script = [{"kind": "rate_limited", "reset_in": 5}, {"kind": "error", "status": 500}]
    assert client.post("/__fake/script", json=script).status_code == 204
    assert [send(client, valid_body()).status_code for _ in range(3)] == [429, 500, 202]

    assert client.post("/__fake/config", json={"latency_ms": 150}).status_code == 204
    assert fake.latency == pytest.approx(0.15)
    assert client.post("/__fake/reset").status_code == 204
    assert client.get("/__fake/stats").json()["requests"] == 0
    assert client.post("/__fake/script", json=[{"kind": "bogus"}]).status_code == 400
    assert client.get("/__fake/nothing").status_code == 404


# ---- separate process ------------------------------------------------------------------------


def test_the_command_line_server_serves_until_sigterm() -> None:
    key = "SG.command-line.test-key"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.sendgrid",
            "--port",
            "0",
            "--latency-ms",
            "10",
            "--api-key",
            key,
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        auth = {"Authorization": f"Bearer {key}"}
        response = httpx.post(url + MAIL_SEND_PATH, json=valid_body(), headers=auth)
        assert response.status_code == 202
        assert httpx.get(url + "/__fake/stats").json()["accepted"] == 1

        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=5)
        assert process.returncode == 0, stderr
        assert key not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
