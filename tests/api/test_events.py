"""POST / against the real server: what Eventarc sends, and everything it should not."""

from __future__ import annotations

import json
import logging
import socket
import time
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from app.events.models import EventType
from tests.conftest import read_outbox
from tests.factories import EVENTARC_PATH, binary, object_data, structured
from tests.servers import ThreadedServer

MODES = {"binary": binary, "structured": structured}


def only_copy_for_each_recipient(outbox: Path) -> EmailMessage:
    """The outbox holds one copy per recipient, each addressed to that recipient alone; the
    copies are the same message otherwise. Returns one of them."""
    messages = read_outbox(outbox)
    assert sorted(str(message["To"]) for message in messages) == [
        "dev@example.com",
        "ops@example.com",
    ]
    assert len({message["Subject"] for message in messages}) == 1
    return messages[0]


def post(
    server: ThreadedServer, headers: dict[str, str], body: bytes, path: str = EVENTARC_PATH
) -> httpx.Response:
    return httpx.post(server.url + path, headers=headers, content=body, timeout=10)


def outbox_of(tmp_path: Path) -> Path:
    return tmp_path / "outbox"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("event_type", list(EventType))
def test_each_type_in_each_mode_is_notified(
    outbox_server: ThreadedServer, tmp_path: Path, mode: str, event_type: EventType
) -> None:
    headers, body = MODES[mode](object_data(name="reports/q3.csv"), event_type, "evt-1")
    response = post(outbox_server, headers, body)
    assert response.status_code == 200
    assert response.json() == {"status": "sent", "id": "evt-1"}
    message = only_copy_for_each_recipient(outbox_of(tmp_path))
    assert message["Subject"] == f"[gs://some-bucket] {event_type.short}: reports/q3.csv"
    text = message.get_body(("plain",))
    assert text is not None
    content = text.get_content()
    for expected in ("reports/q3.csv", "some-bucket", "evt-1", event_type.value, "352 bytes"):
        assert expected in content


@pytest.mark.parametrize("path", ["/", EVENTARC_PATH, "/?anything=else&x=1"])
def test_any_query_string_is_accepted(outbox_server: ThreadedServer, path: str) -> None:
    headers, body = binary()
    assert post(outbox_server, headers, body, path).status_code == 200


def test_int64_fields_as_numbers_are_accepted(
    outbox_server: ThreadedServer, tmp_path: Path
) -> None:
    headers, body = binary(object_data(size=2048, generation=96883251, metageneration=3))
    assert post(outbox_server, headers, body).json()["status"] == "sent"
    message = only_copy_for_each_recipient(outbox_of(tmp_path))
    assert "96883251 (metageneration 3)" in message.as_string()


def test_nanosecond_timestamps_are_accepted(outbox_server: ThreadedServer) -> None:
    data = object_data(
        timeCreated="2020-04-23T07:38:57.230123456Z", updated="2020-04-23T07:38:57.999999999+02:00"
    )
    headers, body = binary(data)
    assert post(outbox_server, headers, body).json()["status"] == "sent"


HOSTILE_NAMES = {
    "crlf": "a\r\nBcc: victim@example.com\r\n\r\nbody.txt",
    "script": "<script>alert('x')</script>.html",
    "unicode": "données/ファイル/файл 📄.txt",
    "long": "x/" * 511 + "yz",  # 1,024 bytes, the longest name Cloud Storage allows
}


@pytest.mark.parametrize("name", HOSTILE_NAMES.values(), ids=HOSTILE_NAMES.keys())
def test_hostile_object_names_cannot_inject_headers_or_markup(
    outbox_server: ThreadedServer, tmp_path: Path, name: str
) -> None:
    headers, body = binary(object_data(name=name))
    assert post(outbox_server, headers, body).json()["status"] == "sent"
    message = only_copy_for_each_recipient(outbox_of(tmp_path))
    assert message["Bcc"] is None
    assert "\n" not in message["Subject"]
    assert "\r" not in message["Subject"]
    assert len(message["Subject"]) <= 200
    html_part = message.get_body(("html",))
    assert html_part is not None
    assert "<script>" not in html_part.get_content()


