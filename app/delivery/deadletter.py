"""Events that can never be delivered as they are, kept where `python -m app.replay` finds them.

Each is written as a structured-mode CloudEvent (`application/cloudevents+json`) with two
extension attributes saying why and when, so a replay posts the very same event again.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.events.models import StorageEvent
from app.files import write_json

log = logging.getLogger(__name__)

# `python -m app.replay --force` sends this header with "force": the pipeline then sends a change
# older than the retention instead of keeping it here.
REPLAY_HEADER = "x-gcs-notifier-replay"
DEAD_LETTERED_AT = "deadletteredat"  # the extension that says when, on every file here


def structured_event(event: StorageEvent, reason: str, at: datetime) -> dict[str, Any]:
    document: dict[str, Any] = {
        "specversion": event.specversion,
        "id": event.id,
        "source": event.source,
        "type": event.type.value,
        "datacontenttype": event.datacontenttype or "application/json",
    }
    if event.subject is not None:
        document["subject"] = event.subject
    if event.time is not None:
        document["time"] = event.time.isoformat().replace("+00:00", "Z")
    document.update(event.extensions)
    # CloudEvents extension names are lower-case letters and digits only.
    document["deadletterreason"] = reason
    document[DEAD_LETTERED_AT] = at.isoformat().replace("+00:00", "Z")
    document["data"] = event.data.model_dump(mode="json", by_alias=True, exclude_none=True)
    return document


class DeadLetterBox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def put(self, event: StorageEvent, reason: str) -> Path:
        """Write atomically; raises OSError, which the caller must treat as transient."""
        now = datetime.now(UTC)
        document = structured_event(event, reason, now)
        digest = hashlib.sha256(event.change_key().encode()).hexdigest()[:16]
        final = self.directory / f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{digest}.json"
        write_json(final, document)
        # Also in the log, whole: on Cloud Run the folder lives in the instance's memory.
        log.error(
            "event dead-lettered",
            extra={**event.log_fields(), "path": str(final), "dead_letter": document},
        )
        return final
