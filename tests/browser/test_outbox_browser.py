"""GET /outbox and GET /outbox/{id} in headless Chromium, against the DOM contract of issue 14:
the list newest first, live (SSE) without a reload, the filter and its count, the rendered HTML
tab, the tabs by keyboard, delete, and a hostile email that stays inert."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import Canary, Service, Services, Watch
from tests.factories import EVENTARC_PATH
from tests.servers import ROOT, ServiceProcess

pytestmark = pytest.mark.browser

ROWS = "#messages tbody tr"
PANELS = ("html", "text", "headers", "raw")


def visible_rows(page: Page) -> list[str]:
    """The subject cell of each row the reader sees, top to bottom."""
    rows = page.locator(ROWS)
    return [
        rows.nth(index).locator("td").nth(2).inner_text()
        for index in range(rows.count())
        if rows.nth(index).is_visible()
    ]


def open_list_live(page: Page, service: Service) -> None:
    """Open the list and wait until its event stream is connected."""
    with page.expect_response(re.compile(r"/outbox/events(\?.*)?$")):
        page.goto(f"{service.url}/outbox")
    # The stream answered; give the server a moment to subscribe it to the feed.
    page.wait_for_timeout(300)


def test_the_list_shows_the_emails_newest_first(page: Page, service: Service) -> None:
    service.emit_in_order("first.txt", "second.txt", "third.txt")
    newest_first = [message["id"] for message in service.messages()]

    page.goto(f"{service.url}/outbox")

    expect(page.locator("main h1")).to_have_text("Outbox")
    expect(page.get_by_label(re.compile("filter|search", re.IGNORECASE))).to_have_id("filter")
    rows = page.locator(ROWS)
    expect(rows).to_have_count(3)
    assert [rows.nth(i).get_attribute("data-id") for i in range(3)] == newest_first
    subjects = visible_rows(page)
    assert len(subjects) == 3
    assert "third.txt" in subjects[0]
    assert "second.txt" in subjects[1]
    assert "first.txt" in subjects[2]
    first = rows.first.locator("td")
    expect(first).to_have_count(4)  # time, to, subject, route
    expect(first.nth(1)).to_contain_text("ops@example.com")
    expect(first.nth(2).locator("a")).to_have_attribute("href", f"/outbox/{newest_first[0]}")
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*3 emails\s*$"))
    expect(page.locator("#empty")).to_have_count(0)


def test_an_empty_outbox_says_so(page: Page, service: Service) -> None:
    page.goto(f"{service.url}/outbox")

    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*0 emails\s*$"))


def test_a_new_email_appears_without_a_reload(page: Page, service: Service, watch: Watch) -> None:
    service.emit("before.txt")
    open_list_live(page, service)
    page.evaluate("window.outboxMarker = 'still the same document'")
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*1 email\s*$"))

    requests_before = list(watch.requests)

    service.emit("arrived-live.txt")

    rows = page.locator(ROWS)
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("arrived-live.txt")
    expect(rows.first).to_have_attribute("data-id", service.messages()[0]["id"])
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*2 emails\s*$"))
    assert page.evaluate("window.outboxMarker") == "still the same document"
    assert watch.navigations == [f"{service.url}/outbox"]
    # It came down the open event stream: no new request (no reload, no polling).
    assert watch.requests == requests_before
    assert any(url.startswith(f"{service.url}/outbox/events") for url in requests_before)


def test_the_filter_narrows_the_list_by_subject_and_recipient(
    page: Page, services: Services
) -> None:
    service = services.start(notify_to=["ops@example.com", "dev@example.com"])
    service.emit("reports/q3.csv")
    service.emit("photos/cat.jpg")
    page.goto(f"{service.url}/outbox")
    expect(page.locator(ROWS)).to_have_count(4)  # one row per recipient's copy
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*4 emails\s*$"))
    search = page.locator("#filter")

    search.fill("q3.csv")
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*2 emails\s*$"))
    assert len(visible_rows(page)) == 2
    assert all("q3.csv" in subject for subject in visible_rows(page))

    search.fill("dev@example")
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*2 emails\s*$"))
    rows = [row for row in page.locator(ROWS).all() if row.is_visible()]
    visible_to = [row.locator("td").nth(1).inner_text() for row in rows]
    assert visible_to == ["dev@example.com", "dev@example.com"]

    search.fill("cat.jpg")
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*2 emails\s*$"))

    search.fill("nothing matches this")
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*0 emails\s*$"))
    assert visible_rows(page) == []

    search.fill("")
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*4 emails\s*$"))
    assert len(visible_rows(page)) == 4


def test_the_pages_work_without_javascript(page_without_js: Page, service: Service) -> None:
    service.emit_in_order("reports/q3.csv", "photos/cat.jpg")
    page = page_without_js
    page.goto(f"{service.url}/outbox")
    expect(page.locator(ROWS)).to_have_count(2)

    page.locator("#filter").fill("cat.jpg")
    page.locator("#filter").press("Enter")  # the GET form: ?q=cat.jpg

    expect(page).to_have_url(re.compile(r"/outbox\?(.*&)?q=cat\.jpg"))
    expect(page.locator(ROWS)).to_have_count(1)
    expect(page.locator(ROWS).first).to_contain_text("cat.jpg")
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*1 email\s*$"))

    page.locator(f"{ROWS} td a").first.click()
    for name in PANELS:  # every panel, in order
        expect(page.locator(f"#panel-{name}")).to_be_visible()
    tops = [page.locator(f"#panel-{name}").bounding_box() for name in PANELS]
    assert all(box is not None for box in tops)
    assert [box["y"] for box in tops if box] == sorted(box["y"] for box in tops if box)


def test_the_html_tab_renders_the_email(page: Page, service: Service) -> None:
    service.emit("rendered/report.pdf")
    message_id = service.messages()[0]["id"]

    page.goto(f"{service.url}/outbox")
    page.locator(f'{ROWS}[data-id="{message_id}"] td a').click()

    expect(page).to_have_url(f"{service.url}/outbox/{message_id}")
    expect(page.locator("h1")).to_contain_text("rendered/report.pdf")
    expect(page.locator("#tab-html")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-html")).to_be_visible()
    frame = page.locator("#panel-html iframe#html-frame")
    expect(frame).to_have_attribute("src", f"/outbox/{message_id}/html")
    expect(frame.content_frame.get_by_text("rendered/report.pdf").first).to_be_visible()
    box = frame.bounding_box()
    assert box is not None
    assert box["height"] >= 100, box  # readable, not a sliver


def test_the_tabs_work_by_keyboard(page: Page, service: Service) -> None:
    service.emit("keyboard.txt")
    message_id = service.messages()[0]["id"]
    page.goto(f"{service.url}/outbox/{message_id}")

    expect(page.locator('[role="tablist"]')).to_have_count(1)
    for name in PANELS:
        tab = page.locator(f"#tab-{name}")
        expect(tab).to_have_attribute("role", "tab")
        expect(tab).to_have_attribute("aria-controls", f"panel-{name}")

    def assert_selected(name: str) -> None:
        for other in PANELS:
            selected = other == name
            expect(page.locator(f"#tab-{other}")).to_have_attribute(
                "aria-selected", "true" if selected else "false"
            )
            panel = page.locator(f"#panel-{other}")
            if selected:
                expect(panel).to_be_visible()
            else:
                expect(panel).to_be_hidden()

    def assert_focused(name: str) -> None:
        expect(page.locator(f"#tab-{name}")).to_be_focused()

    assert_selected("html")
    page.locator("#tab-html").focus()
    page.keyboard.press("ArrowRight")
    assert_focused("text")
    page.keyboard.press("Enter")
    assert_selected("text")
    expect(page.locator("#panel-text pre")).to_contain_text("keyboard.txt")

    page.keyboard.press("ArrowRight")
    assert_focused("headers")
    page.keyboard.press("Space")
    assert_selected("headers")
    expect(page.locator("#panel-headers")).to_contain_text("ops@example.com")

    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert_focused("html")
    page.keyboard.press("ArrowLeft")  # wraps around to the last tab
    assert_focused("raw")
    page.keyboard.press("Enter")
    assert_selected("raw")
    expect(page.locator("#panel-raw pre")).to_contain_text("Subject:")
    expect(page.locator("#download")).to_have_attribute(
        "href", re.compile(rf"/outbox/{message_id}(\.eml|/raw)$")
    )

    page.keyboard.press("ArrowRight")  # and from the last back to the first
    assert_focused("html")
    page.keyboard.press("Space")
    assert_selected("html")


def test_delete_one_and_delete_all(page: Page, service: Service, watch: Watch) -> None:
    watch.accept_dialogs = True
    service.emit_in_order("keep.txt", "remove.txt")
    remove, keep = (message["id"] for message in service.messages())
    assert service.files() == sorted([f"{keep}.eml", f"{remove}.eml"])

    page.goto(f"{service.url}/outbox/{remove}")
    page.locator("#delete").click()

    expect(page).to_have_url(f"{service.url}/outbox")
    expect(page.locator(ROWS)).to_have_count(1)
    expect(page.locator(ROWS).first).to_have_attribute("data-id", keep)
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*1 email\s*$"))
    assert service.files() == [f"{keep}.eml"]

    page.locator("#delete-all").click()

    expect(page.locator(ROWS)).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#count")).to_have_text(re.compile(r"^\s*0 emails\s*$"))
    assert service.files() == []
    assert service.messages() == []


HOSTILE_NAME = (
    "<script>alert(1)</script><img src=x onerror=alert(2)>"
    '<form action="http://127.0.0.1:{port}/steal"><button>Go</button></form>'
)

# The route's own HTML: the object name (autoescaped, so it shows as text), and raw HTML written
# into the template, which reaches the email as markup: what the iframe's sandbox and CSP are for.
HOSTILE_RULES = """\
version: 1
routes:
  - name: hostile
    to: [victim@example.com]
    html: |
      <meta http-equiv="refresh" content="0; url=http://127.0.0.1:{port}/refresh">
      <h2>Object {{{{ name }}}}</h2>
      <script>fetch("http://127.0.0.1:{port}/script"); alert("script ran")</script>
      <img src=x onerror="fetch('http://127.0.0.1:{port}/onerror'); alert('onerror ran')">
      <img src="http://127.0.0.1:{port}/pixel.png" alt="remote pixel">
      <div style="background-image: url(http://127.0.0.1:{port}/background.png)">styled</div>
      <form action="http://127.0.0.1:{port}/steal" method="post">
        <input name="secret" value="s3cret"><button id="go">Go</button>
      </form>
