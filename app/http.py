"""A small HTTP/1.1 client for one origin: keep-alive connections, a deadline per request.

Why not aiohttp or httpx: the notifier makes one kind of call, a JSON POST to SendGrid, up to 80 at
once. Measured here, aiohttp spent about 300 µs of CPU per request on that (cookie jars, tracing
hooks, header merging, URL objects) and httpx's pool collapsed to about 70 requests/s with 80 in
flight. This client writes the request in one call and parses the answer with httptools (llhttp,
the parser Node.js uses, already installed with uvicorn), for a fraction of that; see
BENCHMARKS.md. What it leaves out on purpose: redirects, proxies, cookies, compression, HTTP/2,
pipelining, and HEAD (the parser would wait for the body a HEAD answer announces but never sends).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

IDLE_SECONDS = 15.0  # reuse a connection only while the server surely still keeps it open


class HttpError(Exception):
    """No answer: the connection failed, broke, or the deadline passed (`timed_out`)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; one request at a time; httptools calls the on_* methods."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[HttpResponse] | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._until_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport, hence the cast).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.answer is None or self.answer.done():
            # Bytes nobody asked for (a 408 before the server closes, say): the next answer
            # read from this connection could be theirs, so it is not used again.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(HttpError(f"malformed HTTP response: {type(error).__name__}"))
            self.close()
        except httptools.HttpParserUpgrade:  # a 101 answer; no request here asks for one
            self._fail(HttpError("unexpected protocol upgrade"))
            self.close()

    def eof_received(self) -> None:
        self.closed = True  # before connection_lost: the transport is already closing
        if self._until_eof and self.answer is not None and not self.answer.done():
            # Neither Content-Length nor Transfer-Encoding: the body ends where the server
            # closes the connection (RFC 9112 §6.3, item 8). Only a clean close ends it; a
            # reset (connection_lost with an error) leaves it incomplete.
            self.answer.set_result(self._response(self.parser.get_status_code()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(HttpError("connection closed before the response was complete"))

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        # A repeated field is one list-valued field (RFC 9110 §5.3): `Cache-Control: public`
        # then `Cache-Control: max-age=60` means both.
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._until_eof = "content-length" not in self._headers and (
            "transfer-encoding" not in self._headers
        )

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        response = self._response(status)
        if status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints); the final one follows
        answer = self.answer
        if answer is None or answer.done():
            self.close()  # a second answer to one request: this connection is out of step
            return
        self.reusable = self.parser.should_keep_alive()
        answer.set_result(response)

    def _response(self, status: int) -> HttpResponse:
        response = HttpResponse(status, self._headers, b"".join(self._body))
        self._headers, self._body, self._until_eof = {}, [], False
        return response

    def request(self, payload: bytes) -> asyncio.Future[HttpResponse]:
        """Write one request; `connection_made` has run (create_connection awaits it)."""
        transport = cast(asyncio.Transport, self.transport)
        self.answer = asyncio.get_running_loop().create_future()
        self.reusable = False
        transport.write(payload)
        return self.answer

    def _fail(self, error: HttpError) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(error)

    @property
    def usable(self) -> bool:
        # A transport closing on its own (a reset just read) is not yet `closed`: writing to
        # it would be lost under asyncio and raise RuntimeError under uvloop.
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HttpClient:
    """POSTs to one origin (`https://api.sendgrid.com`, or a local fake in tests)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 128,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be http(s)://host[:port]")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = (
            (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        )
        self._prefix = parts.path.rstrip("/")
        default_port = self._port == (443 if parts.scheme == "https" else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host  # IPv6 (RFC 9110 §7.2)
        host_header = host if default_port else f"{host}:{self._port}"
        fixed = {"Host": host_header, "User-Agent": "gcs-notifier", **(headers or {})}
        self._fixed_headers = "".join(f"{name}: {value}\r\n" for name, value in fixed.items())
        self._timeout = timeout
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._open: set[_Connection] = set()

    async def post(self, path: str, body: bytes, content_type: str) -> HttpResponse:
        return await self.request("POST", path, body, content_type)

    async def get(self, path: str) -> HttpResponse:
        return await self.request("GET", path)

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str | None = None
    ) -> HttpResponse:
        """One request, written in one call; raises HttpError when there is no answer in time."""
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._fixed_headers}"
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body)}\r\n"
        payload = (head + "\r\n").encode("latin-1") + body
        try:
            async with asyncio.timeout(self._timeout), self._slots:
                return await self._exchange(payload)
        except TimeoutError:
            raise HttpError("no answer in time", timed_out=True) from None

    async def _exchange(self, payload: bytes) -> HttpResponse:
        connection = self._idle_connection() or await self._connect()
        try:
            response = await connection.request(payload)
        except BaseException:
            # Timed out, cancelled or broken: the connection's state is unknown, never reuse it.
            self._discard(connection)
            raise
        if connection.reusable and not connection.closed:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            self._discard(connection)
        return response

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()  # the most recently used is the most likely alive
            if connection.usable and now - connection.idle_since < IDLE_SECONDS:
                return connection
            self._discard(connection)
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                _Connection,
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )
        except OSError as error:
            raise HttpError(f"cannot connect: {type(error).__name__}") from error
        self._open.add(connection)
        return connection

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def aclose(self) -> None:
        self._idle.clear()
        for connection in list(self._open):
            self._discard(connection)
