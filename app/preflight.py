"""Checks run when the service starts, so that configuration that cannot work stops start-up
with a message naming the variable, instead of failing every event later.

The event path itself still loads on first use (app/runtime.py keeps start-up fast); these checks
touch only the file system: they import neither sqlite3 nor tempfile, since every cold start
pays for them.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from app.config import Settings


class StartupError(Exception):
    """Configuration that cannot work; `str(error)` names the variable and says why."""


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file
_probes = itertools.count()


def check_writable_folder(variable: str, folder: Path) -> None:
    try:
        _probe(folder)
    except OSError as error:
        reason = _reason(error)
        raise StartupError(f"{variable}={folder} is not a writable folder: {reason}") from None


def _probe(folder: Path) -> None:
    """Create the folder if need be and prove it takes a file (as root, permission bits prove
    nothing, so a file is written and removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".probe-{os.getpid()}-{next(_probes)}.tmp"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    os.unlink(probe)


def check_store(url: str) -> None:
    """A SQLite database must be able to exist where the URL says: its folder takes files, and
    a file already there is a SQLite database (or empty, which SQLite makes one of). A redis URL
    was parsed with the settings; the server may come up after this service does, and /healthz
    and 503 answers report it until then. memory needs nothing."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    if path == Path(":memory:"):
        return
    try:
        _probe(path.parent)
        with path.open("rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except FileNotFoundError as error:
        if error.filename == str(path):
            return  # a new database: the store creates it
        header, problem = b"", _reason(error)
    except OSError as error:
        header, problem = b"", _reason(error)
    else:
        problem = "file is not a database" if header and header != SQLITE_HEADER else ""
    if problem:
        raise StartupError(f"IDEMPOTENCY_STORE cannot be used: {path}: {problem}")


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def check(settings: Settings, *, own_notifier: bool = True, own_store: bool = True) -> None:
    """Raise StartupError for the first setting that cannot work. `own_*` is False where the
    caller hands in its own notifier or store (tests), which then needs no checking."""
    check_writable_folder("DEAD_LETTER_DIR", settings.dead_letter_dir)
    if own_notifier and settings.notifier == "outbox":
        check_writable_folder("OUTBOX_DIR", settings.outbox_dir)
    if own_store:
        check_store(settings.idempotency_store)
