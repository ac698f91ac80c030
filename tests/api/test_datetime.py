"""GET|POST /datetime against the real server: the book's HTTP function, a greeting with today's
date and the time, as text or JSON; every wrong input a 400 problem that says what is wrong."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.servers import ThreadedServer

JSON = {"Accept": "application/json"}
PROBLEM = "application/problem+json"


def get(
    server: ThreadedServer, headers: dict[str, str] | None = None, **query: str
) -> httpx.Response:
    return httpx.get(f"{server.url}/datetime", params=query, headers=headers, timeout=10)


def post(
    server: ThreadedServer,
    body: bytes | None = None,
    *,
    json: object = None,
    headers: dict[str, str] | None = None,
    **query: str,
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/datetime",
        params=query,
        content=body,
        json=json,
        headers=headers,
        timeout=10,
    )


def answered_within(
    zone: tzinfo, request: Callable[[], httpx.Response]
) -> tuple[httpx.Response, datetime, datetime]:
    """The answer, and the clock (in `zone`, whole seconds) just before and after it."""
    before = datetime.now(zone).replace(microsecond=0)
    response = request()
    after = datetime.now(zone)
    return response, before, after


def clock_readings(before: datetime, after: datetime) -> set[str]:
    """Every HH:MM:SS the clock showed between `before` and `after`."""
    count = int((after - before).total_seconds()) + 1
    return {f"{before + timedelta(seconds=step):%H:%M:%S}" for step in range(count)}


def assert_problem(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == 400
    assert problem["title"] == "Bad Request"
    said = (problem["detail"] + " " + str(problem.get("errors", ""))).lower()
    for word in words:
        assert word.lower() in said


def test_get_greets_the_requester_with_todays_date_and_time(outbox_server: ThreadedServer) -> None:
    response, before, after = answered_within(UTC, lambda: get(outbox_server, requester="John"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "John" in text
    dates = {f"{moment:%A, %d %B %Y}" for moment in (before, after)}
    assert any(date in text for date in dates)
    [time] = re.findall(r"\b\d{2}:\d{2}:\d{2}\b", text)
    assert time in clock_readings(before, after)


def test_json_answer_has_every_field(outbox_server: ThreadedServer) -> None:
    response, before, after = answered_within(
        UTC, lambda: get(outbox_server, JSON, requester="John")
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert set(answer) == {"requester", "date", "time", "timezone", "timestamp", "message"}
    assert answer["requester"] == "John"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer["date"])
    assert re.fullmatch(r"\d{2}:\d{2}:\d{2}", answer["time"])
    assert answer["timezone"] == "UTC"
    timestamp = datetime.fromisoformat(answer["timestamp"])
    assert timestamp.utcoffset() == timedelta(0)
    assert before <= timestamp <= after
    assert answer["date"] == f"{timestamp:%Y-%m-%d}"
    assert answer["time"] == f"{timestamp:%H:%M:%S}"
    assert "John" in answer["message"]
    assert answer["time"] in answer["message"]


def test_timestamp_is_rfc_3339(outbox_server: ThreadedServer) -> None:
    timestamp = get(outbox_server, JSON).json()["timestamp"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})", timestamp)


@pytest.mark.parametrize(
    ("zone", "names"),
    [("Europe/Paris", {"CET", "CEST"}), ("Asia/Kolkata", {"IST"}), ("UTC", {"UTC"})],
)
def test_tz_changes_the_timezone(outbox_server: ThreadedServer, zone: str, names: set[str]) -> None:
    response, before, after = answered_within(
        ZoneInfo(zone), lambda: get(outbox_server, JSON, tz=zone)
    )
    answer = response.json()
    assert answer["timezone"] == zone  # the IANA name asked for: abbreviations are ambiguous
    assert any(name in answer["message"] for name in names)
    timestamp = datetime.fromisoformat(answer["timestamp"])
    assert timestamp.utcoffset() == before.utcoffset()
    assert before <= timestamp <= after
    assert answer["time"] == f"{timestamp:%H:%M:%S}"
    assert answer["date"] == f"{timestamp:%Y-%m-%d}"


def test_tz_applies_to_the_plain_text_answer(outbox_server: ThreadedServer) -> None:
    text = get(outbox_server, tz="Asia/Kolkata").text
    assert "IST" in text


def test_post_reads_the_requester_from_a_json_body(outbox_server: ThreadedServer) -> None:
    response = post(outbox_server, json={"requester": "Ada"}, headers=JSON)
    assert response.status_code == 200
    assert response.json()["requester"] == "Ada"


def test_post_answers_in_plain_text_by_default(outbox_server: ThreadedServer) -> None:
    response = post(outbox_server, json={"requester": "Ada"})
    assert response.headers["content-type"].startswith("text/plain")
    assert "Ada" in response.text


def test_post_takes_tz_from_the_query(outbox_server: ThreadedServer) -> None:
    answer = post(outbox_server, json={"requester": "Ada"}, headers=JSON, tz="Asia/Kolkata").json()
    assert answer["timezone"] == "Asia/Kolkata"
    assert "IST" in answer["message"]


def test_the_query_wins_over_the_body(outbox_server: ThreadedServer) -> None:
    answer = post(outbox_server, json={"requester": "Body"}, headers=JSON, requester="Query").json()
    assert answer["requester"] == "Query"


@pytest.mark.parametrize("body", [None, b"", b"   ", b"{}", b'{"requester": null}', b'{"x": 1}'])
def test_post_without_a_requester_greets_anonymous(
    outbox_server: ThreadedServer, body: bytes | None
) -> None:
    response = post(outbox_server, body, headers=JSON)
    assert response.status_code == 200
    assert response.json()["requester"] == "anonymous"


@pytest.mark.parametrize("query", [{}, {"requester": ""}])
def test_get_without_a_requester_greets_anonymous(
    outbox_server: ThreadedServer, query: dict[str, str]
) -> None:
    assert get(outbox_server, JSON, **query).json()["requester"] == "anonymous"


def test_unicode_and_markup_requesters_come_back_as_sent(outbox_server: ThreadedServer) -> None:
    name = "Zoë <b>&</b> 東京"
    assert get(outbox_server, JSON, requester=name).json()["requester"] == name


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime", ""])
def test_unknown_tz_is_a_400_problem(outbox_server: ThreadedServer, zone: str) -> None:
    assert_problem(get(outbox_server, tz=zone), "tz", "IANA")


def test_unknown_tz_in_a_post_is_a_400_problem(outbox_server: ThreadedServer) -> None:
    assert_problem(post(outbox_server, json={"requester": "Ada"}, tz="Nowhere/City"), "tz")


def test_a_requester_of_100_characters_is_greeted(outbox_server: ThreadedServer) -> None:
    name = "x" * 100
    assert get(outbox_server, JSON, requester=name).json()["requester"] == name
    assert post(outbox_server, json={"requester": name}, headers=JSON).json()["requester"] == name


def test_a_requester_over_100_characters_in_the_query_is_a_400(
    outbox_server: ThreadedServer,
) -> None:
    response = get(outbox_server, requester="x" * 101)
    assert_problem(response, "requester", "100")
    assert "x" * 101 not in response.text


def test_a_requester_over_100_characters_in_the_body_is_a_400(
    outbox_server: ThreadedServer,
) -> None:
    response = post(outbox_server, json={"requester": "x" * 101})
    assert_problem(response, "requester", "100")
    assert "x" * 101 not in response.text


@pytest.mark.parametrize("requester", [5, ["Ada"], {"name": "Ada"}, True])
def test_a_requester_that_is_not_a_string_is_a_400(
    outbox_server: ThreadedServer, requester: object
) -> None:
    assert_problem(post(outbox_server, json={"requester": requester}), "requester", "string")


@pytest.mark.parametrize(
    "body", [b"{broken", b'{"requester": "Ada"', b"\xff\xfe", b"requester=Ada"]
)
def test_a_broken_json_body_is_a_400(outbox_server: ThreadedServer, body: bytes) -> None:
    assert_problem(
        post(outbox_server, body, headers={"Content-Type": "application/json"}), "JSON object"
    )


@pytest.mark.parametrize("body", [b"[1, 2]", b'"Ada"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_a_400(outbox_server: ThreadedServer, body: bytes) -> None:
    assert_problem(post(outbox_server, body), "JSON object")


def test_a_body_over_4_kib_is_refused(outbox_server: ThreadedServer) -> None:
    response = post(outbox_server, json={"requester": "Ada", "padding": "x" * 5000})
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM


@pytest.mark.parametrize(
    "call",
    [
        lambda server: get(server, requester="John"),
        lambda server: get(server, JSON),
        lambda server: get(server, tz="Nowhere"),
        lambda server: post(server, b"{broken"),
    ],
    ids=["text", "json", "bad-tz", "broken-body"],
)
def test_every_answer_says_nosniff(
    outbox_server: ThreadedServer, call: Callable[[ThreadedServer], httpx.Response]
) -> None:
    response = call(outbox_server)
    assert response.headers["x-content-type-options"] == "nosniff"


def test_healthz_is_public(outbox_server: ThreadedServer) -> None:
    response = httpx.get(f"{outbox_server.url}/healthz", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# --- HEAD, as uptime monitors ask ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [("*/*", "text/plain; charset=utf-8"), ("application/json", "application/json")],
)
def test_head_answers_like_get_without_a_body(
    outbox_server: ThreadedServer, accept: str, content_type: str
) -> None:
    with httpx.Client(base_url=outbox_server.url, headers={"Accept": accept}, timeout=10) as client:
        head = client.head("/datetime", params={"requester": "John"})
        # Same connection: a body sent after the HEAD answer would garble this one.
        get = client.get("/datetime", params={"requester": "John"})
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == content_type
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["x-content-type-options"] == "nosniff"
    assert get.status_code == 200
    assert "John" in get.text


def test_head_refuses_a_bad_tz_like_get(outbox_server: ThreadedServer) -> None:
    response = httpx.head(f"{outbox_server.url}/datetime", params={"tz": "Nowhere"}, timeout=10)
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_a_wrong_method_is_405_listing_every_method_datetime_takes(
    outbox_server: ThreadedServer, method: str
) -> None:
    response = httpx.request(method, f"{outbox_server.url}/datetime", timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, POST"
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["status"] == 405


def test_head_is_left_out_of_the_openapi_document(outbox_server: ThreadedServer) -> None:
    paths = httpx.get(f"{outbox_server.url}/openapi.json", timeout=10).json()["paths"]
    assert sorted(paths["/datetime"]) == ["get", "post"]


# --- Accept: negotiated (RFC 9110 §12.5.1), not matched as a substring ----------------------------

TEXT_ANSWER = "text/plain; charset=utf-8"
JSON_ANSWER = "application/json"
NEGOTIATED = {
    "APPLICATION/JSON": JSON_ANSWER,
    "Application/Json ; Q=0.8": JSON_ANSWER,
    "application/json; charset=utf-8": JSON_ANSWER,
    "application/*": JSON_ANSWER,
    "application/json;q=0, text/plain": TEXT_ANSWER,
    "text/*;q=0.5, application/json;q=0.9": JSON_ANSWER,
    "application/json;q=0.4, text/plain;q=0.5": TEXT_ANSWER,
    "text/plain;q=0, */*": JSON_ANSWER,
    "*/*;q=0.1, application/json": JSON_ANSWER,
    "*/*": TEXT_ANSWER,
    "text/*": TEXT_ANSWER,
    "text/plain; charset=UTF-8": TEXT_ANSWER,
    "text/plain;charset=iso-8859-1, application/json;q=0.5": JSON_ANSWER,  # no latin-1 text here
    "application/json, text/plain, */*": TEXT_ANSWER,  # a tie: the default
    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8": TEXT_ANSWER,  # a browser
    "": TEXT_ANSWER,
    "not a media range": TEXT_ANSWER,  # unreadable: disregarded, as RFC 9110 allows
    "application/json;q=2": TEXT_ANSWER,  # no valid q-value: nothing readable either
}


@pytest.mark.parametrize(("accept", "content_type"), NEGOTIATED.items(), ids=list(NEGOTIATED))
def test_accept_is_negotiated(
    outbox_server: ThreadedServer, accept: str, content_type: str
) -> None:
    for response in (
        get(outbox_server, {"Accept": accept}, requester="Ada"),
        post(outbox_server, json={"requester": "Ada"}, headers={"Accept": accept}),
    ):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == content_type
        assert response.headers["vary"] == "Accept"
        if content_type == JSON_ANSWER:
            assert response.json()["requester"] == "Ada"
        else:
            assert response.text.startswith("Hello Ada! Today is ")


def test_no_accept_header_is_plain_text(outbox_server: ThreadedServer) -> None:
    with httpx.Client(timeout=10) as client:
        client.headers.pop("accept")
        response = client.get(f"{outbox_server.url}/datetime", params={"requester": "Ada"})
    assert response.request.headers.get("accept") is None
    assert response.headers["content-type"] == TEXT_ANSWER
    assert response.text.startswith("Hello Ada!")


@pytest.mark.parametrize(
    "accept",
    [
        "application/json;q=0",
        "image/png",
        "text/html",
        "*/*;q=0",
        "text/plain;format=flowed",
        "text/*;q=0, application/*;q=0, */*",
    ],
)
def test_an_accept_that_rules_out_both_types_is_406(
    outbox_server: ThreadedServer, accept: str
) -> None:
    response = get(outbox_server, {"Accept": accept})
    assert response.status_code == 406
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["vary"] == "Accept"
    problem = response.json()
    assert problem["status"] == 406
    assert problem["title"] == "Not Acceptable"
    assert "text/plain" in problem["detail"]
    assert "application/json" in problem["detail"]
