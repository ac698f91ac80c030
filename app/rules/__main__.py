"""`python -m app.rules check FILE` and `python -m app.rules explain FILE --event ... --name ...`.

`check` validates a rules file as the service does at start-up (exit 0 and one line per route, or
exit 1 and the one-line error naming the file, line, route and field). `explain` runs one event
through the file: route by route, matched or the first condition that failed; then who would be
emailed, by which route, with the rendered subject, and which routes would hold it for a digest
(`digest`, or `rate` past its limit). Nothing is sent.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from app.durations import duration_text
from app.events.models import EventType, StorageEvent, StorageObjectData
from app.notify.render import visible
from app.rules.match import describe
from app.rules.model import RouteSpec, RulesError, load_rules, parse_size
from app.rules.routing import RulesRouter, compile_rules

SENDER = "notifier@localhost"  # explain shows recipients and subjects; the sender plays no part


def summary(spec: RouteSpec) -> str:
    action = "drop" if spec.drop else ", ".join(spec.to)
    flags = []
    if spec.continue_:
        flags.append("continue")
    if spec.subject is not None or spec.text is not None or spec.html is not None:
        flags.append("templates: " + "/".join(_templated(spec)))
    if spec.digest is not None or spec.rate is not None:
        flags.append(settings(spec))
    extra = f" [{'; '.join(flags)}]" if flags else ""
    return f"{spec.name}: {describe(spec)} -> {action}{extra}"


def settings(spec: RouteSpec) -> str:
    """`digest: window 5m, max_items 100, leading`, `rate: max 20 per 1h`, or "" for neither."""
    if spec.digest is not None:
        digest = spec.digest
        window = duration_text(int(digest.window_seconds))
        leading = ", leading" if digest.leading else ""
        return f"digest: window {window}, max_items {digest.max_items}{leading}"
    if spec.rate is not None:
        return f"rate: max {spec.rate.max} per {duration_text(int(spec.rate.per_seconds))}"
    return ""


def _templated(spec: RouteSpec) -> list[str]:
    return [name for name in ("subject", "text", "html") if getattr(spec, name) is not None]


def load(path: Path) -> RulesRouter:
    rules = load_rules(path)
    return RulesRouter(rules, compile_rules(rules), SENDER)


def check(path: Path) -> int:
    router = load(path)
    routes = router.rules.routes
    print(f"{path}: {len(routes)} route{'s' if len(routes) != 1 else ''}, valid")
    for spec in routes:
        print(f"  {summary(spec)}")
    return 0


def explain(path: Path, event: StorageEvent) -> int:
    router = load(path)
    # Shown as the reasons below show names: a line break cannot pass for another line.
    print(f"{event.type.short} {visible(f'gs://{event.data.bucket}/{event.data.name}')}")
    for verdict in router.matcher.explain(event):
        if verdict.selected:
            state = "matched, taken"
        elif verdict.matched:
            state = "matched, not reached (an earlier route without continue took the event)"
        else:
            state = "no match"
        print(f"  {verdict.route.name}: {state}: {verdict.reason}")
    routed = router.route(event)
    if not routed.notifications and not routed.deferred:
        if routed.route is not None:
            print(f"result: dropped by route {routed.route}: acknowledged, nobody is emailed")
        else:
            print("result: no route matched: acknowledged as ignored, nobody is emailed")
        return 0
    for notification in routed.notifications:
        route = notification.context["route"]
        print(f"email by route {route} to {', '.join(notification.recipients)}")
        print(f"  subject: {notification.subject}")
    for deferred in routed.deferred:
        spec = router.routes[deferred.route].spec
        at_once = deferred.notification()
        if spec.digest is not None:
            print(f"digest by route {spec.name} to {', '.join(spec.to)} ({settings(spec)})")
            print("  the event joins the route's window: one email when it closes")
            if spec.digest.leading:
                print(
                    "  or, as the first event after a quiet window, it goes at once, alone: "
                    f"subject: {at_once.subject}"
                )
        else:
            print(
                f"email by route {spec.name} to {', '.join(at_once.recipients)} ({settings(spec)})"
            )
            print(f"  subject: {at_once.subject}")
            print("  past the limit, the event joins the period's digest instead")
    return 0


def event_from(args: argparse.Namespace) -> StorageEvent:
    metadata = dict(args.metadata or ())
    now = datetime.now(UTC)
    event_type = EventType.from_short(args.event)
    data = StorageObjectData(
        bucket=args.bucket,
        name=args.name,
        size=args.size,
        content_type=args.content_type,
        generation=int(now.timestamp() * 1_000_000),
        metageneration=2 if event_type is EventType.METADATA_UPDATED else 1,
        metadata=metadata or None,
        time_created=now,
        updated=now,
    )
    return StorageEvent(
        id="explain",
        source=f"//storage.googleapis.com/projects/_/buckets/{args.bucket}",
        type=event_type,
        subject=f"objects/{args.name}",
        time=now,
        data=data,
    )


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _text(value: str) -> str:
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8 text") from None
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _metadata(value: str) -> tuple[str, str]:
    key, separator, item = _text(value).partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, not {value!r}")
    return key, item


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m app.rules", description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    check_command = commands.add_parser("check", help="validate a rules file")
    check_command.add_argument("file", type=Path)
    explain_command = commands.add_parser("explain", help="run one event through a rules file")
    explain_command.add_argument("file", type=Path)
    explain_command.add_argument(
        "--event", required=True, choices=[member.short for member in EventType]
    )
    explain_command.add_argument("--bucket", required=True, type=_text)
    explain_command.add_argument("--name", required=True, type=_text)
    explain_command.add_argument("--size", type=_size, help="bytes, or with a unit: 2MiB")
    explain_command.add_argument("--content-type", type=_text)
    explain_command.add_argument(
        "--metadata",
        action="append",
        type=_metadata,
        metavar="KEY=VALUE",
        help="custom metadata (repeatable)",
    )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "check":
            return check(args.file)
        return explain(args.file, event_from(args))
    except RulesError as error:
        print(error, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
