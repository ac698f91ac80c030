"""Opens a store from its URL (IDEMPOTENCY_STORE); each backend is imported only when used.

`memory`, `sqlite:///PATH`, `redis://HOST:PORT/DB` (or `rediss://`) and
`firestore://[PROJECT]/DATABASE[?prefix=NAME]`. The claims store and the digest store of one URL
share their backend: a SQLite digest store uses the claims store's file (its own tables, its own
connection), Redis the same server, Firestore the same database and prefix, and the memory digest
store is handed the memory claims store, so a rate route's overflow marks its email keys done in
the same step as it joins the digest.
"""

from __future__ import annotations

from app.stores.base import StoreUnavailable
from app.stores.claims import IdempotencyStore
from app.stores.windows import RETENTION_SECONDS, DigestStore


def open_store(url: str, *, retention_seconds: float = RETENTION_SECONDS) -> IdempotencyStore:
    """The claims store for `url`: ValueError for an unknown scheme or a bad Firestore URL,
    StoreUnavailable if the SQLite file cannot be opened."""
    if url == "memory":
        from app.stores.memory import MemoryStore

        return MemoryStore(retention_seconds)
    if url.startswith("sqlite:///"):
        from app.stores.sqlite_claims import SqliteStore

        return SqliteStore.open(url.removeprefix("sqlite:///"), retention_seconds)
    if url.startswith(("redis://", "rediss://")):
        from app.stores.redis_claims import RedisStore

        return RedisStore.from_url(url, retention_seconds)
    if url.startswith("firestore://"):
        from app.stores.firestore_claims import FirestoreStore

        return FirestoreStore.from_url(url, retention_seconds)
    raise ValueError(f"unknown idempotency store URL scheme: {url.split(':', 1)[0]!r}")


def open_digest_store(
    url: str,
    *,
    retention_seconds: float = RETENTION_SECONDS,
    claims: IdempotencyStore | None = None,
) -> DigestStore:
    """The digest store for `url`, beside the claims store `open_store(url)` opens (`claims`:
    that store, which the memory backend needs to mark keys done in; the others reach theirs
    through the URL). StoreUnavailable if the SQLite file cannot be opened, ValueError for
    another scheme."""
    if url == "memory":
        from app.stores.memory import MemoryDigestStore, MemoryStore

        if claims is not None and not isinstance(claims, MemoryStore):
            raise StoreUnavailable("memory: the digest store needs the memory claims store")
        return MemoryDigestStore(retention_seconds, claims or MemoryStore(retention_seconds))
    if url.startswith("sqlite:///"):
        from app.stores.sqlite_windows import SqliteDigestStore

        return SqliteDigestStore.open(url.removeprefix("sqlite:///"), retention_seconds)
    if url.startswith(("redis://", "rediss://")):
        from app.stores.redis_windows import RedisDigestStore

        return RedisDigestStore.from_url(url, retention_seconds)
    if url.startswith("firestore://"):
        from app.stores.firestore_windows import FirestoreDigestStore

        return FirestoreDigestStore.from_url(url, retention_seconds)
    raise ValueError(f"unknown digest store URL scheme: {url.split(':', 1)[0]!r}")
