"""What every store shares: the answer to a claim, the fenced lease a claim gives, how long
things are remembered, and the one error a store raises.

A claim (of one email's key, or of a digest window) is a lease with a fencing token. Every claim
of a key gets a larger token than every claim of it before, so a holder whose lease ran out while
it was slow, frozen or cut off can be told from whoever claimed the key after it:
- `renew(token)` succeeds only while `token` is the key's holder and its lease has not run out.
  A holder renews immediately before it sends, so a holder that lost its lease never starts a send.
- `release(token)` gives the key up only while `token` holds it: a stale holder cannot free the
  claim of the one that took over.
- `complete(token)` marks the key done and says whether `token` was still its holder. Done wins
  whoever holds the key: an email went out, which is a fact, and the holder that took over then
  fails its own renew and does not send a second one. False means the claim had been taken
  over, so a second email may already be under way; the caller logs it.

Tokens are `max(previous token + 1, the claim's time in microseconds)`: they grow with every
claim of a key, and stay larger than any token handed out before a key's record was deleted
(Firestore's TTL, a Redis restart) as long as clocks move forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Claim(StrEnum):
    CLAIMED = "claimed"  # this caller owns the send (the answer comes as a Lease)
    IN_FLIGHT = "in-flight"  # another caller holds it now
    DONE = "done"  # already sent


@dataclass(frozen=True, slots=True)
class Lease:
    """A claim this caller holds: `token` fences it; `expires` is when the lease ends by this
    process's clock (seconds since the epoch, read before the claim was written, so the store's
    own record of the lease never ends before it)."""

    token: int
    expires: float


class StoreUnavailable(Exception):
    """The store could not be read or written; the delivery must be retried later."""


def next_token(previous: int | None, now: float) -> int:
    """The token of a new claim: larger than `previous` (the key's last token, if any) and than
    any token handed out before `now` (seconds since the epoch)."""
    stamp = int(now * 1_000_000)
    return stamp if previous is None else max(previous + 1, stamp)
