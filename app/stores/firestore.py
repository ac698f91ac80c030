"""Firestore, shared by the idempotency store and the digest store: the store URL, the names of
the collections, one client per store, and how long a call may take before the store counts as
unavailable.

`firestore://PROJECT/DATABASE?prefix=gcs-notifier`, or `firestore:///DATABASE` to take the
project from the environment (google.auth.default(): the metadata server on Cloud Run). The
prefix starts the name of every collection, so Terraform's TTL policies name the same ones.

Parsing imports nothing from Google's libraries (Settings validates the URL at start-up, and
cold start is measured); the client library loads on a store's first call.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from app.stores.base import StoreUnavailable

if TYPE_CHECKING:
    from google.cloud.firestore import AsyncClient

SCHEME = "firestore://"
DEFAULT_PREFIX = "gcs-notifier"
# One RPC, retries included, gives up after CALL_SECONDS (the library's default retries wait
# over 40 s against a dead endpoint); one store operation, a few RPCs, after OPERATION_SECONDS.
# Both sit well inside Cloud Run's request timeout, so a delivery answers 503 and is redelivered.
CALL_SECONDS = 5.0
OPERATION_SECONDS = 10.0
# Reading a digest window takes aggregation and limit queries over its events (index seeks in
# Firestore; on the emulator, which scans them for each query, about 3 s for 60,000 events and
# 7-9 s for 200,000 on two cores): a flush, not a delivery, waits for it, within Cloud Scheduler's
# 30 s attempt.
WINDOW_READ_SECONDS = 25.0
# A digest window's events are spread over this many collections (app.stores.firestore_windows
# says why); eventarc.tf gives each its TTL policy and index exemptions, for the same numbers.
DIGEST_EVENT_SHARDS = 8

# https://cloud.google.com/resource-manager/docs/creating-managing-projects: 6-30 characters,
# lowercase letters, digits and hyphens, starting with a letter; older projects may carry a
# domain ("example.com:project").
_PROJECT = re.compile(r"(?:[a-z0-9][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
# Firestore Admin API, CreateDatabaseRequest.database_id: 4-63 characters of [a-z0-9-], a
# letter first, a letter or digit last; or "(default)".
_DATABASE = re.compile(r"\(default\)|[a-z][a-z0-9-]{2,61}[a-z0-9]")
# Collection ids allow more, but the prefix also names Terraform resources and TTL policies.
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_QUERY_KEYS = ("prefix",)


@dataclass(frozen=True)
class FirestoreLocation:
    """Where the stores keep their documents; `project` None means the environment's project."""

    project: str | None
    database: str
    prefix: str = DEFAULT_PREFIX

    @classmethod
    def parse(cls, url: str) -> FirestoreLocation:
        """`firestore://[PROJECT]/DATABASE[?prefix=NAME]`, or ValueError saying what is wrong."""
        form = "firestore://PROJECT/DATABASE?prefix=NAME or firestore:///DATABASE"
        if not url.startswith(SCHEME):
            scheme = url.split(":", 1)[0] if ":" in url else url
            raise ValueError(f"a Firestore URL starts with firestore://, not {scheme!r} ({form})")
        rest, _, query = url.removeprefix(SCHEME).partition("?")
        if "#" in rest or "#" in query:
            raise ValueError(f"a Firestore URL has no #fragment ({form})")
        project, slash, database = rest.partition("/")
        if not slash or not database:
            raise ValueError(f"the Firestore URL names no database ({form})")
        if "/" in database.rstrip("/"):
            raise ValueError(f"the Firestore URL's path is one database name, not {database!r}")
        database = database.rstrip("/")
        if project and not _PROJECT.fullmatch(project):
            raise ValueError(
                f"{project!r} is not a Google Cloud project id (6-30 characters: a-z, 0-9, -)"
            )
        if not _DATABASE.fullmatch(database):
            raise ValueError(
                f"{database!r} is not a Firestore database id (4-63 characters: a-z, 0-9, -,"
                " starting with a letter; or (default))"
            )
        return cls(project or None, database, _prefix(query))

    def __str__(self) -> str:
        return f"{SCHEME}{self.project or ''}/{self.database}?prefix={self.prefix}"


def _prefix(query: str) -> str:
    try:
        fields = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"the Firestore URL's query {query!r} is not NAME=VALUE pairs") from None
    unknown = sorted(set(fields) - set(_QUERY_KEYS))
    if unknown:
        raise ValueError(
            f"the Firestore URL has unknown parameters {', '.join(unknown)} (only prefix=NAME)"
        )
    values = fields.get("prefix", [DEFAULT_PREFIX])
    if len(values) > 1:
        raise ValueError("the Firestore URL gives prefix more than once")
    if not _PREFIX.fullmatch(values[0]):
        raise ValueError(
            f"the collection prefix {values[0]!r} must be 1-100 characters: letters, digits,"
            " - and _, starting with a letter or digit"
        )
    return values[0]


# Collection names, one function each: Terraform's TTL policies on `expire_at` name the same.
def claims_collection(prefix: str) -> str:
    return f"{prefix}-claims"


def digest_routes_collection(prefix: str) -> str:
    return f"{prefix}-digest-routes"


def digest_windows_collection(prefix: str) -> str:
    return f"{prefix}-digest-windows"


