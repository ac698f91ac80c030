"""What every store shares: the answer to a claim, and the one error a store raises."""

from __future__ import annotations

from enum import StrEnum


class Claim(StrEnum):
    CLAIMED = "claimed"  # this caller owns the send
    IN_FLIGHT = "in-flight"  # another caller is sending it now
    DONE = "done"  # already sent


class StoreUnavailable(Exception):
    """The store could not be read or written; the delivery must be retried later."""
