"""Done marks after a send the provider accepted: the email has gone out, so its claim is never
released. A done mark that cannot be written is tried again within the request for a few seconds
(CONFIRM_SECONDS), then in the background until the claim's lease runs out, while the claim keeps
every redelivery away (409 until then). Only a store that stays unwritable for the whole lease
leaves a redelivery after it free to send a second email, and that is logged at ERROR.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from app.stores.base import StoreUnavailable

log = logging.getLogger(__name__)

CONFIRM_SECONDS = 3.0  # retries within the request, all attempts included
_PAUSES = (0.0, 0.1, 0.3, 0.6, 1.0)  # before each attempt within the request
_LATER_PAUSE = (1.0, 5.0)  # the background's first pause, and its longest

Mark = Callable[[], Awaitable[bool]]  # writes the done mark: True while the claim was ours


class Confirmations:
    """Writes done marks for a pipeline or a flush, and keeps the ones still being retried in
    the background, so shutdown can wait for them."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._later: set[asyncio.Task[None]] = set()

    async def confirm(self, mark: Mark, expires: float, fields: Mapping[str, Any]) -> bool:
        """Write one done mark; True once written (a claim that had been taken over is logged
        at ERROR: a second email may have gone out), False when it is being retried in the
        background (logged at ERROR once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONFIRM_SECONDS
        reason = "no attempt"
        for pause in _PAUSES:
            if pause:
                if loop.time() + pause >= deadline:
                    break
                await asyncio.sleep(pause)
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                    held = await mark()
            except (StoreUnavailable, TimeoutError) as error:
                reason = str(error) or "no answer in time"
                continue
            _taken_over(held, fields)
            return True
        log.error(
            "email sent but not marked done; its claim stands until its lease ends, and the"
            " done mark is tried again until then",
            extra={**fields, "reason": reason, "lease_ends": round(expires, 3)},
        )
        task = loop.create_task(self._until_lease_ends(mark, expires, fields))
        self._later.add(task)
        task.add_done_callback(self._later.discard)
        return False

    async def _until_lease_ends(
        self, mark: Mark, expires: float, fields: Mapping[str, Any]
    ) -> None:
        pause, longest = _LATER_PAUSE
        while self.clock() + pause < expires:
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)
            try:
                held = await mark()
            except StoreUnavailable:
                continue
            _taken_over(held, fields)
            log.info("email marked done after all", extra=dict(fields))
            return
        log.error(
            "email sent but not marked done before its lease ended: a redelivery from now on"
            " may send it again",
            extra=dict(fields),
        )

    @property
    def pending(self) -> int:
        return len(self._later)

    async def aclose(self, seconds: float) -> None:
        """Wait up to `seconds` for the background retries, then give them up (their claims
        end with their leases)."""
        if not self._later:
            return
        _, waiting = await asyncio.wait(set(self._later), timeout=max(seconds, 0))
        for task in waiting:
            task.cancel()
        if waiting:
            await asyncio.wait(waiting)
            log.warning(
                "shutting down with done marks not written; their claims end with their leases",
                extra={"unconfirmed": len(waiting)},
            )


def _taken_over(held: bool, fields: Mapping[str, Any]) -> None:
    if not held:
        log.error(
            "email sent after its claim had been taken over: another delivery may have sent it too",
            extra=dict(fields),
        )
