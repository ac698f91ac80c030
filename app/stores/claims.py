"""Where deliveries are claimed and remembered, so a redelivered event sends no second email.

Every backend knows, per notification key, one of two states:
- claimed until its lease runs out (a send is in flight; if the process dies the claim goes with
  it, or its lease expires, and a redelivery may claim it again), fenced by a token (base.py);
- done until the retention runs out (DEDUPE_RETENTION, 8 days by default: longer than Eventarc's
  24 hours of redelivery and than the 7 days a dead-lettered event may wait for its replay).
Each operation is atomic in its backend, so concurrent deliveries of one change claim it once:
within one process for `memory` and `sqlite` (which keep claims in memory), across every
instance for `redis` and `firestore`.
"""

from __future__ import annotations

from typing import Protocol

from app.stores.base import Claim, Lease


class IdempotencyStore(Protocol):
    async def claim(self, key: str, lease_seconds: float) -> Lease | Claim:
        """A Lease when this caller now holds the key; Claim.IN_FLIGHT while another holder's
        lease runs; Claim.DONE once the key was sent (until the retention ends)."""
        ...

    async def renew(self, key: str, token: int, lease_seconds: float) -> Lease | None:
        """The lease extended to `lease_seconds` from now, only while `token` holds the key and
        its lease has not run out; None otherwise (taken over, done, released or expired): the
        holder must not send."""
        ...

    async def complete(self, key: str, token: int) -> bool:
        """Mark the key done (its email was accepted) for the retention, whoever holds it now.
        True when `token` was still its holder (also for a retry of that holder's own done
        mark); False when the claim had been taken over or another holder had marked it done:
        a second email may have gone out, and the caller logs it."""
        ...

    async def release(self, key: str, token: int) -> None:
        """Give the claim up, only while `token` holds it, so a redelivery can send now."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached now (for /healthz)."""
        ...

    async def aclose(self) -> None: ...
