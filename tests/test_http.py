"""app.http against real servers on loopback, under both event loops the service runs on.

Each scenario starts a scripted server (`asyncio.start_server`) in the client's own event loop.
The server records every connection and every raw request; the test's `reply` function decides,
request by request, which bytes go back, when, and whether the connection then closes or resets.
uvicorn picks uvloop when it is installed, as it is in the image, so every test runs on uvloop
as well as on asyncio's own loop. Either loop reporting an error to its exception handler (an
exception escaping a protocol callback, say) fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import socket
import ssl
import string
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from app import http
from app.http import HttpClient, HttpError, HttpResponse

T = TypeVar("T")


# --- running scenarios ----------------------------------------------------------------------


class Run(Protocol):
    def __call__(self, scenario: Coroutine[Any, Any, T], /) -> T: ...


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a scenario in a new event loop and fails if the loop reported any error."""
    loop_factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def run_scenario(scenario: Coroutine[Any, Any, T]) -> T:
        reported: list[dict[str, Any]] = []
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.get_loop().set_exception_handler(lambda _, context: reported.append(context))
            result = runner.run(scenario)
        assert reported == []
        return result

    return run_scenario


@contextlib.asynccontextmanager
async def open_client(base_url: str, **options: Any) -> AsyncIterator[HttpClient]:
    options.setdefault("timeout", 5.0)
    client = HttpClient(base_url, **options)
    try:
        yield client
    finally:
        await client.aclose()


async def eventually(condition: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# --- the scripted server --------------------------------------------------------------------


@dataclass
class Request:
    connection: int
    line: str
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def path(self) -> str:
        return self.line.split(" ")[1]


@dataclass
class ServerConnection:
    index: int
    open: bool = True
    closed_by_client: bool = False


class Peer:
    """The server's side of one connection, as a `reply` function sees it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: ServerConnection
    ) -> None:
        self._reader, self._writer, self._state = reader, writer, state

    async def send(self, *segments: bytes) -> None:
        """Each segment in its own write, the loop turning in between."""
        for segment in segments:
            self._writer.write(segment)
            await self._writer.drain()
            await asyncio.sleep(0)

    def close(self) -> None:
        self._writer.close()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN (SO_LINGER 0)."""
        sock = self._writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()

    async def hang(self) -> None:
        """Never answer; return once the client has closed the connection."""
        await self._reader.read()
        self._state.closed_by_client = True


Reply = Callable[[Request, Peer], Awaitable[None]]


class ScriptedServer:
    def __init__(
        self, reply: Reply, *, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._reply, self._host, self._ssl = reply, host, ssl_context
        self.requests: list[Request] = []
        self.connections: list[ServerConnection] = []
        self.most_open = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{'https' if self._ssl else 'http'}://{host}:{self.port}"

    @property
    def open_now(self) -> int:
        return sum(connection.open for connection in self.connections)

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, self._host, 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        state = ServerConnection(len(self.connections))
        self.connections.append(state)
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self._converse(reader, writer, state)
        except ConnectionError:
            state.closed_by_client = True
        except asyncio.CancelledError:
            pass  # the server is shutting down (asyncio reports a cancelled handler as an error)
        finally:
            state.open = False
            writer.close()

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: ServerConnection
    ) -> None:
        peer = Peer(reader, writer, state)
        while not writer.is_closing() and not state.closed_by_client:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                state.closed_by_client = True
                return
            line, *lines = head.decode("latin-1").removesuffix("\r\n\r\n").split("\r\n")
            fields = [(name, value.strip()) for name, _, value in (f.partition(":") for f in lines)]
            request = Request(state.index, line, fields, b"")
            length = int(next(iter(request.values("content-length")), "0"))
            request.body = await reader.readexactly(length)
            self.requests.append(request)
            await self._reply(request, peer)


# --- answers --------------------------------------------------------------------------------


def answer(
    status: int = 200,
    body: bytes = b"",
    *,
    headers: tuple[tuple[str, str], ...] = (),
    version: str = "HTTP/1.1",
    length: bool = True,
) -> bytes:
    fields = [*headers, *([("Content-Length", str(len(body)))] if length else [])]
    head = f"{version} {status} Reason\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields)
    return (head + "\r\n").encode("latin-1") + body


def chunked(*chunks: bytes) -> bytes:
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks if chunk)
    return encoded + b"0\r\n\r\n"


