"""/outbox over HTTP (issue 14): the captured emails listed newest first, read, downloaded and
removed; live updates as Server-Sent Events; ids that name anything but a message in the outbox
answered 404; the strict headers of every page and the sandbox of an email's HTML; the view off
unless NOTIFIER=outbox and EVENT_AUTH=none. The browser's view of the same pages is
tests/browser/."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.notify.base import Notification
from app.notify.outbox import build_message
from app.outbox_view.feed import QUEUE_LIMIT, OutboxFeed, Subscription
from app.outbox_view.mailbox import LIST_LIMIT
from tests.conftest import outbox_settings
from tests.factories import EVENTARC_PATH, binary, object_data
from tests.servers import ROOT, ServiceProcess, ThreadedServer

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
EMAIL_CSP = (
    "sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
    "style-src 'unsafe-inline'; img-src data:"
)
HOSTILE_SUBJECT = "<script>alert('subject')</script> report"
HOSTILE_TO = '"<img src=x onerror=alert(1)>" <victim@example.com>'
HOSTILE_HTML = (
    "<p>Hello</p><script>alert('html')</script><img src=x onerror=alert(2)>"
    '<form action="https://evil.example/"><input name=a></form>'
    '<a href="https://example.com/">a link</a>'
)


# --- helpers -----------------------------------------------------------------------------------


def put(
    directory: Path,
    stamp: str,
    *,
    subject: str = "[gs://demo] finalized: a.txt",
    to: str = "ops@example.com",
    html: str | None = "<p>uploaded</p>",
    text: str = "uploaded\n",
    route: str | None = None,
    key: str | None = None,
) -> str:
    """An email as the outbox notifier writes it, under the name it would get at `stamp`
    (YYYYmmddTHHMMSSZ); returns its id."""
    context = {"route": route} if route else {}
    notification = Notification(
        key=key or f"{stamp}-{subject}",
        subject=subject,
        text=text,
        html=html or "",
        recipients=(to,),
        sender="notifier@example.com",
        context=context,
    )
    message = build_message(notification, to)
    if html is None:  # a text-only email
        message = build_message(notification, to)
        message.clear_content()
        message.set_content(text)
    message_id = (
        f"{stamp}-{hashlib.sha256(notification.key.encode()).hexdigest()[:16]}"
        f"-{hashlib.sha256(to.encode()).hexdigest()[:8]}"
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{message_id}.eml").write_bytes(message.as_bytes())
    return message_id


def raw_get(url: str, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request with `target` sent exactly as written (no client normalizes `..` or `%2F`)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(
            f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def ids_in_page(page: str) -> list[str]:
    return re.findall(r'<tr data-id="([^"]+)">', page)


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox"


@pytest.fixture
def view(tmp_path: Path) -> Iterator[ThreadedServer]:
    with ThreadedServer(outbox_settings(tmp_path)) as server:
        yield server


# --- the list ----------------------------------------------------------------------------------


def test_the_api_lists_emails_newest_first_with_every_field(
    view: ThreadedServer, outbox: Path
) -> None:
    oldest = put(outbox, "20261130T045624Z", subject="first")
    newest = put(outbox, "20261130T045830Z", subject="third", to="dev@example.com")
    middle = put(outbox, "20261130T045701Z", subject="second", route="finance-reports")
    answer = httpx.get(f"{view.url}/outbox/api/messages")
    assert answer.status_code == 200
    messages = answer.json()["messages"]
    assert [message["id"] for message in messages] == [newest, middle, oldest]
    assert messages[0] == {
        "id": newest,
        "time": "2026-11-30T04:58:30Z",
        "from": "notifier@example.com",
        "to": "dev@example.com",
        "subject": "third",
        "route": "",
        "size": (outbox / f"{newest}.eml").stat().st_size,
    }
    assert messages[1]["route"] == "finance-reports"
    assert answer.json()["total"] == 3


def test_emails_of_one_second_are_listed_by_when_they_were_written(
    view: ThreadedServer, outbox: Path
) -> None:
    stamp = "20261130T045624Z"
    written = [put(outbox, stamp, subject=f"email {n}", key=f"k{n}") for n in range(3)]
    for n, message_id in enumerate(written):  # whatever the hashes in the names say
        os.utime(outbox / f"{message_id}.eml", ns=(0, 1_000_000_000 * (n + 1)))
    listed = [m["id"] for m in httpx.get(f"{view.url}/outbox/api/messages").json()["messages"]]
    assert listed == written[::-1]


def test_the_list_page_shows_emails_newest_first_with_a_count(
    view: ThreadedServer, outbox: Path
) -> None:
    oldest = put(outbox, "20261130T045624Z", subject="first")
    newest = put(outbox, "20261130T045830Z", subject="second", route="reports")
    answer = httpx.get(f"{view.url}/outbox")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    page = answer.text
    assert ids_in_page(page) == [newest, oldest]
    assert '<p id="count" role="status">2 emails</p>' in page
    assert f'<a href="/outbox/{newest}">second</a>' in page
    assert '<input type="search" id="filter" name="q"' in page
    assert '<label for="filter">' in page
    assert 'id="delete-all"' in page
    assert 'id="empty"' not in page


def test_an_empty_outbox_says_so(view: ThreadedServer) -> None:
    page = httpx.get(f"{view.url}/outbox").text
    assert '<p id="empty">' in page
    assert '<p id="count" role="status">0 emails</p>' in page
    assert httpx.get(f"{view.url}/outbox/api/messages").json() == {"messages": [], "total": 0}


def test_one_email_is_counted_in_the_singular(view: ThreadedServer, outbox: Path) -> None:
    put(outbox, "20261130T045624Z")
    assert '<p id="count" role="status">1 email</p>' in httpx.get(f"{view.url}/outbox").text


def test_the_filter_works_without_javascript_on_subject_and_recipient(
    view: ThreadedServer, outbox: Path
) -> None:
    invoice = put(outbox, "20261130T045624Z", subject="Invoice 42")
    for_bob = put(outbox, "20261130T045625Z", subject="photo", to="bob@example.com")
    put(outbox, "20261130T045626Z", subject="other")
    assert ids_in_page(httpx.get(f"{view.url}/outbox", params={"q": "INVOICE"}).text) == [invoice]
    assert ids_in_page(httpx.get(f"{view.url}/outbox", params={"q": "bob@"}).text) == [for_bob]
    page = httpx.get(f"{view.url}/outbox", params={"q": "nothing"}).text
    assert '<p id="count" role="status">0 emails</p>' in page
    assert 'value="nothing"' in page


def test_a_large_outbox_lists_the_newest_and_says_how_many_there_are(
    view: ThreadedServer, outbox: Path
) -> None:
    template = (outbox / f"{put(outbox, '20261130T000000Z')}.eml").read_bytes()
    for n in range(LIST_LIMIT + 4):
        stamp = f"20261130T{n // 3600:02d}{n // 60 % 60:02d}{n % 60:02d}Z"
        (outbox / f"{stamp}-{n:016x}-00000000.eml").write_bytes(template)
    listing = httpx.get(f"{view.url}/outbox/api/messages").json()
    assert len(listing["messages"]) == LIST_LIMIT
    assert listing["total"] == LIST_LIMIT + 5
    assert listing["messages"][0]["id"] == f"20261130T000823Z-{LIST_LIMIT + 3:016x}-00000000"
    page = httpx.get(f"{view.url}/outbox").text
    assert f"The newest {LIST_LIMIT} of {LIST_LIMIT + 5} files are listed" in page


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\xff\xfe not an email at all",
        b"From: notifier@example.com\r\nTo: ops@exa",  # cut short in its headers
        b"Subject: no sender, no recipient\r\n\r\nbody\r\n",
    ],
    ids=["empty", "binary", "cut-short", "headers-missing"],
)
def test_a_damaged_file_is_left_out_and_logged_once(
    view: ThreadedServer, outbox: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    good = put(outbox, "20261130T045624Z")
    damaged = "20261130T045700Z-0123456789abcdef-01234567"
    (outbox / f"{damaged}.eml").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="app.outbox_view.mailbox"):
        for _ in range(2):
            listed = httpx.get(f"{view.url}/outbox/api/messages").json()["messages"]
            assert [message["id"] for message in listed] == [good]
            assert httpx.get(f"{view.url}/outbox").status_code == 200
        assert httpx.get(f"{view.url}/outbox/{damaged}").status_code == 404
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert damaged in str(getattr(warnings[0], "path", ""))


def test_files_that_are_not_messages_are_not_listed(view: ThreadedServer, outbox: Path) -> None:
    good = put(outbox, "20261130T045624Z")
    content = (outbox / f"{good}.eml").read_bytes()
    for name in ("notes.eml", ".tmp123.eml", f"{good}.eml.bak", f"{good.upper()}.eml", "x.txt"):
        (outbox / name).write_bytes(content)
    (outbox / "20261130T045625Z-0123456789abcdef-01234567.eml").mkdir()  # a folder
    listed = httpx.get(f"{view.url}/outbox/api/messages").json()
    assert [message["id"] for message in listed["messages"]] == [good]


# --- one email ---------------------------------------------------------------------------------


def test_the_message_page_has_the_four_views(view: ThreadedServer, outbox: Path) -> None:
    message_id = put(outbox, "20261130T045624Z", subject="Q3 report", text="the text part\n")
    answer = httpx.get(f"{view.url}/outbox/{message_id}")
    assert answer.status_code == 200
    page = answer.text
    assert "<h1>Q3 report</h1>" in page
    for tab in ("html", "text", "headers", "raw"):
        assert f'id="tab-{tab}" aria-selected=' in page
        assert f'aria-controls="panel-{tab}"' in page
        assert f'<section id="panel-{tab}" role="tabpanel"' in page
    assert (
        '<iframe id="html-frame" sandbox="allow-popups allow-popups-to-escape-sandbox"'
        f' src="/outbox/{message_id}/html"'
    ) in page
    assert "the text part" in page
    assert f'<a id="download" href="/outbox/{message_id}.eml"' in page
    assert 'id="delete"' in page
    assert '<th scope="row">Message-ID</th>' in page


def test_the_html_part_is_served_sandboxed_with_links_in_a_new_tab(
    view: ThreadedServer, outbox: Path
) -> None:
    message_id = put(outbox, "20261130T045624Z", html="<!DOCTYPE html><html>" + HOSTILE_HTML)
    answer = httpx.get(f"{view.url}/outbox/{message_id}/html")
    assert answer.status_code == 200
    assert answer.headers["content-security-policy"] == EMAIL_CSP
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    # The first <base> sets the links' target, and a doctype must stay first.
    assert answer.text.startswith('<!DOCTYPE html><base target="_blank"><html>')
    assert HOSTILE_HTML in answer.text  # shown as sent: the sandbox keeps it inert


def test_an_email_without_an_html_part_shows_its_text_escaped(
    view: ThreadedServer, outbox: Path
) -> None:
    message_id = put(outbox, "20261130T045624Z", html=None, text="<b>not bold</b>\n")
    answer = httpx.get(f"{view.url}/outbox/{message_id}/html")
    assert answer.headers["content-security-policy"] == EMAIL_CSP
    assert answer.text == '<base target="_blank"><pre>&lt;b&gt;not bold&lt;/b&gt;\n</pre>'


@pytest.mark.parametrize("suffix", [".eml", "/raw"])
def test_the_raw_file_downloads_as_message_rfc822(
    view: ThreadedServer, outbox: Path, suffix: str
) -> None:
    message_id = put(outbox, "20261130T045624Z")
    answer = httpx.get(f"{view.url}/outbox/{message_id}{suffix}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "message/rfc822"
    assert answer.headers["content-disposition"] == f'attachment; filename="{message_id}.eml"'
    assert answer.content == (outbox / f"{message_id}.eml").read_bytes()


def test_hostile_subjects_and_names_are_escaped_in_the_list_and_the_message(
    view: ThreadedServer, outbox: Path
) -> None:
    message_id = put(
        outbox, "20261130T045624Z", subject=HOSTILE_SUBJECT, to=HOSTILE_TO, route="r-1"
    )
    for path in ("/outbox", f"/outbox/{message_id}"):
        page = httpx.get(f"{view.url}{path}").text
        assert "<script>alert" not in page
        assert "<img src=x" not in page
        assert "&lt;script&gt;alert(&#39;subject&#39;)&lt;/script&gt; report" in page
        assert "&lt;img src=x onerror=alert(1)&gt;" in page


# --- 404 for anything but a message in the outbox ----------------------------------------------


def test_well_formed_ids_of_no_message_are_404(view: ThreadedServer, outbox: Path) -> None:
    put(outbox, "20261130T045624Z")
    unknown = "20261130T045624Z-0000000000000000-00000000"
    for path in ("", ".eml", "/raw", "/html"):
        answer = httpx.get(f"{view.url}/outbox/{unknown}{path}")
        assert answer.status_code == 404
        assert answer.json() == httpx.get(f"{view.url}/no-such-page").json()
    assert httpx.delete(f"{view.url}/outbox/{unknown}").status_code == 404


@pytest.mark.parametrize(
    "target",
    [
        "/outbox/..",
        "/outbox/%2e%2e",
        "/outbox/%2E%2E/html",
        "/outbox/../outbox/ID",
        "/outbox/..%2F..%2Fetc%2Fpasswd",
        "/outbox/%2Fetc%2Fpasswd",
        "/outbox//etc/passwd",
        "/outbox/%2F%2Fetc%2Fpasswd/raw",
        "/outbox/SECRET",
        "/outbox/..%2FSECRET",
        "/outbox/..%2FSECRET.eml",
        "/outbox/ID%2F",
        "/outbox/ID.txt",
        "/outbox/ID.eml.bak",
        "/outbox/ID.EML",
        "/outbox/ID%00",
        "/outbox/ID%00.eml",
        "/outbox/IDx",
        "/outbox/xID",
        "/outbox/UPPER",
        "/outbox/ID/html/x",
        "/outbox/ID/../ID/html",
        "/outbox/static/../../app/main.py",
        "/outbox/static/%2e%2e%2f%2e%2e%2fmain.py",
        "/outbox/static/outbox.html",
        "/outbox/static/pages.py",
        "/outbox/static/",
    ],
)
def test_anything_but_an_outbox_message_is_404(
    view: ThreadedServer, outbox: Path, tmp_path: Path, target: str
) -> None:
    message_id = put(outbox, "20261130T045624Z")
    # A well-formed message outside the outbox, one folder up: reachable only by traversal.
    secret = put(tmp_path, "20261130T045625Z", subject="secret")
    target = (
        target.replace("SECRET", secret)
        .replace("UPPER", message_id.upper())
        .replace("ID", message_id)
    )
    for method in ("GET", "DELETE"):
        status, headers, body = raw_get(view.url, target, method)
        assert status == 404, (method, target)
        assert headers["content-type"] == "application/problem+json"
        assert b"secret" not in body
    assert (outbox / f"{message_id}.eml").exists()
    assert (tmp_path / f"{secret}.eml").exists()


# --- headers -----------------------------------------------------------------------------------


def test_every_page_sends_the_strict_headers(view: ThreadedServer, outbox: Path) -> None:
    message_id = put(outbox, "20261130T045624Z")
    paths = [
        "/outbox",
        "/outbox?q=x",
        f"/outbox/{message_id}",
        f"/outbox/{message_id}.eml",
        f"/outbox/{message_id}/raw",
        "/outbox/api/messages",
        "/outbox/static/outbox.js",
        "/outbox/static/outbox.css",
        "/outbox/static/icon.svg",
    ]
    for path in paths:
        answer = httpx.get(f"{view.url}{path}")
        assert answer.status_code == 200, path
        assert answer.headers["content-security-policy"] == PAGE_CSP, path
        assert answer.headers["referrer-policy"] == "no-referrer", path
        assert answer.headers["x-content-type-options"] == "nosniff", path
    with httpx.stream("GET", f"{view.url}/outbox/events", timeout=5) as stream:
        assert stream.headers["content-security-policy"] == PAGE_CSP
        assert stream.headers["referrer-policy"] == "no-referrer"
    with httpx.Client() as client:
        for path in (f"/outbox/{message_id}/delete", "/outbox/delete"):
            answer = client.post(f"{view.url}{path}", follow_redirects=False)
            assert answer.headers["content-security-policy"] == PAGE_CSP, path


def test_the_pages_carry_no_inline_script_or_style(view: ThreadedServer, outbox: Path) -> None:
    message_id = put(outbox, "20261130T045624Z", html=HOSTILE_HTML)
    for path in ("/outbox", f"/outbox/{message_id}"):
        page = httpx.get(f"{view.url}{path}").text
        assert re.findall(r"<script[^>]*>", page) == [
            '<script src="/outbox/static/outbox.js" defer>'
        ]
        assert "<style" not in page
        assert " style=" not in page
        tags = re.findall(r"<[a-z][^>]*>", page)  # an email's markup shows as &lt;...
        assert not [tag for tag in tags if re.search(r"\son[a-z]+=", tag)]
    js = httpx.get(f"{view.url}/outbox/static/outbox.js")
    assert js.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "innerHTML" not in js.text
    css = httpx.get(f"{view.url}/outbox/static/outbox.css")
    assert css.headers["content-type"] == "text/css; charset=utf-8"


# --- deleting ----------------------------------------------------------------------------------


def test_delete_removes_one_email(view: ThreadedServer, outbox: Path) -> None:
    kept = put(outbox, "20261130T045624Z")
    removed = put(outbox, "20261130T045625Z")
    answer = httpx.delete(f"{view.url}/outbox/{removed}")
    assert answer.status_code == 204
    assert sorted(path.stem for path in outbox.iterdir()) == [kept]
    assert httpx.delete(f"{view.url}/outbox/{removed}").status_code == 404
    assert httpx.get(f"{view.url}/outbox/{removed}").status_code == 404


def test_delete_all_removes_every_email_and_nothing_else(
    view: ThreadedServer, outbox: Path
) -> None:
    for second in range(3):
        put(outbox, f"20261130T04562{second}Z")
    (outbox / "notes.txt").write_text("mine")
    assert httpx.delete(f"{view.url}/outbox").status_code == 204
    assert [path.name for path in outbox.iterdir()] == ["notes.txt"]
    assert httpx.get(f"{view.url}/outbox/api/messages").json()["messages"] == []


def test_the_forms_delete_without_javascript_and_return_to_the_list(
    view: ThreadedServer, outbox: Path
) -> None:
    one = put(outbox, "20261130T045624Z")
    put(outbox, "20261130T045625Z")
    same_site = {"Origin": view.url, "Sec-Fetch-Site": "same-origin"}
    answer = httpx.post(f"{view.url}/outbox/{one}/delete", headers=same_site)
    assert (answer.status_code, answer.headers["location"]) == (303, "/outbox")
    assert len(list(outbox.iterdir())) == 1
    answer = httpx.post(f"{view.url}/outbox/delete", headers=same_site)
    assert (answer.status_code, answer.headers["location"]) == (303, "/outbox")
    assert list(outbox.iterdir()) == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost:1"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "SELF"},
    ],
    ids=["other-origin", "null-origin", "other-port", "cross-site", "same-site", "both"],
)
def test_changes_from_another_site_are_refused(
    view: ThreadedServer, outbox: Path, headers: dict[str, str]
) -> None:
    message_id = put(outbox, "20261130T045624Z")
    headers = {name: value.replace("SELF", view.url) for name, value in headers.items()}
    requests = [
        ("POST", f"/outbox/{message_id}/delete"),
        ("POST", "/outbox/delete"),
        ("DELETE", f"/outbox/{message_id}"),
        ("DELETE", "/outbox"),
    ]
    for method, path in requests:
        answer = httpx.request(method, f"{view.url}{path}", headers=headers)
        assert answer.status_code == 403, (method, path)
        assert answer.headers["content-type"] == "application/problem+json"
    assert (outbox / f"{message_id}.eml").exists()


# --- live updates ------------------------------------------------------------------------------


class EventStream:
    """/outbox/events read in a thread: each event as (name, data), comments as (':', text)."""

    def __init__(self, url: str) -> None:
        self.events: list[tuple[str, str]] = []
        self.ended = threading.Event()
        self.connected = threading.Event()
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self._thread.start()
        assert self.connected.wait(10), "the stream did not open"

    def _read(self, url: str) -> None:
        try:
            with httpx.stream("GET", url, timeout=httpx.Timeout(5, read=60)) as answer:
                assert answer.headers["content-type"].startswith("text/event-stream")
                self._socket = answer.extensions["network_stream"].get_extra_info("socket")
                name = ""
                for line in answer.iter_lines():
                    if line.startswith(":"):
                        self.events.append((":", line[1:].strip()))
                        self.connected.set()
                    elif line.startswith("event:"):
                        name = line.partition(":")[2].strip()
                    elif line.startswith("data:"):
                        self.events.append((name, line.partition(":")[2].strip()))
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def wait_for(self, name: str, seconds: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for event, data in self.events:
                if event == name:
                    document: dict[str, Any] = json.loads(data)
                    return document
            time.sleep(0.02)
        raise AssertionError(f"no {name} event within {seconds} s: {self.events}")

    def close(self) -> None:
        """Hang up as a closed tab does (closing the client from this thread would leave the
        reading thread blocked, and the server waiting for the stream to end)."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        assert self.ended.wait(5)


