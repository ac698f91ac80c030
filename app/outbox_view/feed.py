"""New and removed outbox messages, told to every open /outbox page as Server-Sent Events.

The outbox notifier calls `written(paths)` once a notification's files exist (no polling of the
folder); the delete routes call `deleted(ids)`. Each open stream is a Subscription with a
bounded queue: a client too slow to take its events is dropped (its stream ends; the browser's
EventSource reconnects and the page is whole again after a reload) rather than buffered without
end. `close()` ends every stream at once: at SIGTERM, so that uvicorn's graceful shutdown is
not held up by pages left open, and again when the app stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

QUEUE_LIMIT = 256  # events waiting for one client; past it the client is dropped
HEARTBEAT_SECONDS = 15.0  # a comment line keeps proxies and the browser from timing out
RETRY_MILLISECONDS = 2000  # how soon EventSource reconnects after a stream ends


class Subscription:
    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(limit)
        self.closed = False

    def offer(self, chunk: str) -> bool:
        """Queue `chunk`; False (and the subscription closed) when the client is too far behind."""
        if self.closed:
            return False
        try:
            self._queue.put_nowait(chunk)
        except asyncio.QueueFull:
            self.close()
            return False
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        while not self._queue.empty():  # a closed stream sends nothing more
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def stream(self, heartbeat: float = HEARTBEAT_SECONDS) -> AsyncIterator[str]:
        """The text/event-stream body: events as they come, a comment when none came for
        `heartbeat` seconds; it ends when the subscription is closed."""
        yield f"retry: {RETRY_MILLISECONDS}\n: connected\n\n"
        while True:
            try:
                chunk = await asyncio.wait_for(self._queue.get(), heartbeat)
            except TimeoutError:
                yield ": heartbeat\n\n"
                continue
            if chunk is None:
                return
            yield chunk


class OutboxFeed:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._subscriptions: set[Subscription] = set()
        self.closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def subscribe(self) -> Subscription:
        subscription = Subscription()
        if self.closed:
            subscription.close()
        else:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        subscription.close()

    def publish(self, event: str, document: object) -> None:
        """One event to every open stream. In the event loop's thread."""
        if not self._subscriptions:
            return
        data = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
        chunk = f"event: {event}\ndata: {data}\n\n"
        for subscription in list(self._subscriptions):
            if not subscription.offer(chunk):
                self._subscriptions.discard(subscription)
                log.warning(
                    "outbox page too slow for its live updates; its stream was ended",
                    extra={"queued": QUEUE_LIMIT},
                )

    def written(self, paths: Iterable[Path]) -> None:
        """The outbox notifier's on_written hook: each new file's summary as a `message` event.
        The files are read only when a page is open (a few KiB each, headers only)."""
        if not self._subscriptions:
            return
        from app.outbox_view.mailbox import SUFFIX, Mailbox

        mailbox = Mailbox(self.directory)
        for path in paths:  # in the order written: each new one goes on top
            summary = mailbox.summary(path.name.removesuffix(SUFFIX), str(path))
            if summary is not None:
                self.publish("message", summary.as_json())

    def deleted(self, ids: list[str]) -> None:
        if ids:
            self.publish("deleted", {"ids": ids})

    def close(self) -> None:
        """Ends every stream and refuses new ones (they end at once). Idempotent."""
        self.closed = True
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