async def echo(request: Request, peer: Peer) -> None:
    """200 with the request's path and body, so each answer names the request it answers."""
    await peer.send(answer(200, request.path.encode() + b" " + request.body))


def echoed(response: HttpResponse) -> bytes:
    assert response.status == 200
    return response.body


# --- the request on the wire ----------------------------------------------------------------


def test_a_post_carries_each_header_once_and_its_body_byte_for_byte(run: Run) -> None:
    body = '{"subject": "ü"}\r\n\r\n'.encode() + bytes(range(256))

    async def scenario() -> tuple[ScriptedServer, HttpResponse]:
        async with ScriptedServer(echo) as server:
            headers = {"Authorization": "Bearer sg-key"}
            async with open_client(server.url, headers=headers) as client:
                return server, await client.post("/v3/mail/send", body, "application/json")

    server, response = run(scenario())

    [request] = server.requests
    assert request.line == "POST /v3/mail/send HTTP/1.1"
    assert sorted(name.lower() for name, _ in request.headers) == [
        "authorization",
        "content-length",
        "content-type",
        "host",
        "user-agent",
    ]
    assert request.values("Host") == [f"127.0.0.1:{server.port}"]
    assert request.values("Authorization") == ["Bearer sg-key"]
    assert request.values("Content-Type") == ["application/json"]
    assert request.values("Content-Length") == [str(len(body))]
    assert request.body == body
    assert response.body == b"/v3/mail/send " + body


def test_a_get_has_neither_body_nor_body_headers(run: Run) -> None:
    async def scenario() -> ScriptedServer:
        async with ScriptedServer(echo) as server, open_client(server.url) as client:
            assert echoed(await client.get("/oauth2/v1/certs?x=1")) == b"/oauth2/v1/certs?x=1 "
            return server

    [request] = run(scenario()).requests

    assert request.line == "GET /oauth2/v1/certs?x=1 HTTP/1.1"
    assert sorted(name.lower() for name, _ in request.headers) == ["host", "user-agent"]
    assert request.body == b""


def test_an_empty_post_still_says_content_length_zero(run: Run) -> None:
    async def scenario() -> ScriptedServer:
        async with ScriptedServer(echo) as server, open_client(server.url) as client:
            await client.post("/empty", b"", "text/plain")
            return server

    [request] = run(scenario()).requests

    assert request.values("Content-Length") == ["0"]


def test_the_base_url_path_prefixes_every_request_path(run: Run) -> None:
    async def scenario() -> list[bytes]:
        async with ScriptedServer(echo) as server, open_client(server.url + "/api/v3/") as client:
            return [echoed(await client.get("/mail/send")), echoed(await client.get("/x"))]

    assert run(scenario()) == [b"/api/v3/mail/send ", b"/api/v3/x "]


def test_an_ipv6_origin_is_bracketed_in_the_host_header(run: Run) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")

    async def scenario() -> ScriptedServer:
        async with ScriptedServer(echo, host="::1") as server, open_client(server.url) as client:
            await client.get("/")
            return server

    server = run(scenario())

    assert server.requests[0].values("Host") == [f"[::1]:{server.port}"]


def test_a_base_url_that_is_not_http_is_refused() -> None:
    for url in ["ftp://example.com", "example.com", "http://", "https:///path"]:
        with pytest.raises(ValueError, match="base_url"):
            HttpClient(url, timeout=1)


# --- keep-alive -----------------------------------------------------------------------------


def test_sequential_requests_share_one_connection(run: Run) -> None:
    async def scenario() -> tuple[ScriptedServer, list[bytes]]:
        async with ScriptedServer(echo) as server, open_client(server.url) as client:
            bodies = [echoed(await client.post(f"/{n}", b"x", "text/plain")) for n in range(5)]
            return server, bodies

    server, bodies = run(scenario())

    assert bodies == [f"/{n} x".encode() for n in range(5)]
    assert len(server.connections) == 1
    assert {request.connection for request in server.requests} == {0}


