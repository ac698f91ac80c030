"""`python -m app.replay DIR [--url URL]`: send dead-lettered events to a service again.

Each file in DIR is a structured-mode CloudEvent written by the dead-letter box. It is posted as
`application/cloudevents+json` and removed only after a 2xx answer, so a failed replay loses
nothing. A digest SendGrid rejected (`"kind": "digest"`, written beside the events) is not an
event: it is listed and kept, for a person to read (it names the route and the objects). Where
the service checks tokens (EVENT_AUTH=oidc), put an ID token of an invoker in REPLAY_ID_TOKEN
(e.g. `gcloud auth print-identity-token`), not on the command line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import urllib.error
from pathlib import Path

from cloudevents.core.bindings.http import HTTPMessage

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


def replay_file(path: Path, url: str, token: str | None) -> tuple[int, str]:
    headers = {"content-type": "application/cloudevents+json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return post(url, HTTPMessage(headers=headers, body=path.read_bytes()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.replay", description=__doc__.split("\n")[0]
    )
    parser.add_argument("directory", type=Path, help="dead-letter folder (DEAD_LETTER_DIR)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service URL (default {DEFAULT_URL})")
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
    for path in files:
        try:
            status, body = replay_file(path, args.url, token)
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
