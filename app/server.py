"""The process `python -m app` runs: serve on HOST:PORT the way Cloud Run expects.

Access logs are off (Cloud Run logs every request itself). On SIGTERM uvicorn stops accepting and
lets in-flight requests finish for up to 8 s (Cloud Run sends SIGKILL 10 s after SIGTERM); sends
still in flight a second before that are cut short, release their claims and answer 503, so
Eventarc delivers those events again. Then the lifespan shutdown closes the store and the HTTP
sessions.

Process-wide tweaks live here, not in the app factory: the garbage collector is frozen after
start-up and again once the event path has loaded, so its full passes stay short under load.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import load_settings
from app.logs import configure_logging
from app.main import create_app
from app.preflight import StartupError

GRACEFUL_SHUTDOWN_SECONDS = 8
SEND_DEADLINE_SECONDS = GRACEFUL_SHUTDOWN_SECONDS - 1  # leaves a second to release and answer
MAX_REQUEST_HEAD_BYTES = 64 * 1024  # request line and headers; Eventarc's are a few KiB


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a limit on the request head: httptools buffers a
    header until it is whole and has no limit of its own (uvicorn's h11_max_incomplete_event_size
    applies to h11 only), so a client could make the server buffer headers without end. Bytes
    that arrive while a head is still incomplete are counted; past the limit the connection
    gets 431 and is closed, having buffered at most the limit and one read."""

    _reading_head = False
    _head_bytes = 0

    def on_message_begin(self) -> None:
        self._reading_head = True
        self._head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._reading_head or self.transport.is_closing():
            return
        self._head_bytes += len(data)  # the head is still incomplete: all of it was head
        if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
            self.logger.warning("request head over %d bytes refused", MAX_REQUEST_HEAD_BYTES)
            body = b"request headers too large\n"
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: text/plain; charset=utf-8\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n"
                b"connection: close\r\n\r\n" + body
            )
            self.transport.close()


class Server(uvicorn.Server):
    """Tells the app when SIGTERM arrives, so sends in flight end inside the grace period."""

    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit_signal()
        super().handle_exit(sig, frame)


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    fatal: list[str] = []

    def stop(message: str) -> None:
        # A rules file that cannot be used, found once serving began: stop, exit non-zero.
        fatal.append(message)
        server.should_exit = True

    try:
        app = create_app(settings, on_loaded=gc.freeze, on_fatal=stop)
    except StartupError as error:
        sys.exit(f"cannot start: {error}")

    def shutting_down() -> None:
        runtime = getattr(app.state, "runtime", None)
        if runtime is not None:
            runtime.shutting_down(SEND_DEADLINE_SECONDS)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=BoundedHttpToolsProtocol,
        log_config=None,  # keep the JSON logging configured above
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=15,  # idle connections are closed; Cloud Run's front end reconnects
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    gc.freeze()  # start-up's objects live as long as the process: keep GC passes short
    server = Server(config, on_exit_signal=shutting_down)
    server.run()
    if fatal:
        sys.exit(f"cannot start: {fatal[0]}")