def test_a_new_email_arrives_on_the_event_stream(view: ThreadedServer, outbox: Path) -> None:
    stream = EventStream(f"{view.url}/outbox/events")
    try:
        headers, body = binary(object_data(bucket="demo", name="reports/q3.csv"))
        assert httpx.post(f"{view.url}{EVENTARC_PATH}", headers=headers, content=body).is_success
        summary = stream.wait_for("message")
    finally:
        stream.close()
    listed = httpx.get(f"{view.url}/outbox/api/messages").json()["messages"]
    assert summary in listed  # the same summary the API gives
    assert "reports/q3.csv" in summary["subject"]
    assert (outbox / f"{summary['id']}.eml").is_file()


def test_deletions_arrive_on_the_event_stream(view: ThreadedServer, outbox: Path) -> None:
    message_id = put(outbox, "20261130T045624Z")
    stream = EventStream(f"{view.url}/outbox/events")
    try:
        httpx.delete(f"{view.url}/outbox/{message_id}")
        assert stream.wait_for("deleted") == {"ids": [message_id]}
    finally:
        stream.close()


def test_the_route_that_sent_an_email_is_listed(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nroutes:\n"
        "  - name: finance-reports\n    match: {prefix: reports/}\n"
        "    to: [finance@example.com]\n"
    )
    with ThreadedServer(outbox_settings(tmp_path, notify_rules=rules)) as server:
        headers, body = binary(object_data(bucket="demo", name="reports/q3.csv"))
        assert httpx.post(f"{server.url}{EVENTARC_PATH}", headers=headers, content=body).is_success
        [message] = httpx.get(f"{server.url}/outbox/api/messages").json()["messages"]
        page = httpx.get(f"{server.url}/outbox").text
    assert message["route"] == "finance-reports"
    assert message["to"] == "finance@example.com"
    assert "<td>finance-reports</td>" in page