"""


def test_a_hostile_email_stays_inert(
    page: Page,
    services: Services,
    canary: Canary,
    watch: Watch,
    tmp_path: Path,
    screenshot: Callable[[str], Path],
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(HOSTILE_RULES.format(port=canary.port), encoding="utf-8")
    service = services.start(notify_rules=rules)
    name = HOSTILE_NAME.format(port=canary.port)

    # It arrives while the list is open (the live path), then the server renders it.
    open_list_live(page, service)
    service.emit(name)
    rows = page.locator(ROWS)
    expect(rows).to_have_count(1)
    expect(rows.first.locator("td").nth(2)).to_contain_text("<script>alert(1)</script>")
    expect(rows.first.locator("td").nth(3)).to_contain_text("hostile")
    page.reload()
    expect(rows.first.locator("td").nth(2)).to_contain_text("<img src=x onerror=alert(2)>")
    message_id = service.messages()[0]["id"]

    rows.first.locator("td a").click()
    expect(page).to_have_url(f"{service.url}/outbox/{message_id}")
    expect(page.locator("h1")).to_contain_text("<script>alert(1)</script>")
    frame_element = page.locator("iframe#html-frame")
    frame = frame_element.content_frame
    expect(frame.locator("h2")).to_contain_text(f"Object {name}")  # the name, as text
    expect(frame.locator("img")).to_have_count(2)  # the template's: the name made none
    page.wait_for_timeout(500)  # time for anything that would load or run
    screenshot("message-hostile")

    frame.locator("#go").click()
    page.wait_for_timeout(1000)
    expect(page).to_have_url(f"{service.url}/outbox/{message_id}")
    assert len(page.context.pages) == 1

    for name_ in PANELS[1:]:
        page.locator(f"#tab-{name_}").click()
        expect(page.locator(f"#panel-{name_}")).to_be_visible()
    expect(page.locator("#panel-raw pre")).to_contain_text("<script>fetch(")
    page.wait_for_timeout(300)

    assert watch.dialogs == []
    assert canary.hits == []
    assert watch.blocked == []
    beyond = [url for url in watch.requests if not url.startswith(f"{service.url}/")]
    assert beyond == [], beyond
    from_the_email = [
        url
        for url in watch.requests
        if re.search(r"/(x|pixel\.png|background\.png|steal|refresh|script|onerror)(\?|$)", url)
    ]
    assert from_the_email == [], from_the_email
    assert not [text for text in watch.console_errors() if "Ignored call to" in text]
    assert watch.unexpected_console_errors() == []
    assert watch.page_errors == []
    # What kept it so: the frame's sandbox (and the CSP sandbox its document is served with).
    sandbox = frame_element.get_attribute("sandbox")
    assert sandbox is not None
    assert not {"allow-scripts", "allow-forms", "allow-same-origin"} & set(sandbox.split())


def test_screenshots_for_review(
    page: Page, service: Service, screenshot: Callable[[str], Path]
) -> None:
    service.emit_in_order("reports/2026/q3.csv", "photos/cat.jpg", "invoices/0042.pdf")
    page.goto(f"{service.url}/outbox")
    expect(page.locator(ROWS)).to_have_count(3)
    shots = [screenshot("list")]

    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    shots.append(screenshot("list-phone"))
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the list scrolls sideways on a phone ({width} px wide)"

    page.set_viewport_size({"width": 1280, "height": 900})
    page.locator(ROWS).first.locator("td a").click()
    expect(page.locator("iframe#html-frame").content_frame.locator("body")).to_contain_text(
        "invoices/0042.pdf"
    )
    shots.append(screenshot("message"))

    for path in shots:
        assert path.read_bytes().startswith(b"\x89PNG"), path


def test_the_issue_done_when_python_m_app_and_three_emits(page: Page, tmp_path: Path) -> None:
    """`python -m app` (outbox, no event auth), three `python -m app.emit` calls, and the list
    shows the three emails, the newest first; opening one shows the rendered HTML."""
    env = {"NOTIFIER": "outbox", "EVENT_AUTH": "none", "IDEMPOTENCY_STORE": "memory"}
    names = ["demo/one.txt", "demo/two.txt", "demo/three.txt"]
    with ServiceProcess(env, tmp_path) as service:
        for index, name in enumerate(names):
            if index:
                time.sleep(1.02 - time.time() % 1)  # distinct seconds: a file's time
            command = ["finalized", "--bucket", "demo", "--name", name]
            emitted = subprocess.run(
                [sys.executable, "-m", "app.emit", *command, "--url", service.url + EVENTARC_PATH],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert emitted.returncode == 0, emitted.stdout + emitted.stderr

        page.goto(f"{service.url}/outbox")
        rows = page.locator(ROWS)
        expect(rows).to_have_count(3)
        subjects = visible_rows(page)
        assert [name for subject in subjects for name in names if name in subject] == names[::-1]
        rows.first.locator("td a").click()
        frame = page.locator("iframe#html-frame").content_frame
        expect(frame.get_by_text("demo/three.txt").first).to_be_visible()
        page.goto("about:blank")  # let go of the event stream before the service stops