def problem_of(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"] == "application/problem+json"
    document = response.json()
    assert isinstance(document, dict)
    return document


MALFORMED: dict[str, tuple[dict[str, str], bytes, str]] = {
    "plain json, no ce headers": ({"content-type": "application/json"}, b"{}", "not a CloudEvent"),
    "missing ce-id": (
        {
            "ce-specversion": "1.0",
            "ce-source": "s",
            "ce-type": EventType.FINALIZED,
            "content-type": "application/json",
        },
        b"{}",
        "ce-id",
    ),
    "invalid json body": ({**binary()[0]}, b"{not json", "JSON"),
    "structured, invalid json": (
        {"content-type": "application/cloudevents+json"},
        b"{oops",
        "JSON",
    ),
    "structured, array": (
        {"content-type": "application/cloudevents+json"},
        b"[1, 2]",
        "must be a JSON object",
    ),
    "batch": ({"content-type": "application/cloudevents-batch+json"}, b"[]", "batched"),
    "bad time": ({**binary()[0], "ce-time": "yesterday"}, binary()[1], "not a valid CloudEvent"),
    "no data": ({**binary()[0]}, b"", "no data"),
    "data is a list": ({**binary()[0]}, b"[]", "JSON object"),
    "missing bucket": ({**binary()[0]}, json.dumps({"name": "x"}).encode(), "failed validation"),
    "size not a number": (
        {**binary()[0]},
        json.dumps(object_data(size="lots")).encode(),
        "failed validation",
    ),
    "invalid utf-8": ({"content-type": "application/cloudevents+json"}, b"\xff\xfe{", "UTF-8"),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_deliveries_get_400_saying_what_is_wrong(
    outbox_server: ThreadedServer, tmp_path: Path, case: tuple[dict[str, str], bytes, str]
) -> None:
    headers, body, says = case
    response = post(outbox_server, headers, body)
    assert response.status_code == 400
    document = problem_of(response)
    assert document["status"] == 400
    assert says in json.dumps(document)
    assert read_outbox(outbox_of(tmp_path)) == []


def test_validation_problems_name_the_field_without_echoing_it(
    outbox_server: ThreadedServer,
) -> None:
    headers, body = binary(object_data(size="secret-looking-value"))
    document = problem_of(post(outbox_server, headers, body))
    assert document["errors"] == [
        {
            "field": "data.size",
            "message": "Input should be a valid integer, unable to parse string as an integer",
        }
    ]
    assert "secret-looking-value" not in json.dumps(document)


def test_errors_never_echo_the_authorization_header(outbox_server: ThreadedServer) -> None:
    token = "Bearer eyJhbGciOiJSUzI1NiJ9.c2VjcmV0.c2lnbmF0dXJl"
    for headers, body in [({"content-type": "text/plain"}, b"x"), ({**binary()[0]}, b"{bad")]:
        response = post(outbox_server, {**headers, "authorization": token}, body)
        assert response.status_code == 400
        assert "eyJhbGci" not in response.text


def test_unknown_event_type_is_acknowledged_and_logged(
    outbox_server: ThreadedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    headers, body = binary(event_type="google.cloud.audit.log.v1.written", event_id="odd-1")
    with caplog.at_level(logging.WARNING):
        response = post(outbox_server, headers, body)
    assert response.status_code == 200
    assert response.json() == {"status": "ignored", "id": "odd-1"}
    assert any(
        record.levelno == logging.WARNING and getattr(record, "event_id", None) == "odd-1"
        for record in caplog.records
    )
    assert read_outbox(outbox_of(tmp_path)) == []


def test_body_over_512_kib_is_refused_with_413(outbox_server: ThreadedServer) -> None:
    headers, _ = binary()
    response = post(outbox_server, headers, b" " * (512 * 1024 + 1))
    assert response.status_code == 413
    assert "512 KiB" in problem_of(response)["detail"]  # type: ignore[operator]


def test_chunked_body_over_the_limit_is_refused_with_413(outbox_server: ThreadedServer) -> None:
    headers, _ = binary()

    def chunks() -> object:
        for _ in range(600):
            yield b" " * 1024

    response = httpx.post(outbox_server.url + "/", headers=headers, content=chunks(), timeout=10)  # type: ignore[arg-type]
    assert response.status_code == 413


def test_unknown_paths_and_methods_answer_problem_json(outbox_server: ThreadedServer) -> None:
    assert problem_of(httpx.get(outbox_server.url + "/nope"))["status"] == 404
    assert problem_of(httpx.delete(outbox_server.url + "/"))["status"] == 405


def raw_delivery_head(port: int) -> tuple[bytes, bytes]:
    """The request head of a binary-mode delivery, and its body, for writing to a socket by hand
    (to send only part of the body)."""
    headers, body = binary()
    lines = ["POST / HTTP/1.1", f"host: 127.0.0.1:{port}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), body


def test_a_body_that_trickles_in_too_slowly_gets_408(
    outbox_server: ThreadedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.api.body.BODY_TIMEOUT_SECONDS", 0.5)
    head, body = raw_delivery_head(outbox_server.port)
    with socket.create_connection(("127.0.0.1", outbox_server.port), timeout=10) as sock:
        sock.sendall(head + body[:10])
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 408")
    assert "not received within 0.5 s" in answer


def test_a_client_hanging_up_mid_body_is_not_logged_as_an_error(
    outbox_server: ThreadedServer, caplog: pytest.LogCaptureFixture
) -> None:
    head, body = raw_delivery_head(outbox_server.port)
    with caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", outbox_server.port), timeout=10) as sock:
            sock.sendall(head + body[:10])
        assert httpx.get(outbox_server.url + "/healthz").status_code == 200
        deadline = time.monotonic() + 5
        while (
            not any("disconnected" in r.getMessage() for r in caplog.records)
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    assert any("client disconnected" in record.getMessage() for record in caplog.records)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