def digest_changes_collection(prefix: str) -> str:
    return f"{prefix}-digest-changes"


def digest_rates_collection(prefix: str) -> str:
    return f"{prefix}-digest-rates"


def digest_events_collection(prefix: str) -> str:
    """The subcollection of a window's events in the layout before shards (under the window)."""
    return f"{prefix}-digest-events"


def digest_event_shard_collection(prefix: str, shard: int) -> str:
    """The subcollection of one shard of a window's events (under the window), a collection
    group of its own per shard: the emulator runs a query by scanning its whole collection
    group, so shards sharing one would each scan every event."""
    return f"{prefix}-digest-events-{shard}"


def expiring_collections(prefix: str) -> tuple[str, ...]:
    """The collection groups whose documents carry `expire_at` (each needs a TTL policy)."""
    return (
        claims_collection(prefix),
        digest_changes_collection(prefix),
        digest_windows_collection(prefix),
        digest_events_collection(prefix),
        *(digest_event_shard_collection(prefix, n) for n in range(DIGEST_EVENT_SHARDS)),
        digest_rates_collection(prefix),
    )


def document_id(key: str) -> str:
    """Keys hold "/" and run to kilobytes; a document id may hold neither."""
    return hashlib.sha256(key.encode()).hexdigest()


def async_client(location: FirestoreLocation) -> AsyncClient:
    """A client for the location (blocking: it may ask the metadata server for credentials and
    the project; FirestoreClient makes it in a worker thread). With FIRESTORE_EMULATOR_HOST set
    when it is made, it talks to that emulator without credentials."""
    from google.cloud.firestore import AsyncClient

    with unavailable_on_error():
        return AsyncClient(project=location.project, database=location.database)


class FirestoreClient:
    """A store's one client, made on its first call (not when the service starts, and in a
    worker thread: finding credentials may wait on the metadata server)."""

    def __init__(self, location: FirestoreLocation) -> None:
        self.location = location
        self._client: AsyncClient | None = None
        self._making = asyncio.Lock()

    async def get(self) -> AsyncClient:
        if self._client is None:
            async with self._making:
                if self._client is None:
                    self._client = await asyncio.to_thread(async_client, self.location)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        # AsyncClient.close() closes only an HTTP session; the gRPC channel is the transport's.
        api = getattr(client, "_firestore_api_internal", None)
        if api is not None:
            await api.transport.close()


@cache
def call_options(seconds: float = CALL_SECONDS) -> dict[str, Any]:
    """`retry` and `timeout` for every RPC: transient errors are retried, all within `seconds`
    (CALL_SECONDS; `timeout` is the deadline of all attempts together)."""
    from google.api_core import exceptions
    from google.api_core.retry_async import AsyncRetry, if_exception_type

    transient = if_exception_type(
        exceptions.ServiceUnavailable,
        exceptions.DeadlineExceeded,
        exceptions.InternalServerError,
        exceptions.ResourceExhausted,
        exceptions.Aborted,
        exceptions.Unknown,
    )
    retry = AsyncRetry(
        predicate=transient, initial=0.1, maximum=1.0, multiplier=2.0, timeout=seconds
    )
    return {"retry": retry, "timeout": seconds}


@asynccontextmanager
async def operation(seconds: float | None = None) -> AsyncIterator[None]:
    """One store operation: bounded by `seconds` (OPERATION_SECONDS), Firestore's failures
    raised as StoreUnavailable (answered 503, so Eventarc delivers again)."""
    seconds = OPERATION_SECONDS if seconds is None else seconds
    try:
        async with asyncio.timeout(seconds):
            with unavailable_on_error():
                yield
    except TimeoutError as error:
        raise StoreUnavailable(f"firestore: no answer within {seconds:g} s") from error


@contextmanager
def unavailable_on_error() -> Iterator[None]:
    """Turn the client library's, google-auth's and gRPC's errors into StoreUnavailable with a
    short reason; anything else (a bug) passes through."""
    try:
        yield
    except Exception as error:
        reason = failure_reason(error)
        if reason is None:
            raise
        raise StoreUnavailable(reason) from error


def failure_reason(error: BaseException) -> str | None:
    """`firestore: KIND: first line of the message`, or None when the error is not Firestore's.
    google-auth's messages may quote a token endpoint's answer: only their kind is kept."""
    from google.api_core.exceptions import GoogleAPICallError, GoogleAPIError, RetryError
    from google.auth.exceptions import GoogleAuthError
    from grpc import RpcError  # type: ignore[import-untyped]

    kind = type(error).__name__
    if isinstance(error, GoogleAuthError):
        return f"firestore: credentials: {kind}"
    if isinstance(error, RetryError):
        cause = error.cause
        if cause is None:
            return f"firestore: gave up after {CALL_SECONDS:g} s of retries"
        last = failure_reason(cause) or f"firestore: {type(cause).__name__}"
        return f"{last} (gave up after {CALL_SECONDS:g} s of retries)"
    if isinstance(error, GoogleAPICallError):
        return f"firestore: {kind}: {_first_line(error.message)}"
    if isinstance(error, GoogleAPIError | RpcError):
        return f"firestore: {kind}"
    if isinstance(error, OSError):  # no project found, or a socket's error
        return f"firestore: {kind}: {_first_line(str(error))}"
    return None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 200 else line[:197] + "..."
