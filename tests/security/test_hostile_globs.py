"""Issue 19, item 1: whoever names an object or sets its metadata cannot make a glob backtrack.

Python's `re` took about 50 s to fail `reports/*_*_*_*.csv` against `reports/` and 1,000
underscores, on the event loop: every other request waited. The globs are RE2 automata now
(app/rules/match.py). The bounds below are far above what a linear match takes and far below
what the backtracking one took, so they hold on any machine.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from app.rules.match import glob_regex
from tests.conftest import outbox_settings
from tests.factories import EVENTARC_PATH, binary, object_data
from tests.servers import ThreadedServer

# Globs whose regex backtracked, and values built to make them try every split.
PATH_GLOBS = [
    "reports/*_*_*_*.csv",
    "*a*a*a*a*a*a*b",
    "**/*a*a*a*a*b",
    "**/x/**/x/**/x/**/y",
    "?*?*?*?*?*?*?*!",
    "[a-z]*[a-z]*[a-z]*[a-z]*[a-z]*1",
]
PLAIN_GLOBS = ["*a*a*a*a*a*a*a*b", "*-*-*-*-*-*-*-!", "a**a**a**a**a**b"]
NAMES = [
    "reports/" + "_" * 1016,
    "a" * 1024,
    "x/" * 512,
    "a/" * 511 + "aa",
    "reports/" + "a_" * 508,
]
VALUES = ["a" * 8192, "-" * 8192, "a-" * 4096]


def test_every_hostile_glob_fails_fast_on_every_hostile_name() -> None:
    slowest = 0.0
    for pattern, name in itertools.product(PATH_GLOBS, NAMES):
        regex = glob_regex(pattern, path=True)
        started = time.perf_counter()
        assert regex.match(name) is None, (pattern, name[:20])
        slowest = max(slowest, time.perf_counter() - started)
    for pattern, value in itertools.product(PLAIN_GLOBS, VALUES):
        regex = glob_regex(pattern, path=False)
        started = time.perf_counter()
        assert regex.match(value) is None, (pattern, value[:20])
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.1  # a linear match takes well under a millisecond (make bench)


def test_the_issues_backtracking_route_neither_stalls_the_event_nor_the_service(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\n"
        "routes:\n"
        "  - name: reports\n"
        '    match: {name: "reports/*_*_*_*.csv"}\n'
        "    to: [finance@example.com]\n"
        "  - name: tagged\n"
        '    match: {metadata: {tag: "*a*a*a*a*a*a*a*b"}}\n'
        "    to: [ops@example.com]\n",
        encoding="utf-8",
    )
    name = "reports/" + "_" * 1000

    def event() -> tuple[httpx.Response, float]:
        headers, body = binary(object_data(bucket="acme", name=name, metadata={"tag": "a" * 8000}))
        started = time.perf_counter()
        answer = httpx.post(url + EVENTARC_PATH, headers=headers, content=body, timeout=60)
        return answer, time.perf_counter() - started

    def greeting() -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        answer = httpx.get(url + "/datetime?requester=Ann", timeout=60)
        return answer, time.perf_counter() - started

    with ThreadedServer(outbox_settings(tmp_path, notify_rules=rules)) as server:
        url = server.url
        event()  # the first event loads the rules file and the event path
        with ThreadPoolExecutor(2) as pool:
            posted = pool.submit(event)
            time.sleep(0.005)  # the event is in the server when the greeting arrives
            greeted = pool.submit(greeting)
            (answer, event_seconds), (hello, hello_seconds) = posted.result(), greeted.result()
    assert answer.status_code == 200
    assert answer.json()["status"] == "ignored"
    assert hello.status_code == 200
    # Backtracking took about 50 s for the name alone; both answers take milliseconds now.
    assert event_seconds < 1.0
    assert hello_seconds < 1.0
