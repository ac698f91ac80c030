"""Opens a store from its URL (IDEMPOTENCY_STORE); each backend is imported only when used."""

from __future__ import annotations

from app.stores.claims import IdempotencyStore
from app.stores.windows import DigestStore


def open_store(url: str) -> IdempotencyStore:
    """`memory`, `sqlite:///PATH`, `redis://HOST:PORT/DB` or `firestore://[PROJECT]/DATABASE`
    (backends imported only when used)."""
    if url == "memory":
        from app.stores.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from app.stores.sqlite_claims import SqliteStore

        return SqliteStore.open(url.removeprefix("sqlite:///"))
    if url.startswith(("redis://", "rediss://")):
        from app.stores.redis_claims import RedisStore

        return RedisStore.from_url(url)
    if url.startswith("firestore://"):
        from app.stores.firestore_claims import FirestoreStore

        return FirestoreStore.from_url(url)
    raise ValueError(f"unknown idempotency store URL scheme: {url.split(':', 1)[0]!r}")


def open_digest_store(url: str) -> DigestStore:
    """`memory`, `sqlite:///PATH`, `redis://...`/`rediss://...` or `firestore://...`, as the
    idempotency store's URL (app.stores.claims.open_store): a SQLite digest store shares the
    idempotency store's file, in its own tables over its own connection. Backends are imported
    only when used; StoreUnavailable if the SQLite file cannot be opened, ValueError for another
    scheme."""
    if url == "memory":
        from app.stores.memory import MemoryDigestStore

        return MemoryDigestStore()
    if url.startswith("sqlite:///"):
        from app.stores.sqlite_windows import SqliteDigestStore

        return SqliteDigestStore.open(url.removeprefix("sqlite:///"))
    if url.startswith(("redis://", "rediss://")):
        from app.stores.redis_windows import RedisDigestStore

        return RedisDigestStore.from_url(url)
    if url.startswith("firestore://"):
        from app.stores.firestore_windows import FirestoreDigestStore

        return FirestoreDigestStore.from_url(url)
    raise ValueError(f"unknown digest store URL scheme: {url.split(':', 1)[0]!r}")
