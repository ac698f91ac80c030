"""Checks run when the service starts, so that configuration that cannot work stops start-up
with a message naming the variable, instead of failing every event later.

The event path itself still loads on first use (app/runtime.py keeps start-up fast); these checks
touch only the file system and the standard library's sqlite3.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from app.config import Settings


class StartupError(Exception):
    """Configuration that cannot work; `str(error)` names the variable and says why."""


def check_writable_folder(variable: str, folder: Path) -> None:
    """Create the folder if need be and prove it takes a file (as root, permission bits prove
    nothing, so a file is written and removed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".probe-", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise StartupError(f"{variable}={folder} is not a writable folder: {reason}") from None


def check_store(url: str) -> None:
    if url.startswith("sqlite:///"):
        from app.delivery.sqlite_store import check_database
        from app.delivery.store import StoreUnavailable

        try:
            check_database(url.removeprefix("sqlite:///"))
        except StoreUnavailable as error:
            raise StartupError(f"IDEMPOTENCY_STORE cannot be used: {error}") from None
    # memory needs nothing; a redis URL was parsed with the settings, and the server may come up
    # after this service does: /healthz and 503 answers report it until then.


def check(settings: Settings, *, own_notifier: bool = True, own_store: bool = True) -> None:
    """Raise StartupError for the first setting that cannot work. `own_*` is False where the
    caller hands in its own notifier or store (tests), which then needs no checking."""
    check_writable_folder("DEAD_LETTER_DIR", settings.dead_letter_dir)
    if own_notifier and settings.notifier == "outbox":
        check_writable_folder("OUTBOX_DIR", settings.outbox_dir)
    if own_store:
        check_store(settings.idempotency_store)
