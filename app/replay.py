"""`python -m app.replay DIR [--url URL]`: send dead-lettered events to a service again.

Each file in DIR is a structured-mode CloudEvent written by the dead-letter box. It is posted as
`application/cloudevents+json` and removed only after a 2xx answer, so a failed replay loses
nothing. A change older than the retention (`--retention`, by default DEDUPE_RETENTION or 8 days,
counted from the event's time) is not sent: the service's done marks for it may be gone, so an
event that had partly gone out before would be emailed again. Check what went out, then send it
with `--force` (the service then sends it too; without it, the service refuses such a change
itself and keeps it in its dead-letter folder).

A digest SendGrid rejected (`"kind": "digest"`, written beside the events) is not an event: it
is listed and kept, for a person to read (it names the route and the objects). Where the
service checks tokens (EVENT_AUTH=oidc), put an ID token of an invoker in REPLAY_ID_TOKEN
(e.g. `gcloud auth print-identity-token`), not on the command line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import urllib.error
from datetime import UTC, datetime
from pathlib import Path

from cloudevents.core.bindings.http import HTTPMessage

from app.config import DEDUPE_RETENTION_SECONDS
from app.delivery.deadletter import REPLAY_HEADER
from app.durations import duration_text, parse_duration
from app.emit import DEFAULT_URL, post


def dead_letters(directory: Path) -> list[Path]:
    """The `.json` files in `directory`; OSError when it is missing, not a folder or unreadable
    (Path.glob would answer all three with an empty list)."""
    if not directory.exists():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(directory))
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(directory))
    with os.scandir(directory) as entries:
        return sorted(
            Path(entry.path)
            for entry in entries
            if entry.name.endswith(".json") and entry.is_file()
        )


def is_digest(path: Path) -> bool:
    """A dead-lettered digest (app.delivery.digests.DigestDeadLetterFolder), not an event."""
    try:
        document = json.loads(path.read_bytes())
    except ValueError:
        return False  # not JSON: the service will say what is wrong with it
    return isinstance(document, dict) and document.get("kind") == "digest"


def replay_file(path: Path, url: str, token: str | None, *, force: bool) -> tuple[int, str]:
    headers = {"content-type": "application/cloudevents+json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    if force:
        headers[REPLAY_HEADER] = "force"
    return post(url, HTTPMessage(headers=headers, body=path.read_bytes()))


def age_seconds(path: Path, now: datetime) -> float | None:
    """How long ago the event's change happened (its `time`; else when it was dead-lettered),
    or None when the file says neither (the service will say what is wrong with it)."""
    try:
        document = json.loads(path.read_bytes())
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    for field in ("time", "deadletteredat"):
        value = document.get(field)
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                continue
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return (now - moment).total_seconds()
    return None


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.0f} days" if days >= 2 else f"{seconds / 3600:.0f} hours"


def _retention(value: str) -> float:
    try:
        return float(parse_duration(value))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.replay", description=__doc__.split("\n")[0]
    )
    parser.add_argument("directory", type=Path, help="dead-letter folder (DEAD_LETTER_DIR)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service URL (default {DEFAULT_URL})")
    parser.add_argument(
        "--retention",
        type=_retention,
        default=os.environ.get("DEDUPE_RETENTION", duration_text(DEDUPE_RETENTION_SECONDS)),
        help="the service's DEDUPE_RETENTION: older changes are not sent (default: that"
        " variable, else 8d)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="send changes older than the retention too (check first what went out)",
    )
    args = parser.parse_args(argv)
    token = os.environ.get("REPLAY_ID_TOKEN")
    try:
        files = dead_letters(args.directory)
    except OSError as error:
        # A mistyped folder is not an empty one: say so, and fail, so a script notices.
        print(f"{error.strerror or error}: {args.directory}", file=sys.stderr)
        return 2
    if not files:
        print(f"nothing to replay in {args.directory}")
        return 0
    failed = 0
    digests = [path for path in files if is_digest(path)]
    for path in digests:
        print(f"{path.name}: a digest, not an event (kept; it lists the route and the objects)")
    files = [path for path in files if path not in digests]
    now = datetime.now(UTC)
    for path in files:
        age = age_seconds(path, now)
        if not args.force and age is not None and age > args.retention:
            failed += 1
            print(
                f"{path.name}: the change is {_days(age)} old, older than the"
                f" retention ({duration_text(int(args.retention))}): the service may have"
                " forgotten what of it was sent, so it could be emailed twice; check, then"
                " replay it with --force (kept)"
            )
            continue
        try:
            status, body = replay_file(path, args.url, token, force=args.force)
        except (urllib.error.URLError, OSError) as error:
            print(f"could not reach {args.url}: {getattr(error, 'reason', error)}", file=sys.stderr)
            return 2
        if 200 <= status < 300:
            path.unlink()
            print(f"{path.name}: {status} {body} (removed)")
        else:
            failed += 1
            print(f"{path.name}: {status} {body} (kept)")
    print(f"replayed {len(files) - failed} of {len(files)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