@pytest.mark.parametrize(
    ("version", "headers", "reused"),
    [
        ("HTTP/1.1", (("Connection", "close"),), False),
        ("HTTP/1.1", (("Connection", "Keep-Alive, close"),), False),
        ("HTTP/1.0", (), False),
        ("HTTP/1.0", (("Connection", "keep-alive"),), True),
        ("HTTP/1.1", (("Connection", "keep-alive"),), True),
    ],
)
def test_a_connection_is_reused_only_when_the_answer_keeps_it_alive(
    run: Run, version: str, headers: tuple[tuple[str, str], ...], reused: bool
) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        # The server itself never closes: the client decides from the answer alone.
        await peer.send(answer(200, b"ok", headers=headers, version=version))

    async def scenario() -> ScriptedServer:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            for _ in range(2):
                assert (await client.get("/")).body == b"ok"
            await eventually(lambda: reused or not server.connections[0].open)
            return server

    server = run(scenario())

    assert [request.connection for request in server.requests] == ([0, 0] if reused else [0, 1])
    if not reused:
        assert server.connections[0].closed_by_client


def test_a_connection_the_server_closed_while_idle_is_replaced(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        await peer.send(answer(200, request.path.encode()))
        if request.connection == 0:
            peer.close()  # a keep-alive timeout on the server's side, after answering

    async def scenario() -> tuple[ScriptedServer, list[bytes]]:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            first = (await client.get("/first")).body
            await eventually(lambda: not server.connections[0].open)
            await asyncio.sleep(0.05)  # the client's loop reads the FIN
            return server, [first, (await client.get("/second")).body]

    server, bodies = run(scenario())

    assert bodies == [b"/first", b"/second"]
    assert [request.connection for request in server.requests] == [0, 1]


def test_idle_connections_older_than_idle_seconds_are_not_reused(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "IDLE_SECONDS", 0.1)

    async def scenario() -> ScriptedServer:
        async with ScriptedServer(echo) as server, open_client(server.url) as client:
            await client.get("/a")
            await client.get("/b")  # at once: reused
            await asyncio.sleep(0.15)
            await client.get("/c")  # too old: a new connection, the old one closed
            await eventually(lambda: not server.connections[0].open)
            return server

    server = run(scenario())

    assert [request.connection for request in server.requests] == [0, 0, 1]
    assert server.connections[0].closed_by_client


def test_the_most_recently_used_idle_connection_is_used_first(run: Run) -> None:
    async def slow_echo(request: Request, peer: Peer) -> None:
        await asyncio.sleep(0.05 if request.path == "/slow" else 0)
        await echo(request, peer)

    async def scenario() -> ScriptedServer:
        async with ScriptedServer(slow_echo) as server, open_client(server.url) as client:
            await asyncio.gather(client.get("/fast"), client.get("/slow"))  # /slow ends last
            await client.get("/next")
            return server

    server = run(scenario())

    slow, fast = (next(r for r in server.requests if r.path == p) for p in ("/slow", "/fast"))
    assert slow.connection != fast.connection
    assert server.requests[-1].connection == slow.connection


# --- reading answers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "status", "body"),
    [
        (answer(200, b'{"ok": true}'), 200, b'{"ok": true}'),
        (answer(202), 202, b""),
        (answer(204, length=False), 204, b""),
        (answer(304, length=False, headers=(("ETag", '"1"'),)), 304, b""),
        (answer(400, b"x" * 200_000), 400, b"x" * 200_000),
        (
            answer(
                200,
                chunked(b"hello, ", b"chunked ", b"world"),
                length=False,
                headers=(("Transfer-Encoding", "chunked"),),
            ),
            200,
            b"hello, chunked world",
        ),
        (
            answer(
                200,
                b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
                length=False,
                headers=(("Transfer-Encoding", "chunked"),),
            ),
            200,
            b"hello",
        ),
        (
            answer(200, chunked(), length=False, headers=(("Transfer-Encoding", "chunked"),)),
            200,
            b"",
        ),
    ],
    ids=["length", "empty-202", "204", "304", "large", "chunked", "chunk-ext-trailer", "no-chunks"],
)
def test_framed_answers_are_read_whole_and_keep_the_connection(
    run: Run, wire: bytes, status: int, body: bytes
) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        if request.path == "/framed":
            # Byte by byte for the head, so every parser state meets a read boundary.
            head, _, rest = wire.partition(b"\r\n\r\n")
            await peer.send(*(bytes([b]) for b in head + b"\r\n\r\n"), rest)
        else:
            await echo(request, peer)

    async def scenario() -> tuple[ScriptedServer, HttpResponse, bytes]:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            response = await client.get("/framed")
            return server, response, echoed(await client.get("/after"))

    server, response, after = run(scenario())

    assert (response.status, response.body) == (status, body)
    assert after == b"/after "
    assert [request.connection for request in server.requests] == [0, 0]


