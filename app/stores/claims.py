"""Where deliveries are claimed and remembered, so a redelivered event sends no second email.

Every backend knows, per notification key, one of two states:
- claimed by an owner until its lease runs out (a send is in flight; if the process dies the
  claim goes with it, or its lease expires, and a redelivery may claim it again);
- done until the retention runs out (longer than Eventarc's 24 hours of redelivery).
Each operation is atomic in its backend, so concurrent deliveries of one change claim it once:
within one process for `memory` and `sqlite` (which keep claims in memory), across every
instance for `redis`.
"""

from __future__ import annotations

from typing import Protocol

from app.stores.base import Claim


class IdempotencyStore(Protocol):
    async def claim(self, key: str, owner: str, lease_seconds: float) -> Claim: ...

    async def complete(self, key: str, owner: str, keep_seconds: float) -> None:
        """Mark the key done (the email was accepted), whoever holds the lease now."""
        ...

    async def release(self, key: str, owner: str) -> None:
        """Give up a claim this owner still holds, so a redelivery can send."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached now (for /healthz)."""
        ...

    async def aclose(self) -> None: ...