def test_a_client_that_does_not_read_is_dropped_not_buffered(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, list[str]]:
        feed = OutboxFeed(tmp_path)
        subscription = feed.subscribe()
        for n in range(QUEUE_LIMIT + 1):
            feed.publish("message", {"n": n})
        chunks = [chunk async for chunk in subscription.stream()]  # ends: it was dropped
        return feed.subscribers, chunks

    subscribers, chunks = asyncio.run(scenario())
    assert subscribers == 0
    assert len(chunks) == 1  # only the opening comment: what was queued went with it
    assert chunks[0].startswith("retry:")


def test_a_quiet_stream_sends_heartbeats() -> None:
    async def scenario() -> list[str]:
        subscription = Subscription()
        chunks: list[str] = []
        async for chunk in subscription.stream(heartbeat=0.01):
            chunks.append(chunk)
            if len(chunks) == 3:
                subscription.close()
        return chunks

    assert asyncio.run(scenario())[1:] == [": heartbeat\n\n", ": heartbeat\n\n"]


def test_closing_the_feed_ends_open_streams_and_refuses_new_ones(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        feed = OutboxFeed(tmp_path)
        open_one = feed.subscribe()
        feed.close()
        late = feed.subscribe()
        return [c async for c in open_one.stream()], [c async for c in late.stream()]

    before, after = asyncio.run(scenario())
    assert len(before) == len(after) == 1  # the opening comment, then the end


def test_sigterm_with_an_open_event_stream_exits_promptly(tmp_path: Path) -> None:
    env = {
        "NOTIFIER": "outbox",
        "EVENT_AUTH": "none",
        "IDEMPOTENCY_STORE": "memory",
        "OUTBOX_DIR": str(tmp_path / "outbox"),
        "DEAD_LETTER_DIR": str(tmp_path / "dead-letter"),
    }
    with ServiceProcess(env, tmp_path) as service:
        stream = EventStream(f"{service.url}/outbox/events")
        try:
            started = time.monotonic()
            service.signal(signal.SIGTERM)
            assert service.wait(timeout=15) in (0, -signal.SIGTERM)
            elapsed = time.monotonic() - started
            assert stream.ended.wait(5)
        finally:
            stream.close()
    assert elapsed < 3, f"shutdown took {elapsed:.1f} s"  # the grace period is 8 s


# --- when the view is off ----------------------------------------------------------------------

OFF_PATHS = [
    ("GET", "/outbox"),
    ("GET", "/outbox/api/messages"),
    ("GET", "/outbox/events"),
    ("GET", "/outbox/static/outbox.js"),
    ("GET", "/outbox/ID"),
    ("GET", "/outbox/ID/html"),
    ("GET", "/outbox/ID.eml"),
    ("DELETE", "/outbox"),
    ("DELETE", "/outbox/ID"),
    ("POST", "/outbox/delete"),
]


@pytest.mark.parametrize(
    "overrides",
    [
        {"event_auth": "oidc", "event_invokers": ["eventarc@p.iam.gserviceaccount.com"]},
        {"event_auth": "iam", "event_invokers": ["eventarc@p.iam.gserviceaccount.com"]},
        {
            "notifier": "sendgrid",
            "sendgrid_api_key": "SG.not-used",
            "sendgrid_host": "http://127.0.0.1:9",
        },
    ],
    ids=["oidc", "iam", "sendgrid"],
)
def test_the_view_is_not_served_unless_outbox_without_auth(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    outbox = tmp_path / "outbox"
    message_id = put(outbox, "20261130T045624Z")
    with ThreadedServer(outbox_settings(tmp_path, **overrides)) as server:
        unknown = httpx.get(f"{server.url}/no-such-page")
        for method, path in OFF_PATHS:
            answer = httpx.request(method, f"{server.url}{path.replace('ID', message_id)}")
            assert answer.status_code == 404, (method, path)
            assert answer.json() == unknown.json()
            assert "content-security-policy" not in answer.headers
    assert (outbox / f"{message_id}.eml").exists()


def test_the_view_loads_no_template_or_email_code_at_start_up(tmp_path: Path) -> None:
    probe = (
        "import sys, app.__main__\n"
        "from app.config import Settings\n"
        "from app.main import create_app\n"
        f"app = create_app(Settings(notifier='outbox', event_auth='none',"
        f" dead_letter_dir={str(tmp_path / 'dl')!r}, outbox_dir={str(tmp_path / 'ob')!r},"
        " idempotency_store='memory'))\n"
        "assert any(getattr(r, 'path', '') == '/outbox' for r in app.routes)\n"
        "heavy = ('jinja2', 'app.outbox_view.mailbox', 'app.outbox_view.pages',"
        " 'app.notify.outbox', 'app.notify.base')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
