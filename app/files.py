"""Files written whole or not at all: the outbox's messages and the dead-letter documents."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomically(final: Path, payload: bytes) -> None:
    """Write to a temporary file beside `final`, then rename: a reader never sees half a file
    (rename is atomic on POSIX). Raises OSError; leaves no temporary file behind."""
    handle, temporary = tempfile.mkstemp(dir=final.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
        os.replace(temporary, final)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(final: Path, document: object) -> None:
    """`document` as indented UTF-8 JSON, written atomically; the folder is created if need be."""
    final.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(final, json.dumps(document, ensure_ascii=False, indent=2).encode())
