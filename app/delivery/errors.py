"""What the pipeline raises besides a notifier's errors (api/errors.py answers each)."""

from __future__ import annotations


class InFlight(Exception):
    """Another delivery of the same change is sending right now: answer 409, Eventarc retries."""
