"""Routing rules end to end (issue 10): the real server with a rules file in NOTIFY_RULES, events as
Eventarc delivers them, and the emails counted where they land (the outbox writes one file per
recipient with only that recipient in To:; the fake SendGrid records what it accepted).
"""

from __future__ import annotations

import contextlib
import logging
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.emit import build_event
from app.events.models import EventType
from tests.conftest import outbox_settings, read_outbox
from tests.factories import EVENTARC_PATH, binary, object_data
from tests.fakes.sendgrid import FakeSendGrid, Reply
from tests.servers import ROOT, ThreadedServer


def rules_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


Serve = Callable[[str], ThreadedServer]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """`serve(rules_text)` starts the service on the outbox with those rules; stopped at the end."""
    with contextlib.ExitStack() as stack:

        def start(text: str) -> ThreadedServer:
            settings = outbox_settings(tmp_path, notify_rules=rules_file(tmp_path, text))
            return stack.enter_context(ThreadedServer(settings))

        yield start


def deliver(server: ThreadedServer, headers: dict[str, str], body: bytes) -> httpx.Response:
    return httpx.post(server.url + EVENTARC_PATH, headers=headers, content=body, timeout=15)


def upload(server: ThreadedServer, name: str, **overrides: Any) -> httpx.Response:
    return deliver(server, *binary(object_data(name=name, **overrides)))


def emails(tmp_path: Path) -> list[EmailMessage]:
    outbox = tmp_path / "outbox"
    return read_outbox(outbox) if outbox.exists() else []


def per_recipient(tmp_path: Path) -> Counter[str]:
    return Counter(str(message["To"]) for message in emails(tmp_path))


def text_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert isinstance(part, EmailMessage)
    return str(part.get_content())


