"""Which routes an event goes to: compiled routes and an indexed, pure matcher.

Semantics (README "Routing rules"): every condition given in `match` must hold, a list means any
of its values, and `not` removes the event when all of its conditions hold. Object names are
matched with path globs (`*` within one folder level, `**/` any folders, see `app.rules.model`);
buckets, content types and metadata values with plain globs (`*` anything). Content types compare
case-insensitively and, unless the glob itself has a ";", without their parameters
("text/csv; charset=utf-8" matches "text/csv"). A condition on sizes, content type or metadata does
not hold for an event that lacks that field.

The index (issue 10, item 6) looks routes up by event type and then by one literal key per route:
a name prefix (from `prefix`, or the literal head of every `name` glob), else a name suffix (from
`suffix`, or the literal tail of every `name` glob), else a literal bucket; routes with none of
these are checked for every event of their types. The few candidates are then checked in full,
in file order, so 1,000 routes with distinct prefixes cost about what one route costs.
Regular expressions are compiled on first use, not at start-up, by RE2 (google-re2): automata that
never backtrack, so a match takes time linear in the value whatever the glob (issue 19).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from app.events.models import EventType, StorageEvent
from app.rules.model import (
    CharClass,
    Conditions,
    GlobPart,
    RouteSpec,
    Wildcard,
    glob_parts,
    size_text,
)

Test = Callable[[StorageEvent], bool]


@dataclass(frozen=True)
class Verdict:
    route: RouteSpec
    matched: bool
    # matched: the conditions given, in file order ("prefix reports/, suffix .csv"), or "every
    # event"; not matched: the first condition that failed ('suffix: "q3.txt" does not end with
    # ".csv"') or 'not: matched (suffix .tmp)'.
    reason: str
    # Whether `select` takes this route: it matched and no earlier matching route without
    # `continue: true` stopped the search.
    selected: bool = False


# --- globs ---------------------------------------------------------------------------------


class Regex(Protocol):
    """What the matcher uses of a compiled RE2 pattern (google-re2 ships no type hints)."""

    def match(self, text: str) -> object | None: ...


@functools.lru_cache(maxsize=4096)
def glob_regex(pattern: str, *, path: bool) -> Regex:
    """The glob as a regular expression anchored at both ends, compiled by RE2 (google-re2): an
    automaton that never backtracks, so matching takes time linear in the name whatever the
    glob (Python's `re` took 50 s for `reports/*_*_*_*.csv` against 1,000 underscores, issue 19).
    path=True: `*`, `?` and classes stay inside one segment, `**/` matches zero or more
    folders, a trailing `**` the rest. ValueError for a bad glob."""
    import re2  # type: ignore[import-untyped]  # on first use: not at start-up

    regex: Regex = re2.compile(_regex_source(glob_parts(pattern, path=path), path=path))
    return _Utf8Safe(regex)


class _Utf8Safe:
    """RE2 matches UTF-8: a value with a lone surrogate (no character, so not in a valid name;
    the JSON decoders refuse them) is matched with U+FFFD in its place instead of failing."""

    __slots__ = ("_regex",)

    def __init__(self, regex: Regex) -> None:
        self._regex = regex

    def match(self, text: str) -> object | None:
        try:
            return self._regex.match(text)
        except UnicodeEncodeError:
            replaced = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            return self._regex.match(replaced)


def _regex_source(parts: Sequence[GlobPart], *, path: bool) -> str:
    """RE2 syntax: `(?s)` so that `.` takes newlines too, `\\z` the very end."""
    pieces = [r"(?s)\A"]
    for part in parts:
        if isinstance(part, str):
            pieces.append(_escape(part))
        elif isinstance(part, CharClass):
            pieces.append(_class_source(part, path=path))
        elif part is Wildcard.STAR:
            pieces.append("[^/]*" if path else ".*")
        elif part is Wildcard.ONE:
            pieces.append("[^/]" if path else ".")
        elif part is Wildcard.FOLDERS:
            pieces.append("(?:.*/)?")
        else:  # Wildcard.REST
            pieces.append(".*")
    pieces.append(r"\z")
    return "".join(pieces)


def _escape(text: str) -> str:
    """Literal text for RE2: every ASCII character but letters and digits as a hex escape."""
    return "".join(
        char if char.isalnum() or not char.isascii() else f"\\x{{{ord(char):02x}}}" for char in text
    )


def _class_source(char_class: CharClass, *, path: bool) -> str:
    """A class as RE2 writes it; on a path "/" is never a member (RE2 has no lookahead, so a
    range that spans it is split around it)."""
    ranges = char_class.ranges
    if path and not char_class.negated:
        ranges = tuple(piece for low, high in ranges for piece in _without_slash(low, high))
        if not ranges:
            return _NOTHING  # a class of "/" alone, on a path
    members = "".join(
        _escape(low) if low == high else f"{_escape(low)}-{_escape(high)}" for low, high in ranges
    )
    if char_class.negated:
        return f"[^{members}/]" if path else f"[^{members}]"
    return f"[{members}]"


def _without_slash(low: str, high: str) -> list[tuple[str, str]]:
    if not low <= "/" <= high:
        return [(low, high)]
    return [piece for piece in ((low, "."), ("0", high)) if piece[0] <= piece[1]]


_NOTHING = r"[^\x00-\x{10ffff}]"  # no character is in it


class _GlobSet:
    """Any of several globs: exact strings by set lookup, the rest by regexes compiled on first
    use (not at start-up, where 1,000 routes would spend tens of milliseconds compiling)."""

    __slots__ = ("_exact", "_path", "_patterns", "_regexes")

    def __init__(self, patterns: Sequence[str], *, path: bool) -> None:
        self._path = path
        self._exact = frozenset(p for p in patterns if _is_literal(glob_parts(p, path=path)))
        self._patterns = tuple(p for p in patterns if p not in self._exact)
        self._regexes: tuple[Regex, ...] | None = None

    def __call__(self, value: str) -> bool:
        if value in self._exact:
            return True
        if not self._patterns:
            return False
        regexes = self._regexes
        if regexes is None:
            regexes = self._regexes = tuple(glob_regex(p, path=self._path) for p in self._patterns)
        return any(regex.match(value) for regex in regexes)


def _is_literal(parts: tuple[GlobPart, ...]) -> bool:
    return len(parts) == 1 and isinstance(parts[0], str)


def _head(parts: tuple[GlobPart, ...]) -> str:
    return parts[0] if parts and isinstance(parts[0], str) else ""


def _tail(parts: tuple[GlobPart, ...]) -> str:
    return parts[-1] if parts and isinstance(parts[-1], str) else ""


# --- conditions ----------------------------------------------------------------------------


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


class _ContentTypes:
    """Content-type globs, case-insensitive; without a ";" they ignore the value's parameters."""

    __slots__ = ("_bare", "_full")

    def __init__(self, patterns: Sequence[str]) -> None:
        bare = [p.lower() for p in patterns if ";" not in p]
        full = [p.lower() for p in patterns if ";" in p]
        self._bare = _GlobSet(bare, path=False) if bare else None
        self._full = _GlobSet(full, path=False) if full else None

    def __call__(self, value: str) -> bool:
        if self._bare is not None and self._bare(_media_type(value)):
            return True
        return self._full is not None and self._full(value.strip().lower())


def _metadata_test(pairs: Sequence[tuple[str, str]]) -> Test:
    checks = [(key, None if glob == "*" else _GlobSet([glob], path=False)) for key, glob in pairs]

    def test(event: StorageEvent) -> bool:
        metadata = event.data.metadata
        if metadata is None:
            return False
        for key, glob in checks:
            value = metadata.get(key)
            if value is None or (glob is not None and not glob(value)):
                return False
        return True

    return test


def _condition_test(key: str, conditions: Conditions) -> Test:
    """One condition as a fast predicate; the reasons are built apart, only when asked."""
    if key == "events":
        events = conditions.events or frozenset()
        return lambda event: event.type in events
    if key == "bucket":
        buckets = _GlobSet(conditions.bucket or (), path=False)
        return lambda event: buckets(event.data.bucket)
    if key == "name":
        names = _GlobSet(conditions.name or (), path=True)
        return lambda event: names(event.data.name)
    if key == "prefix":
        prefixes = conditions.prefix or ()
        return lambda event: event.data.name.startswith(prefixes)
    if key == "suffix":
        suffixes = conditions.suffix or ()
        return lambda event: event.data.name.endswith(suffixes)
    if key == "min_size":
        low = conditions.min_size or 0
        return lambda event: event.data.size is not None and event.data.size >= low
    if key == "max_size":
        high = conditions.max_size or 0
        return lambda event: event.data.size is not None and event.data.size <= high
    if key == "content_type":
        types = _ContentTypes(conditions.content_type or ())
        return lambda event: event.data.content_type is not None and types(event.data.content_type)
    if key == "metadata":
        return _metadata_test(conditions.metadata or ())
    raise ValueError(f"unknown condition {key!r}")


class _CompiledConditions:
    __slots__ = ("conditions", "tests")

    def __init__(self, conditions: Conditions) -> None:
        self.conditions = conditions
        self.tests = tuple((key, _condition_test(key, conditions)) for key in conditions.given())

    def holds(self, event: StorageEvent) -> bool:
        return all(test(event) for _, test in self.tests)

    def first_failure(self, event: StorageEvent) -> str | None:
        for key, test in self.tests:
            if not test(event):
                return _failure(key, self.conditions, event)
        return None


class _CompiledRoute:
    __slots__ = ("exclude", "match", "spec")

    def __init__(self, spec: RouteSpec) -> None:
        self.spec = spec
        self.match = _CompiledConditions(spec.match)
        self.exclude = None if spec.exclude is None else _CompiledConditions(spec.exclude)

    def holds(self, event: StorageEvent) -> bool:
        for _, test in self.match.tests:
            if not test(event):
                return False
        exclude = self.exclude
        if exclude is None:
            return True
        return not exclude.holds(event)

    def verdict(self, event: StorageEvent) -> tuple[bool, str]:
        failure = self.match.first_failure(event)
        if failure is not None:
            return False, failure
        if self.exclude is not None and self.exclude.holds(event):
            return False, f"not: matched ({_describe(self.spec.exclude)})"
        return True, describe(self.spec)


def matches(route: RouteSpec, event: StorageEvent) -> bool:
    """The plain check of one route, as the matcher's index must agree with it."""
    return _CompiledRoute(route).holds(event)


# --- reasons -------------------------------------------------------------------------------


def describe(route: RouteSpec) -> str:
    """Why an event that matched this route matched it: "prefix reports/, suffix .csv, not
    (suffix .tmp)", or "every event". For the email footer and `explain`."""
    parts = [_describe(route.match)] if route.match.given() else []
    if route.exclude is not None:
        parts.append(f"not ({_describe(route.exclude)})")
    return ", ".join(parts) if parts else "every event"


def _describe(conditions: Conditions | None) -> str:
    if conditions is None:
        return ""
    return ", ".join(_describe_one(key, conditions) for key in conditions.given())


def _events_text(events: frozenset[EventType] | None) -> str:
    return " or ".join(member.short for member in EventType if member in (events or ()))


def _describe_one(key: str, conditions: Conditions) -> str:
    if key == "events":
        events = conditions.events or frozenset()
        return f"{'event' if len(events) == 1 else 'events'} {_events_text(events)}"
    if key in ("min_size", "max_size"):
        size = conditions.min_size if key == "min_size" else conditions.max_size
        return f"{key} {size_text(size or 0)}"
    if key == "metadata":
        pairs = conditions.metadata or ()
        return "metadata " + " and ".join(f"{name}={glob}" for name, glob in pairs)
    values: tuple[str, ...] = getattr(conditions, key) or ()
    return f"{key} {' or '.join(values)}"


def _quoted(value: str) -> str:
    # Object names come from whoever uploads: control and format characters are shown escaped.
    return json.dumps(value, ensure_ascii=not value.isprintable())


def _any_of(values: Sequence[str]) -> str:
    quoted = [_quoted(value) for value in values]
    return quoted[0] if len(quoted) == 1 else "any of " + ", ".join(quoted)


def _failure(key: str, conditions: Conditions, event: StorageEvent) -> str:
    data = event.data
    if key == "events":
        return f"event: {event.type.short} is not {_events_text(conditions.events)}"
    if key in ("bucket", "name"):
        value = data.bucket if key == "bucket" else data.name
        patterns: tuple[str, ...] = getattr(conditions, key) or ()
        return f"{key}: {_quoted(value)} does not match {_any_of(patterns)}"
    if key == "prefix":
        return (
            f"prefix: {_quoted(data.name)} does not start with {_any_of(conditions.prefix or ())}"
        )
    if key == "suffix":
        return f"suffix: {_quoted(data.name)} does not end with {_any_of(conditions.suffix or ())}"
    if key in ("min_size", "max_size"):
        if data.size is None:
            return f"{key}: the event has no size"
        if key == "min_size":
            return f"min_size: {data.size} bytes is less than {size_text(conditions.min_size or 0)}"
        return f"max_size: {data.size} bytes is more than {size_text(conditions.max_size or 0)}"
    if key == "content_type":
        if data.content_type is None:
            return "content_type: the object has no content type"
        wanted = _any_of(conditions.content_type or ())
        return f"content_type: {_quoted(data.content_type)} does not match {wanted}"
    if key == "metadata":
        metadata = data.metadata
        if metadata is None:
            return "metadata: the object has no custom metadata"
        for name, glob in conditions.metadata or ():
            if name not in metadata:
                return f"metadata: the object has no key {_quoted(name)}"
            if not _GlobSet([glob], path=False)(metadata[name]):
                return f"metadata.{name}: {_quoted(metadata[name])} does not match {_quoted(glob)}"
    return f"{key}: does not hold"


# --- the index -----------------------------------------------------------------------------

_Table = tuple[tuple[int, dict[str, list[int]]], ...]  # (key length, key -> route positions)


@dataclass(frozen=True)
class _Index:
    """The routes one event type can reach, by the one key each route is indexed under."""

    prefixes: _Table
    suffixes: _Table
    buckets: dict[str, list[int]]
    always: tuple[int, ...]


def _index_key(conditions: Conditions) -> tuple[str, frozenset[str]] | None:
    """The literal strings one of which an event must carry for the route to match, by kind."""
    names = [glob_parts(p, path=True) for p in conditions.name or ()]
    for kind, given, from_names in (
        ("prefix", conditions.prefix, [_head(parts) for parts in names]),
        ("suffix", conditions.suffix, [_tail(parts) for parts in names]),
    ):
        candidates = []
        if given:
            candidates.append(frozenset(given))
        if from_names and all(from_names):
            candidates.append(frozenset(from_names))
        if candidates:
            # The longer the shortest key, the fewer names it lets through.
            return kind, max(candidates, key=lambda keys: min(len(key) for key in keys))
    buckets = conditions.bucket
    if buckets and all(_is_literal(glob_parts(b, path=False)) for b in buckets):
        return "bucket", frozenset(buckets)
    return None


def _table(entries: dict[str, list[int]]) -> _Table:
    by_length: dict[int, dict[str, list[int]]] = {}
    for key, positions in entries.items():
        by_length.setdefault(len(key), {})[key] = positions
    return tuple(sorted(by_length.items()))


class Matcher:
    """The routes of a rules file, indexed; `select` is pure and safe to share across requests."""

    def __init__(self, routes: Sequence[RouteSpec]) -> None:
        self._specs = tuple(routes)
        # Compiled on first use: a start-up with 1,000 routes need not build 1,000 predicates.
        self._compiled: list[_CompiledRoute | None] = [None] * len(self._specs)
        prefixes: dict[EventType, dict[str, list[int]]] = {t: {} for t in EventType}
        suffixes: dict[EventType, dict[str, list[int]]] = {t: {} for t in EventType}
        buckets: dict[EventType, dict[str, list[int]]] = {t: {} for t in EventType}
        always: dict[EventType, list[int]] = {t: [] for t in EventType}
        for position, route in enumerate(routes):
            key = _index_key(route.match)
            for event_type in EventType:
                if route.match.events is not None and event_type not in route.match.events:
                    continue
                if key is None:
                    always[event_type].append(position)
                    continue
                kind, values = key
                table = {"prefix": prefixes, "suffix": suffixes, "bucket": buckets}[kind][
                    event_type
                ]
                for value in values:
                    table.setdefault(value, []).append(position)
        self._indexes = {
            t: _Index(_table(prefixes[t]), _table(suffixes[t]), buckets[t], tuple(always[t]))
            for t in EventType
        }

    def _compile(self, position: int) -> _CompiledRoute:
        # Two threads may both compile a route; either result is the same.
        route = self._compiled[position] = _CompiledRoute(self._specs[position])
        return route

    def candidates(self, event: StorageEvent) -> list[int]:
        """Positions of the routes that may match, in file order: a superset of those that do."""
        index = self._indexes[event.type]
        name = event.data.name
        found = list(index.always)
        size = len(name)
        for length, table in index.prefixes:
            if length > size:
                break
            hit = table.get(name[:length])
            if hit is not None:
                found.extend(hit)
        for length, table in index.suffixes:
            if length > size:
                break
            hit = table.get(name[-length:])
            if hit is not None:
                found.extend(hit)
        hit = index.buckets.get(event.data.bucket)
        if hit is not None:
            found.extend(hit)
        if len(found) > 1:
            found = sorted(set(found))
        return found

    def select(self, event: StorageEvent) -> list[RouteSpec]:
        """The routes that apply, in file order: the first matching route, and while the last
        one taken has `continue: true`, the next matching one."""
        selected: list[RouteSpec] = []
        compiled = self._compiled
        for position in self.candidates(event):
            route = compiled[position] or self._compile(position)
            if route.holds(event):
                selected.append(route.spec)
                if not route.spec.continue_:
                    break
        return selected

    def explain(self, event: StorageEvent) -> list[Verdict]:
        """Every route in file order: whether it matched, why (not), and whether it was selected."""
        verdicts = []
        searching = True
        for position in range(len(self._specs)):
            route = self._compiled[position] or self._compile(position)
            matched, reason = route.verdict(event)
            selected = matched and searching
            if selected and not route.spec.continue_:
                searching = False
            verdicts.append(Verdict(route.spec, matched, reason, selected))
        return verdicts