def test_a_body_delimited_by_the_server_closing_is_read_whole(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        if request.connection == 0:
            await peer.send(answer(200, length=False), b"until ", b"the ", b"end")
            peer.close()
        else:
            await echo(request, peer)

    async def scenario() -> tuple[ScriptedServer, HttpResponse, bytes]:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            response = await client.get("/")
            return server, response, echoed(await client.get("/after"))

    server, response, after = run(scenario())

    assert (response.status, response.body) == (200, b"until the end")
    assert after == b"/after "
    assert [request.connection for request in server.requests] == [0, 1]


def test_a_body_delimited_by_close_that_ends_in_a_reset_is_an_error(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        await peer.send(answer(200, length=False), b"half of it")
        await asyncio.sleep(0.05)
        peer.reset()

    async def scenario() -> None:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            with pytest.raises(HttpError, match="closed before the response was complete"):
                await client.get("/")

    run(scenario())


def test_interim_answers_are_skipped_for_the_final_one(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        if request.path == "/interim":
            await peer.send(
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
                answer(202, b"final", headers=(("X-Message-Id", "m1"),)),
            )
        else:
            await echo(request, peer)

    async def scenario() -> tuple[ScriptedServer, HttpResponse, bytes]:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            response = await client.post("/interim", b"{}", "application/json")
            return server, response, echoed(await client.get("/after"))

    server, response, after = run(scenario())

    assert (response.status, response.body) == (202, b"final")
    assert dict(response.headers) == {"x-message-id": "m1", "content-length": "5"}
    assert after == b"/after "
    assert [request.connection for request in server.requests] == [0, 0]


def test_header_names_are_lower_cased_and_repeated_fields_combined(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        headers = (
            ("Cache-Control", "public"),
            ("X-Message-ID", "abc"),
            ("cache-control", "max-age=60"),
            ("Content-Type", "application/json; charset=UTF-8"),
        )
        await peer.send(answer(200, b"{}", headers=headers))

    async def scenario() -> HttpResponse:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            return await client.get("/")

    assert dict(run(scenario()).headers) == {
        "cache-control": "public, max-age=60",
        "x-message-id": "abc",
        "content-type": "application/json; charset=UTF-8",
        "content-length": "2",
    }


# --- concurrency ----------------------------------------------------------------------------


def test_max_connections_caps_the_connections_and_every_request_is_answered(run: Run) -> None:
    async def slow_echo(request: Request, peer: Peer) -> None:
        await asyncio.sleep(0.05)
        await echo(request, peer)

    async def scenario() -> tuple[ScriptedServer, list[bytes]]:
        async with (
            ScriptedServer(slow_echo) as server,
            open_client(server.url, max_connections=2) as client,
        ):
            answers = await asyncio.gather(
                *(client.post(f"/{n}", b"", "text/plain") for n in range(6))
            )
            return server, [echoed(response) for response in answers]

    server, bodies = run(scenario())

    assert bodies == [f"/{n} ".encode() for n in range(6)]
    assert server.most_open == 2
    assert len(server.connections) == 2
    assert len(server.requests) == 6


# --- no answer: every failure is an HttpError -----------------------------------------------


def test_a_server_that_never_answers_times_out_and_its_connection_is_dropped(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        if request.path == "/hang":
            await peer.hang()
        else:
            await echo(request, peer)

    async def scenario() -> tuple[ScriptedServer, HttpError, float, bytes]:
        async with ScriptedServer(reply) as server, open_client(server.url, timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(HttpError) as caught:
                await client.post("/hang", b"{}", "application/json")
            elapsed = time.monotonic() - started
            after = echoed(await client.get("/after"))
            await eventually(lambda: not server.connections[0].open)
            return server, caught.value, elapsed, after

    server, error, elapsed, after = run(scenario())

    assert error.timed_out
    assert str(error) == "no answer in time"
    assert 0.29 <= elapsed < 0.6
    assert after == b"/after "
    assert [request.connection for request in server.requests] == [0, 1]
    assert server.connections[0].closed_by_client


def test_the_deadline_includes_the_wait_for_a_connection_slot(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        await asyncio.sleep(float(request.path.strip("/")))
        await echo(request, peer)

    async def scenario() -> tuple[bytes, HttpError, float]:
        async with (
            ScriptedServer(reply) as server,
            open_client(server.url, timeout=0.6, max_connections=1) as client,
        ):
            first = asyncio.create_task(client.get("/0.5"))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(HttpError) as caught:
                # Alone it would be answered in 0.4 s; after 0.3 s waiting for the one
                # connection, its 0.6 s are up first.
                await client.get("/0.4")
            return echoed(await first), caught.value, time.monotonic() - started

    first, error, elapsed = run(scenario())

    assert first == b"/0.5 "
    assert error.timed_out
    assert 0.59 <= elapsed < 0.8


def test_a_refused_connection_is_an_http_error_at_once(run: Run) -> None:
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]

        async def scenario() -> HttpError:
            async with open_client(f"http://127.0.0.1:{port}", timeout=2) as client:
                with pytest.raises(HttpError) as caught:
                    await client.get("/")
                return caught.value

        started = time.monotonic()
        error = run(scenario())

    assert time.monotonic() - started < 1
    assert not error.timed_out
    assert str(error) == "cannot connect: ConnectionRefusedError"
    assert isinstance(error.__cause__, ConnectionRefusedError)


async def _closed_without_answer(peer: Peer) -> None:
    peer.close()


async def _reset_without_answer(peer: Peer) -> None:
    peer.reset()


async def _closed_mid_head(peer: Peer) -> None:
    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")
    peer.close()


async def _closed_mid_body(peer: Peer) -> None:
    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only ten b")
    peer.close()


async def _reset_mid_body(peer: Peer) -> None:
    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only ten b")
    await asyncio.sleep(0.05)
    peer.reset()


async def _closed_mid_chunks(peer: Peer) -> None:
    await peer.send(
        answer(200, b"5\r\nhello\r\n", length=False, headers=(("Transfer-Encoding", "chunked"),))
    )
    peer.close()


BROKEN_ANSWERS: dict[str, tuple[Callable[[Peer], Awaitable[None]], str]] = {
    "closed without answer": (_closed_without_answer, "closed before the response"),
    "reset without answer": (_reset_without_answer, "closed before the response"),
    "closed mid head": (_closed_mid_head, "closed before the response"),
    "closed mid body": (_closed_mid_body, "closed before the response"),
    "reset mid body": (_reset_mid_body, "closed before the response"),
    "closed mid chunks": (_closed_mid_chunks, "closed before the response"),
}

MALFORMED_ANSWERS: dict[str, bytes] = {
    "not http": b"SSH-2.0-OpenSSH_9.6\r\n",
    "bad status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "bad version": b"HTTP/9 200 OK\r\nContent-Length: 0\r\n\r\n",
    "bad length": b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n",
    "space in name": b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
    "bare cr": b"HTTP/1.1 200 OK\rX: y\r\nContent-Length: 0\r\n\r\n",
}


def _sends(wire: bytes) -> Callable[[Peer], Awaitable[None]]:
    async def send(peer: Peer) -> None:
        await peer.send(wire)

    return send


@pytest.mark.parametrize(
    ("misbehave", "message"),
    [
        *BROKEN_ANSWERS.values(),
        *((_sends(wire), "malformed HTTP response") for wire in MALFORMED_ANSWERS.values()),
        (
            _sends(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n"
            ),
            "unexpected protocol upgrade",
        ),
    ],
    ids=[*BROKEN_ANSWERS, *MALFORMED_ANSWERS, "upgrade"],
)
def test_a_broken_answer_is_an_http_error_and_the_next_request_reconnects(
    run: Run, misbehave: Callable[[Peer], Awaitable[None]], message: str
) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        if request.connection == 0:
            await misbehave(peer)
        else:
            await echo(request, peer)

    async def scenario() -> tuple[ScriptedServer, HttpError, float, bytes]:
        async with ScriptedServer(reply) as server, open_client(server.url, timeout=3) as client:
            started = time.monotonic()
            with pytest.raises(HttpError) as caught:
                await client.post("/", b"{}", "application/json")
            elapsed = time.monotonic() - started
            return server, caught.value, elapsed, echoed(await client.get("/after"))

    server, error, elapsed, after = run(scenario())

    assert message in str(error)
    assert not error.timed_out
    assert elapsed < 1  # known at once, not at the deadline
    assert after == b"/after "
    assert [request.connection for request in server.requests] == [0, 1]


def test_bytes_sent_on_an_idle_connection_retire_it(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        await echo(request, peer)
        if request.connection == 0:
            # Unasked, and the connection left open: the client must not take this 408
            # for the answer to its next request.
            await asyncio.sleep(0.02)  # after the client has put the connection aside
            await peer.send(answer(408, b"idle too long", headers=(("Connection", "close"),)))

    async def scenario() -> tuple[ScriptedServer, list[bytes]]:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            first = echoed(await client.get("/first"))
            await asyncio.sleep(0.05)
            return server, [first, echoed(await client.get("/second"))]

    server, bodies = run(scenario())

    assert bodies == [b"/first ", b"/second "]
    assert [request.connection for request in server.requests] == [0, 1]


def test_a_second_answer_to_one_request_retires_the_connection(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        if request.connection == 0:
            await peer.send(answer(200, b"one") + answer(200, b"two"))  # in one segment
        else:
            await echo(request, peer)

    async def scenario() -> tuple[ScriptedServer, list[bytes]]:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            first = echoed(await client.get("/first"))
            return server, [first, echoed(await client.get("/second"))]

    server, bodies = run(scenario())

    assert bodies == [b"one", b"/second "]
    assert [request.connection for request in server.requests] == [0, 1]


def test_cancellation_propagates_and_drops_the_connection(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        await peer.hang()

    async def scenario() -> ScriptedServer:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            request = asyncio.create_task(client.get("/"))
            await eventually(lambda: len(server.requests) == 1)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            await eventually(lambda: not server.connections[0].open)
            return server

    assert run(scenario()).connections[0].closed_by_client


# --- TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    pem: str
    chain_file: Path
    key_file: Path


@pytest.fixture(scope="module")
def localhost_certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for DNS name localhost only (no IP address)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    (chain_file := folder / "cert.pem").write_text(pem)
    (key_file := folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(pem, chain_file, key_file)


def server_context(certificate: Certificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate.chain_file, certificate.key_file)
    return context


def test_tls_with_a_trusted_certificate_keeps_its_connection(
    run: Run, localhost_certificate: Certificate
) -> None:
    trusting = ssl.create_default_context(cadata=localhost_certificate.pem)

    async def scenario() -> tuple[ScriptedServer, list[bytes]]:
        tls = server_context(localhost_certificate)
        async with ScriptedServer(echo, ssl_context=tls) as server:
            url = f"https://localhost:{server.port}"
            async with open_client(url, ssl_context=trusting) as client:
                bodies = [echoed(await client.post(f"/{n}", b"{}", "a/b")) for n in range(3)]
                return server, bodies

    server, bodies = run(scenario())

    assert bodies == [b"/0 {}", b"/1 {}", b"/2 {}"]
    assert len(server.connections) == 1
    assert server.requests[0].values("Host") == [f"localhost:{server.port}"]


def test_tls_body_delimited_by_close_is_read_whole(
    run: Run, localhost_certificate: Certificate
) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        await peer.send(answer(200, length=False), b"all ", b"of it")
        peer.close()  # with TLS close_notify

    trusting = ssl.create_default_context(cadata=localhost_certificate.pem)

    async def scenario() -> HttpResponse:
        tls = server_context(localhost_certificate)
        async with (
            ScriptedServer(reply, ssl_context=tls) as server,
            open_client(f"https://localhost:{server.port}", ssl_context=trusting) as client,
        ):
            return await client.get("/")

    assert run(scenario()).body == b"all of it"


@pytest.mark.parametrize(
    ("host", "trusted", "reason"),
    [
        ("localhost", False, "self-signed certificate"),
        ("127.0.0.1", True, "IP address mismatch"),
    ],
    ids=["untrusted", "wrong-name"],
)
def test_tls_that_fails_verification_is_an_http_error(
    run: Run, localhost_certificate: Certificate, host: str, trusted: bool, reason: str
) -> None:
    client_context = (
        ssl.create_default_context(cadata=localhost_certificate.pem) if trusted else None
    )

    async def scenario() -> tuple[ScriptedServer, HttpError]:
        tls = server_context(localhost_certificate)
        async with ScriptedServer(echo, ssl_context=tls) as server:
            url = f"https://{host}:{server.port}"
            async with open_client(url, ssl_context=client_context, timeout=3) as client:
                with pytest.raises(HttpError) as caught:
                    await client.get("/")
                return server, caught.value

    server, error = run(scenario())

    assert str(error) == "cannot connect: SSLCertVerificationError"
    assert not error.timed_out
    assert isinstance(error.__cause__, ssl.SSLCertVerificationError)
    assert reason in str(error.__cause__)
    assert server.requests == []


def test_a_tls_handshake_that_never_completes_times_out(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        raise AssertionError("a ClientHello is not an HTTP request")

    async def scenario() -> tuple[ScriptedServer, HttpError]:
        async with ScriptedServer(reply) as server:  # plain TCP: the ClientHello goes unanswered
            url = f"https://localhost:{server.port}"
            async with open_client(url, timeout=0.3) as client:
                with pytest.raises(HttpError) as caught:
                    await client.get("/")
                await eventually(lambda: server.open_now == 0)
                return server, caught.value

    server, error = run(scenario())

    assert error.timed_out
    assert [connection.closed_by_client for connection in server.connections] == [True]


# --- closing --------------------------------------------------------------------------------


def test_aclose_closes_every_connection(run: Run) -> None:
    async def reply(request: Request, peer: Peer) -> None:
        if request.path == "/hang":
            await peer.hang()
        else:
            await asyncio.sleep(0.05)
            await echo(request, peer)

    async def scenario() -> tuple[ScriptedServer, list[HttpResponse | BaseException]]:
        async with ScriptedServer(reply) as server:
            client = HttpClient(server.url, timeout=5)
            in_flight = asyncio.ensure_future(
                asyncio.gather(client.get("/hang"), return_exceptions=True)
            )
            await eventually(lambda: len(server.requests) == 1)
            await asyncio.gather(*(client.get(f"/{n}") for n in range(3)))  # three now idle
            await client.aclose()
            outcomes = list(await in_flight)
            await eventually(lambda: server.open_now == 0)
            return server, outcomes

    server, outcomes = run(scenario())

    assert len(server.connections) == 4
    assert all(connection.closed_by_client for connection in server.connections)
    [outcome] = outcomes
    assert isinstance(outcome, HttpError)
    assert not outcome.timed_out


# --- any well-formed answer is read back exactly ---------------------------------------------

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
FRAMING_FIELDS = {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"}
field_names = st.text(TOKEN_CHARS, min_size=1, max_size=16).filter(
    lambda name: name.lower() not in FRAMING_FIELDS
)
# RFC 9110 §5.5 field values: visible ASCII, obs-text (here Latin-1) and inner spaces.
field_values = st.text(
    st.characters(codec="latin-1", exclude_characters="\r\n\x7f", min_codepoint=0x20),
    max_size=40,
).map(lambda value: value.strip(" \t"))


@st.composite
def answers(draw: st.DrawFn) -> tuple[int, list[tuple[str, str]], bytes, str, list[int], list[int]]:
    status = draw(st.integers(200, 599).filter(lambda status: status not in (204, 304)))
    fields = draw(
        st.lists(st.tuples(field_names, field_values), max_size=8, unique_by=lambda f: f[0].lower())
    )
    body = draw(st.binary(max_size=3000))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    chunk_cuts = draw(st.lists(st.integers(1, 700), max_size=10))
    cuts = draw(st.lists(st.integers(1, 4000), max_size=12))
    return status, fields, body, framing, chunk_cuts, cuts


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


@settings(max_examples=60, deadline=None)
@given(answers())
def test_any_well_formed_answer_is_read_back_exactly(
    run: Run, drawn: tuple[int, list[tuple[str, str]], bytes, str, list[int], list[int]]
) -> None:
    status, fields, body, framing, chunk_cuts, cuts = drawn
    if framing == "length":
        wire = answer(status, body, headers=tuple(fields))
        framing_field = {"content-length": str(len(body))}
    elif framing == "chunked":
        te = (("Transfer-Encoding", "chunked"),)
        wire = answer(
            status, chunked(*split(body, chunk_cuts)), headers=(*fields, *te), length=False
        )
        framing_field = {"transfer-encoding": "chunked"}
    else:
        wire = answer(status, body, headers=tuple(fields), length=False)
        framing_field = {}

    async def reply(request: Request, peer: Peer) -> None:
        await peer.send(*split(wire, cuts))
        if framing == "close":
            peer.close()

    async def scenario() -> HttpResponse:
        async with ScriptedServer(reply) as server, open_client(server.url) as client:
            return await client.get("/")

    response = run(scenario())

    assert response.status == status
    assert dict(response.headers) == {name.lower(): value for name, value in fields} | framing_field
    assert response.body == body