def html_of(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert isinstance(part, EmailMessage)
    return str(part.get_content())


def only_email_to(tmp_path: Path, recipient: str) -> EmailMessage:
    [message] = [m for m in emails(tmp_path) if m["To"] == recipient]
    return message


@pytest.fixture
def fake() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as server:
        yield server


def sendgrid_settings(fake: FakeSendGrid, tmp_path: Path, rules: Path) -> Settings:
    return Settings.model_validate(
        {
            "notifier": "sendgrid",
            "sendgrid_api_key": fake.api_key,
            "sendgrid_host": fake.url,
            "sendgrid_timeout": 2.0,
            "notify_from": "notifier@example.com",
            "notify_rules": rules,
            "idempotency_store": "memory",
            "dead_letter_dir": tmp_path / "dead-letter",
        }
    )


# --- which routes an event takes -----------------------------------------------------------


def test_the_first_matching_route_wins(serve: Serve, tmp_path: Path) -> None:
    server = serve("""
        version: 1
        routes:
          - name: finance-reports
            match: {prefix: "reports/", suffix: ".csv"}
            to: [finance@example.com]
          - name: everything-else
            to: [ops@example.com]
    """)
    answer = upload(server, "reports/q3.csv")
    assert answer.status_code == 200
    assert answer.json()["status"] == "sent"
    assert per_recipient(tmp_path) == {"finance@example.com": 1}

    assert upload(server, "reports/q3.txt").json()["status"] == "sent"
    assert per_recipient(tmp_path) == {"finance@example.com": 1, "ops@example.com": 1}
    assert "reports/q3.txt" in str(only_email_to(tmp_path, "ops@example.com")["Subject"])


def test_continue_emails_every_recipient_of_the_matching_routes_once(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve("""
        version: 1
        routes:
          - name: reports
            match: {prefix: "reports/"}
            to: [alice@example.com, bob@example.com]
            continue: true
          - name: csv-files
            match: {suffix: ".csv"}
            to: [BOB@example.com, carol@example.com]
            continue: true
          - name: everyone
            to: [alice@example.com, dave@example.com, carol@example.com]
          - name: never-reached
            to: [erin@example.com]
    """)
    answer = upload(server, "reports/q3.csv")
    assert answer.json()["status"] == "sent"
    assert per_recipient(tmp_path) == {
        "alice@example.com": 1,
        "bob@example.com": 1,
        "carol@example.com": 1,
        "dave@example.com": 1,
    }
    # Each recipient's one email comes from the first route that named them.
    for recipient, route in [
        ("alice@example.com", "reports"),
        ("bob@example.com", "reports"),
        ("carol@example.com", "csv-files"),
        ("dave@example.com", "everyone"),
    ]:
        assert f"Sent by route {route} " in text_of(only_email_to(tmp_path, recipient))


def test_a_route_whose_recipients_were_all_served_sends_nothing_and_later_routes_still_run(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve("""
        version: 1
        routes:
          - name: first
            to: [alice@example.com]
            continue: true
          - name: same-people
            to: [alice@example.com]
            continue: true
          - name: last
            to: [bob@example.com]
    """)
    assert upload(server, "a.txt").json()["status"] == "sent"
    assert per_recipient(tmp_path) == {"alice@example.com": 1, "bob@example.com": 1}
    assert "Sent by route first " in text_of(only_email_to(tmp_path, "alice@example.com"))


def test_an_address_written_twice_in_one_route_in_another_case_gets_one_email(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    rules = rules_file(
        tmp_path,
        """
        version: 1
        routes:
          - name: ops
            to: [ops@example.com, dev@example.com, OPS@Example.com]
        """,
    )
    with ThreadedServer(sendgrid_settings(fake, tmp_path, rules)) as server:
        answer = upload(server, "a.txt")
    # SendGrid refuses a message naming one address twice (any case): that would dead-letter.
    assert answer.json()["status"] == "sent"
    assert fake.delivered_recipients() == ["ops@example.com", "dev@example.com"]


def test_a_drop_route_acknowledges_the_event_and_tells_nobody(serve: Serve, tmp_path: Path) -> None:
    server = serve("""
        version: 1
        routes:
          - name: quiet-logs
            match: {prefix: "logs/"}
            drop: true
          - name: everything-else
            to: [ops@example.com]
    """)
    headers, body = binary(object_data(name="logs/2024-10-01.log"), event_id="log-1")
    answer = deliver(server, headers, body)
    assert answer.status_code == 200
    assert answer.json() == {"status": "dropped", "id": "log-1"}
    assert emails(tmp_path) == []
    # The same server still emails what the drop route does not match.
    assert upload(server, "data/x.bin").json()["status"] == "sent"
    assert per_recipient(tmp_path) == {"ops@example.com": 1}


def test_a_drop_route_after_a_continue_route_stops_the_search_but_earlier_routes_send(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve("""
        version: 1
        routes:
          - name: audit
            to: [audit@example.com]
            continue: true
          - name: quiet-logs
            match: {prefix: "logs/"}
            drop: true
          - name: everything-else
            to: [ops@example.com]
    """)
    assert upload(server, "logs/x.log").json()["status"] == "sent"
    assert per_recipient(tmp_path) == {"audit@example.com": 1}


def test_an_event_no_route_matches_is_acknowledged_as_ignored_and_logged(
    serve: Serve, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve("""
        version: 1
        routes:
          - name: finance-reports
            match: {prefix: "reports/"}
            to: [finance@example.com]
    """)
    headers, body = binary(object_data(bucket="acme", name="photos/cat.jpg"), event_id="e-42")
    with caplog.at_level(logging.INFO, logger="app.delivery.pipeline"):
        answer = deliver(server, headers, body)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ignored", "id": "e-42"}
    assert emails(tmp_path) == []
    [record] = [r for r in caplog.records if r.getMessage() == "no route matched, ignored"]
    assert record.levelno == logging.INFO
    assert getattr(record, "event_id", None) == "e-42"
    assert getattr(record, "bucket", None) == "acme"
    assert getattr(record, "object", None) == "photos/cat.jpg"
    assert getattr(record, "event_type", None) == "finalized"


def test_events_are_matched_on_type_size_content_type_and_metadata(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve("""
        version: 1
        routes:
          - name: big-finance-csv
            match:
              events: [finalized]
              min_size: 1KiB
              content_type: "text/*"
              metadata: {team: finance}
            not: {suffix: ".tmp"}
            to: [finance@example.com]
    """)
    finance = {"team": "finance"}
    small = upload(server, "a.csv", size="1023", metadata=finance)
    tmp = upload(server, "a.tmp", size="4096", metadata=finance)
    other_team = upload(server, "b.csv", size="4096", metadata={"team": "ops"})
    binary_type = upload(server, "c.csv", size="4096", contentType="image/png", metadata=finance)
    deleted = deliver(
        server,
        *binary(object_data(name="d.csv", size="4096", metadata=finance), EventType.DELETED),
    )
    assert [a.json()["status"] for a in (small, tmp, other_team, binary_type, deleted)] == [
        "ignored"
    ] * 5
    assert emails(tmp_path) == []
    answer = upload(server, "e.csv", size="1024", contentType="text/csv", metadata=finance)
    assert answer.json()["status"] == "sent"
    assert per_recipient(tmp_path) == {"finance@example.com": 1}


# --- what the email says -------------------------------------------------------------------

TEMPLATES = """
    version: 1
    routes:
      - name: finance-reports
        match: {prefix: "reports/", suffix: ".csv", metadata: {team: "*"}}
        to: [finance@example.com]
        subject: "[{{ bucket }}] new report {{ name }} ({{ size_human }})"
        text: |
          {{ name }} {{ verb }} in {{ bucket }}.
          Size: {{ size }} bytes, team {{ metadata.team }}, event {{ event }}.
        html: "<p>New report <b>{{ name }}</b> in {{ bucket }} by {{ metadata.team }}</p>"
"""


def test_route_templates_write_the_subject_text_and_html(serve: Serve, tmp_path: Path) -> None:
    server = serve(TEMPLATES)
    data = object_data(
        bucket="acme-reports", name="reports/q3.csv", size="2048", metadata={"team": "finance"}
    )
    assert deliver(server, *binary(data)).json()["status"] == "sent"
    [message] = emails(tmp_path)
    assert message["Subject"] == "[acme-reports] new report reports/q3.csv (2.0 KiB (2,048 bytes))"
    text = text_of(message)
    assert text.startswith(
        "reports/q3.csv was uploaded in acme-reports.\n"
        "Size: 2048 bytes, team finance, event finalized.\n"
    )
    html = html_of(message)
    assert "<p>New report <b>reports/q3.csv</b> in acme-reports by finance</p>" in html


@pytest.mark.parametrize(
    "hostile",
    ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>'],
    ids=["script", "attribute-break"],
)
def test_a_hostile_object_name_is_escaped_in_the_html_part(
    serve: Serve, tmp_path: Path, hostile: str
) -> None:
    server = serve(TEMPLATES)
    name = f"reports/{hostile}.csv"
    data = object_data(name=name, metadata={"team": "<b>finance</b>"})
    assert deliver(server, *binary(data)).json()["status"] == "sent"
    [message] = emails(tmp_path)
    html = html_of(message)
    assert "<script" not in html
    assert "<img" not in html
    assert "<b>finance</b>" not in html  # metadata values are escaped too
    assert "&lt;b&gt;finance&lt;/b&gt;" in html
    escaped = hostile.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    escaped = escaped.replace('"', "&#34;")
    assert f"<b>reports/{escaped}.csv</b>" in html
    # The plain-text part and the subject carry the name as written (nothing renders them).
    assert name in text_of(message)
    assert name in str(message["Subject"])


def test_a_line_break_in_an_object_name_cannot_forge_lines_in_the_text_or_subject(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve(TEMPLATES)
    name = "reports/q3\nURGENT: wire money to evil@example.com.csv"
    data = object_data(name=name, metadata={"team": "finance"})
    assert deliver(server, *binary(data)).json()["status"] == "sent"
    [message] = emails(tmp_path)
    first_line = text_of(message).splitlines()[0]
    assert first_line.startswith("reports/q3\\x0aURGENT: wire money to evil@example.com.csv was")
    assert not any(line.startswith("URGENT") for line in text_of(message).splitlines())
    subject = str(message["Subject"])
    assert "\n" not in subject
    assert "reports/q3 URGENT: wire money" in subject
    assert "q3\\x0aURGENT" in html_of(message)


def test_every_email_ends_with_a_footer_naming_the_route_and_why_in_both_parts(
    serve: Serve, tmp_path: Path
) -> None:
    server = serve("""
        version: 1
        routes:
          - name: finance-reports
            match: {prefix: "reports/", suffix: ".csv"}
            to: [finance@example.com]
            html: "<html><body><p>{{ name }}</p></body></html>"
          - name: everything-else
            to: [ops@example.com]
    """)
    upload(server, "reports/q3.csv")
    upload(server, "misc/readme.txt")
    finance = only_email_to(tmp_path, "finance@example.com")
    ops = only_email_to(tmp_path, "ops@example.com")

    footer = "Sent by route finance-reports because it matched: prefix reports/, suffix .csv"
    assert text_of(finance).rstrip("\n").endswith("\n\n" + footer)
    html = html_of(finance)
    assert footer in html
    assert html.index(footer) < html.index("</body>")  # inside the template's body

    # A route without templates sends today's email, with the footer too.
    ops_footer = "Sent by route everything-else because it matched: every event"
    assert text_of(ops).rstrip("\n").endswith(ops_footer)
    assert ops_footer in html_of(ops)
    assert "misc/readme.txt" in text_of(ops)


def test_a_template_that_fails_on_an_event_still_tells_the_change_in_todays_words(
    serve: Serve, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve("""
        version: 1
        routes:
          - name: sizes
            to: [ops@example.com]
            subject: "{{ name }}: {{ size // 1024 }} KiB"
            text: "{{ name }} is {{ size + 1 }} bytes long, give or take one"
    """)
    with caplog.at_level(logging.WARNING, logger="app.rules.templates"):
        answer = upload(server, "no-size.bin", size=None)  # no size: the templates raise
    assert answer.json()["status"] == "sent"
    [message] = emails(tmp_path)
    assert message["Subject"] == "[gs://some-bucket] finalized: no-size.bin"
    assert "gs://some-bucket/no-size.bin was uploaded." in text_of(message)
    assert "give or take" not in text_of(message)
    assert "Sent by route sizes because it matched: every event" in text_of(message)
    failures = [r for r in caplog.records if r.name == "app.rules.templates"]
    assert sorted(str(getattr(r, "field", "")) for r in failures) == ["subject", "text"]
    assert all(getattr(r, "route", None) == "sizes" for r in failures)


# --- redelivery ----------------------------------------------------------------------------


def test_a_redelivered_change_is_a_duplicate_for_every_route(serve: Serve, tmp_path: Path) -> None:
    server = serve("""
        version: 1
        routes:
          - name: reports
            match: {prefix: "reports/"}
            to: [finance@example.com]
            continue: true
          - name: everyone
            to: [ops@example.com]
    """)
    data = object_data(name="reports/q3.csv")
    first = deliver(server, *binary(data))
    second = deliver(server, *binary(data))  # the same change, a new message id
    assert first.json()["status"] == "sent"
    assert second.status_code == 200
    assert second.json()["status"] == "duplicate"
    assert per_recipient(tmp_path) == {"finance@example.com": 1, "ops@example.com": 1}


def test_a_redelivery_sends_only_the_routes_not_yet_sent(
    fake: FakeSendGrid, tmp_path: Path
) -> None:
    rules = rules_file(
        tmp_path,
        """
        version: 1
        routes:
          - name: reports
            match: {prefix: "reports/"}
            to: [finance@example.com]
            continue: true
          - name: everyone
            to: [ops@example.com, finance@example.com]
        """,
    )
    fake.script(Reply.normal(), Reply.error(500))  # the second route's send fails
    data = object_data(name="reports/q3.csv")
    with ThreadedServer(sendgrid_settings(fake, tmp_path, rules)) as server:
        first = deliver(server, *binary(data))
        assert first.status_code == 503
        assert fake.delivered_recipients() == ["finance@example.com"]

        again = deliver(server, *binary(data))  # Eventarc delivers again
        assert again.json()["status"] == "sent"
        third = deliver(server, *binary(data))
        assert third.json()["status"] == "duplicate"

    assert len(fake.requests()) == 3  # reports, everyone (500), everyone again
    assert Counter(fake.delivered_recipients()) == {
        "finance@example.com": 1,
        "ops@example.com": 1,
    }
    subjects = [message["subject"] for message in fake.accepted()]
    assert len(subjects) == 2
    footers = [message["content"][0]["value"] for message in fake.accepted()]
    assert "Sent by route reports " in footers[0]
    assert "Sent by route everyone " in footers[1]


# --- the README's example file -------------------------------------------------------------


def test_the_example_rules_file_routes_emitted_events_as_its_comments_say(
    tmp_path: Path,
) -> None:
    settings = outbox_settings(tmp_path, notify_rules=ROOT / "rules.example.yaml")

    def emit(server: ThreadedServer, event_type: EventType, name: str) -> str:
        message = build_event(event_type, "acme-data", name, 52431)
        answer = httpx.post(
            server.url + EVENTARC_PATH, headers=message.headers, content=message.body, timeout=15
        )
        assert answer.status_code == 200, answer.text
        status: str = answer.json()["status"]
        return status

    with ThreadedServer(settings) as server:
        # Logs and temporary files: acknowledged, nobody told.
        assert emit(server, EventType.FINALIZED, "logs/2024-10-01.log") == "dropped"
        assert emit(server, EventType.FINALIZED, "uploads/part-0001.tmp") == "dropped"
        assert emit(server, EventType.FINALIZED, "reports/2024/q3.csv.tmp") == "dropped"
        assert emails(tmp_path) == []

        # A CSV under reports/: finance and ops, each once; finance's with the route's subject.
        assert emit(server, EventType.FINALIZED, "reports/2024/q3.csv") == "sent"
        assert per_recipient(tmp_path) == {"finance@example.com": 1, "ops@example.com": 1}
        finance = only_email_to(tmp_path, "finance@example.com")
        assert finance["Subject"] == "[acme-data] new report reports/2024/q3.csv, 51.2 KiB " + (
            "(52,431 bytes)"
        )
        assert "Sent by route finance-reports " in text_of(finance)
        assert "Sent by route everything-else " in text_of(
            only_email_to(tmp_path, "ops@example.com")
        )

    for path in (tmp_path / "outbox").glob("*.eml"):
        path.unlink()
    with ThreadedServer(settings) as server:
        # Everything else (another folder, or a report deleted): ops and finance, each once.
        assert emit(server, EventType.FINALIZED, "images/logo.png") == "sent"
        assert per_recipient(tmp_path) == {"finance@example.com": 1, "ops@example.com": 1}
        assert emit(server, EventType.DELETED, "reports/2024/q2.csv") == "sent"
        assert per_recipient(tmp_path) == {"finance@example.com": 2, "ops@example.com": 2}
        assert all(
            "Sent by route everything-else " in text_of(message) for message in emails(tmp_path)
        )
