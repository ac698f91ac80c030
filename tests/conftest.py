from __future__ import annotations

from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from tests.servers import ThreadedServer


def outbox_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "notifier": "outbox",
        "outbox_dir": tmp_path / "outbox",
        "dead_letter_dir": tmp_path / "dead-letter",
        "idempotency_store": "memory",
        "notify_to": ["ops@example.com", "dev@example.com"],
        "notify_from": "notifier@example.com",
        **overrides,
    }
    return Settings.model_validate(values)


def read_outbox(directory: Path) -> list[EmailMessage]:
    messages = []
    for path in sorted(directory.glob("*.eml")):
        message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        assert isinstance(message, EmailMessage)
        messages.append(message)
    return messages


@pytest.fixture
def outbox_server(tmp_path: Path) -> Iterator[ThreadedServer]:
    """A real uvicorn server with the outbox notifier and an in-memory store."""
    with ThreadedServer(outbox_settings(tmp_path)) as server:
        yield server
