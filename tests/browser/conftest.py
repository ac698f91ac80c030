"""The outbox pages in a real browser: headless Chromium from Debian's `chromium` package, driven
by Playwright for Python (`executable_path`: Playwright's own browser download is not reachable
from these machines, and .ci/run installs the Debian package when it is missing).

One browser for the package, a fresh context (no cookies, no cache) and page per test. Every
request the page makes is recorded, and any not to 127.0.0.1 is aborted and fails the test: the
pages use no CDN, and a captured email reaches nothing outside. Screenshots go to
test-output/browser/ (gitignored); the run's summary says where.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Frame,
    Page,
    Route,
    sync_playwright,
)

from tests import factories
from tests.conftest import outbox_settings
from tests.servers import ROOT, ThreadedServer, free_port

SCREENSHOTS = ROOT / "test-output" / "browser"

# Chromium as root, on a closed network: no sandbox (root), and none of the background
# connections (updates, sync, field trials) the network would refuse. Playwright adds a fresh
# user data directory to every launch. Chromium's Local Network Access checks would stop a
# sandboxed email's request to the loopback canary before it is sent: the hostile-email test
# would then pass for Chromium's reason, not the page's (other browsers have no such check).
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-features=LocalNetworkAccessChecks",
)

# How Chromium says it stopped something a sandboxed frame or a CSP forbids: the proof that a
# captured email stayed inert, not an error of the page. Any other console error is one.
ENFORCEMENT = re.compile(
    r"^Blocked script execution in "
    r"|^Blocked form submission to "
    r"|^Refused to "
    r"|violates the following Content Security Policy directive.*The action has been blocked"
)

_screenshots: list[Path] = []


def chromium_binary() -> str:
    binary = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required under CI=true (.ci/run installs it)")
        pytest.skip(
            "chromium not installed (apt-get install chromium, or CHROMIUM=/path/to/chromium);"
            " CI runs these"
        )
    return binary


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    executable = chromium_binary()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Service:
    """The service (uvicorn in a thread) with the outbox notifier and no event authentication."""

    server: ThreadedServer
    outbox: Path

    @property
    def url(self) -> str:
        return self.server.url

    def emit(self, name: str, **data: Any) -> None:
        """One `finalized` event for object `name`, delivered as Eventarc does."""
        headers, body = factories.binary(factories.object_data(name=name, **data))
        response = httpx.post(self.url + factories.EVENTARC_PATH, headers=headers, content=body)
        assert response.status_code == 200, response.text

    def emit_in_order(self, *names: str) -> None:
        """One event each, in distinct seconds (an outbox file's time has one-second steps)."""
        for index, name in enumerate(names):
            if index:
                time.sleep(1.02 - time.time() % 1)
            self.emit(name)

    def messages(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/outbox/api/messages")
        assert response.status_code == 200, response.text
        messages: list[dict[str, Any]] = response.json()["messages"]
        return messages

    def files(self) -> list[str]:
        return sorted(path.name for path in self.outbox.glob("*.eml"))


class Services:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.stack = contextlib.ExitStack()

    def start(self, **overrides: Any) -> Service:
        """One recipient (ops@example.com) unless `notify_to` says otherwise."""
        workdir = self.tmp_path / f"service-{free_port()}"
        settings = outbox_settings(
            workdir, **{"notify_to": ["ops@example.com"], "event_auth": "none", **overrides}
        )
        assert settings.outbox_dir is not None
        server = self.stack.enter_context(ThreadedServer(settings))
        return Service(server, settings.outbox_dir)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    started = Services(tmp_path)
    with started.stack:
        yield started


@pytest.fixture
def service(services: Services) -> Service:
    return services.start()


@dataclass
class Watch:
    """What the page did: every request, dialog, console message, error and navigation."""

    # Requests that went to the network (a load the browser refused, by CSP or sandbox, never
    # does: it is in `failed`, with the reason), and those aborted for leaving loopback.
    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    console: list[ConsoleMessage] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    navigations: list[str] = field(default_factory=list)
    # A delete button may ask "Are you sure?": tests that delete accept; all others refuse, and
    # the dialog is recorded either way.
    accept_dialogs: bool = False

    def console_errors(self) -> list[str]:
        return [message.text for message in self.console if message.type == "error"]

    def unexpected_console_errors(self) -> list[str]:
        return [text for text in self.console_errors() if not ENFORCEMENT.search(text)]


@pytest.fixture
def watch() -> Watch:
    return Watch()


def watched_page(browser: Browser, watch: Watch, javascript: bool = True) -> Iterator[Page]:
    """A fresh context and page whose requests, dialogs, console and navigations `watch` records;
    a request beyond loopback or an uncaught error in the page fails the test."""
    context = browser.new_context(java_script_enabled=javascript)

    def loopback_only(route: Route) -> None:
        url = route.request.url
        watch.requests.append(url)
        if urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            watch.blocked.append(url)
            route.abort("blockedbyclient")

    def on_dialog(dialog: Dialog) -> None:
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        if watch.accept_dialogs:
            dialog.accept()
        else:
            dialog.dismiss()

    def on_navigated(frame: Frame) -> None:
        if frame.parent_frame is None:
            watch.navigations.append(frame.url)

    context.route("**/*", loopback_only)
    context.on(
        "requestfailed", lambda request: watch.failed.append(f"{request.url} ({request.failure})")
    )
    opened = context.new_page()
    opened.on("dialog", on_dialog)
    opened.on("console", lambda message: watch.console.append(message))
    opened.on("pageerror", lambda error: watch.page_errors.append(str(error)))
    opened.on("framenavigated", on_navigated)
    opened.set_default_timeout(10_000)
    try:
        yield opened
        assert not watch.blocked, f"requests beyond loopback: {watch.blocked}"
        assert not watch.page_errors, f"uncaught errors in the page: {watch.page_errors}"
    finally:
        context.close()


# Both depend on `services`, so a page closes before the service it talks to stops.
@pytest.fixture
def page(browser: Browser, services: Services, watch: Watch) -> Iterator[Page]:
    yield from watched_page(browser, watch)


@pytest.fixture
def page_without_js(browser: Browser, services: Services) -> Iterator[Page]:
    yield from watched_page(browser, Watch(), javascript=False)


@pytest.fixture
def screenshot(page: Page) -> Callable[[str], Path]:
    """Save the page as test-output/browser/NAME.png; the run's summary lists the files."""

    def take(name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        _screenshots.append(path)
        return path

    return take


@dataclass
class Canary:
    """A local HTTP server that must see nothing: any request to it came from a captured email."""

    port: int
    hits: list[str]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def canary() -> Iterator[Canary]:
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _record(self) -> None:
            hits.append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_GET = do_POST = do_HEAD = _record

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Canary(server.server_address[1], hits)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _screenshots:
        terminalreporter.write_sep("-", "outbox screenshots for review")
        for path in dict.fromkeys(_screenshots):
            terminalreporter.write_line(str(path))
