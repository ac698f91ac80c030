"""The rules file: YAML read into validated, normalised routes. Pure: no I/O but `load_rules`.

The file is composed, not loaded: PyYAML's `compose` (libyaml's C parser when present) gives a node
tree where every node knows its line, so each problem names the file, the line, the route and the
field, and is raised as one `RulesError`; no other exception leaves this module. Validation walks
the node tree by hand: it is several times faster than constructing Python objects and models,
and the service loads the file at start-up, where time is counted.

Reading rules, decided here:
- Where a string is expected, a scalar is taken as written: `name: 2026` is "2026", `bucket: yes`
  is "yes", `suffix: .5` is ".5" (YAML 1.1 would read numbers and booleans). An empty value
  (`prefix:`, `~`, `null`) is an error, and so is an empty string, except as a metadata value.
- A list field (`events`, `bucket`, `name`, `prefix`, `suffix`, `content_type`, `to`) takes one
  string or a non-empty list of strings.
- `drop` and `continue` take YAML booleans (true/false, also yes/no and on/off).
- Sizes are whole numbers: `1024`, `1_000_000`, or a whole number and a unit: B, KB, MB, GB, TB
  (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024); units in any case, a space allowed.
  Fractions ("1.5KiB") are refused with the whole-byte spelling to write instead; negative
  numbers and numbers beyond 2**63 - 1 are refused. `min_size` and `max_size` are inclusive.
- Durations (`digest.window`, `rate.per`) are a whole number and a unit: s, m, h or d ("30s",
  "5m", "1h", "1d"; a space allowed), or a bare whole number of seconds. Fractions ("1.5h"),
  negative numbers, other units ("5 minutes", "1w") and spellings like "5M" are refused, saying
  what to write instead ("90m", "5m", "7d"); zero is below every range. `digest.window` and
  `rate.per` are 1s to 7d.
- `digest` (window:, max_items: 0 to 1000, default 100, leading: default false) and `rate` (max:
  1 to 100000, per:) are optional mappings; neither goes with `drop: true`, and a route takes one
  of them, not both (a digest route already sends at most one email per window). A digest route's
  subject, text and html are digest templates (app.rules.templates.compile_digest_templates).
- Duplicate keys are errors. Anchors, aliases and merge keys (`<<: *common`) work; a key written
  beside a merge overrides the merged one. YAML tags other than the standard `!!` ones are refused.

Globs (`glob_parts`): `*` any run of characters, `?` one character, `[abc]`, `[a-z]`, `[!abc]`
(also `[^abc]`) one character of (not of) a class; everything else is literal, backslash too
(write `[*]`, `[?]`, `[[]` for a literal `*`, `?`, `[`). On object names (`path=True`) `*`, `?`
and classes stay inside one path segment (never match "/"); `**` must stand alone between
slashes: `**/` matches zero or more whole folders and a trailing `**` matches the rest of the name
(so `a/**` matches "a/", "a/x" and "a/x/y", but not "a"; `**` alone matches every name). A glob is
matched against the whole string, case-sensitively; a trailing "/" is literal (`reports/` matches
only the folder placeholder object "reports/").
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import yaml
import yaml.reader
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from app.config import _check_address
from app.durations import DURATION_HELP, duration_text, parse_duration
from app.durations import escaped as _escaped
from app.durations import shown as _shown
from app.events.models import EventType


class RulesError(ValueError):
    """One problem in a rules file. str(error) is one line, e.g.
    'rules.yaml:14: route "finance-reports": match.sufix: unknown key "sufix"
    (did you mean "suffix"?)' (one line).

    `route` is the route's name, or "#3" (its 1-based position) when it has no valid name yet.
    """

    def __init__(
        self,
        path: str,
        line: int | None,
        route: str | None,
        field: str | None,
        message: str,
    ) -> None:
        self.path = path
        self.line = line
        self.route = route
        self.field = field if field is None or field.isprintable() else _escaped(field)
        # One line, whatever a value or a YAML message held.
        self.message = " ".join(message.split("\n"))
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        parts = [where]
        if self.route is not None:
            parts.append(
                f"route {self.route}" if self.route.startswith("#") else f'route "{self.route}"'
            )
        if self.field is not None:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


@dataclass(frozen=True)
class Conditions:
    """The conditions of `match:` or `not:`, normalised: strings -> tuples, sizes -> int bytes.
    None means the condition was not given (it holds for every event)."""

    events: frozenset[EventType] | None = None
    bucket: tuple[str, ...] | None = None  # globs, path=False
    name: tuple[str, ...] | None = None  # globs, path=True
    prefix: tuple[str, ...] | None = None
    suffix: tuple[str, ...] | None = None
    min_size: int | None = None  # inclusive
    max_size: int | None = None  # inclusive
    content_type: tuple[str, ...] | None = None  # globs, path=False
    metadata: tuple[tuple[str, str], ...] | None = None  # (key, value glob); "*" = key present
    # The keys as the file gave them, in file order (for human-readable reasons); empty = the
    # order of the fields above.
    order: tuple[str, ...] = ()

    def given(self) -> tuple[str, ...]:
        """The names of the conditions given, in file order."""
        if self.order:
            return self.order
        return tuple(key for key in CONDITION_KEYS if getattr(self, key) is not None)


@dataclass(frozen=True, slots=True)
class DigestSpec:
    """`digest:`: a route's matching events are gathered for `window_seconds` and sent as one
    email listing the first `max_items` objects; with `leading`, the first event after a quiet
    window goes out at once, alone."""

    window_seconds: float
    max_items: int = 100
    leading: bool = False


@dataclass(frozen=True, slots=True)
class RateSpec:
    """`rate:`: at most `max` emails per period of `per_seconds`; the rest of a period's events go
    out as one digest when it ends."""

    max: int
    per_seconds: float


@dataclass(frozen=True)
class RouteSpec:
    name: str
    index: int  # 0-based position in the file
    line: int  # 1-based line of the route in the file
    match: Conditions = field(default_factory=Conditions)
    exclude: Conditions | None = None  # `not:` in YAML
    to: tuple[str, ...] = ()
    drop: bool = False
    continue_: bool = False  # `continue:` in YAML
    subject: str | None = None  # template sources
    text: str | None = None
    html: str | None = None
    # field -> 1-based file line of the template's first line: line N of a template is file line
    # template_lines[field] + N - 1 for literal block scalars (`|`) and one-line values.
    template_lines: dict[str, int] = field(default_factory=dict, hash=False)
    digest: DigestSpec | None = None
    rate: RateSpec | None = None


@dataclass(frozen=True)
class Rules:
    path: str
    routes: tuple[RouteSpec, ...]


TOP_KEYS = ("version", "routes")
ROUTE_KEYS = (
    "name",
    "match",
    "not",
    "to",
    "drop",
    "continue",
    "subject",
    "text",
    "html",
    "digest",
    "rate",
)
DIGEST_KEYS = ("window", "max_items", "leading")
RATE_KEYS = ("max", "per")
CONDITION_KEYS = (
    "events",
    "bucket",
    "name",
    "prefix",
    "suffix",
    "min_size",
    "max_size",
    "content_type",
    "metadata",
)
TEMPLATE_KEYS = ("subject", "text", "html")
VERSION = 1
MAX_SIZE = 2**63 - 1  # Cloud Storage sizes are int64
ROUTE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
# (least, most) of each ranged value.
DIGEST_WINDOW = (1, 7 * 86400)
DIGEST_MAX_ITEMS = (0, 1000)
RATE_MAX = (1, 100_000)
RATE_PER = (1, 7 * 86400)


# --- sizes ---------------------------------------------------------------------------------

SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_UNIT_NAMES = ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")
_SIZE = re.compile(r"(\d+(?:_\d+)*)(?:\.(\d+))?\s*([A-Za-z]*)")
_SIZE_HELP = "bytes as a whole number, or a whole number and B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"


def parse_size(value: object) -> int:
    """1024, "1KiB", "2 GiB", "10MB", "5B" -> bytes; ValueError with a one-line reason otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not a size: {_shown(value)} ({_SIZE_HELP})")
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            if value.strip().startswith("-"):
                raise ValueError(f"not a size: {_shown(value)} is negative")
            raise ValueError(f"not a size: {_shown(value)} ({_SIZE_HELP})")
        whole, fraction, unit = match.groups()
        scale = SIZE_UNITS.get(unit.lower() if unit else "b")
        if scale is None:
            raise ValueError(f"unknown unit {_shown(unit)} in {_shown(value)} ({_SIZE_HELP})")
        digits = whole.replace("_", "")
        if len(digits) > 20:  # int() refuses huge strings with its own error; 20 digits is > 2**63
            raise ValueError(f"{_shown(value)} is too large (at most {MAX_SIZE} bytes)")
        if fraction is not None:
            raise ValueError(_fraction_help(value, digits, fraction, scale))
        number = int(digits) * scale
    if number < 0:
        raise ValueError(f"not a size: {number} is negative")
    if number > MAX_SIZE:
        raise ValueError(f"{_shown(value)} is too large (at most {MAX_SIZE} bytes)")
    return number


def _fraction_help(value: str, whole: str, fraction: str, scale: int) -> str:
    if len(whole) + len(fraction) > 40:
        return f"{_shown(value)} is not a whole number of bytes"
    numerator = int(whole + fraction) * scale
    denominator = 10 ** len(fraction)
    if numerator % denominator:
        return f"{_shown(value)} is not a whole number of bytes"
    return f'sizes are whole numbers: write "{numerator // denominator}B" for {_shown(value)}'


def size_text(size: int) -> str:
    """Bytes as people read them: "1 KiB", "10 MB", "352 bytes"."""
    if size:
        for unit in ("TiB", "TB", "GiB", "GB", "MiB", "MB", "KiB", "KB"):
            scale = SIZE_UNITS[unit.lower()]
            if size % scale == 0:
                return f"{size // scale} {unit}"
    return "1 byte" if size == 1 else f"{size} bytes"


# --- durations -----------------------------------------------------------------------------

_DIGEST_EXAMPLE = ' like "digest: {window: 5m}"'
_RATE_EXAMPLE = ' like "rate: {max: 20, per: 1h}"'
_PER_HELP = 'how long a period is, like "per: 1h"'


# --- globs ---------------------------------------------------------------------------------


class Wildcard(Enum):
    STAR = "*"  # any run of characters (inside one segment for object names)
    ONE = "?"  # one character (not "/" for object names)
    FOLDERS = "**/"  # object names only: zero or more whole folders
    REST = "**"  # object names only, at the end: the rest of the name


@dataclass(frozen=True)
class CharClass:
    """`[...]`: one character in (or, negated, not in) the ranges; single characters are (c, c)."""

    ranges: tuple[tuple[str, str], ...]
    negated: bool


GlobPart = str | Wildcard | CharClass


_GLOB_SPECIAL = re.compile(r"\*+|\?|\[")


@functools.lru_cache(maxsize=4096)
def glob_parts(pattern: str, *, path: bool) -> tuple[GlobPart, ...]:
    """A glob as literal strings and wildcards; ValueError with a one-line reason when bad.
    Cached: validation and the matcher both read every glob of a file."""
    parts: list[GlobPart] = []
    position, size = 0, len(pattern)
    while (special := _GLOB_SPECIAL.search(pattern, position)) is not None:
        start, end = special.span()
        if start > position:
            parts.append(pattern[position:start])
        token = special.group()
        position = end
        if token == "?":
            parts.append(Wildcard.ONE)
        elif token == "[":
            char_class, position = _char_class(pattern, start)
            parts.append(char_class)
        elif not path or token == "*":
            if not parts or parts[-1] is not Wildcard.STAR:  # "**" is "*" outside object names
                parts.append(Wildcard.STAR)
        elif (
            token != "**"
            or (start and pattern[start - 1] != "/")
            or pattern[end : end + 1] not in ("", "/")
        ):
            raise ValueError(
                f'"**" must stand alone between slashes (like "reports/**/*.csv") in '
                f"{_shown(pattern)}; a single * matches within one folder level"
            )
        elif end == size:
            if parts and parts[-1] is Wildcard.FOLDERS:
                parts[-1] = Wildcard.REST  # "**/**" is "**"
            else:
                parts.append(Wildcard.REST)
        else:
            position = end + 1  # the "/" belongs to "**/"
            if not parts or parts[-1] is not Wildcard.FOLDERS:  # "**/**/" is "**/"
                parts.append(Wildcard.FOLDERS)
    if position < size:
        parts.append(pattern[position:])
    return tuple(parts)


def _char_class(pattern: str, start: int) -> tuple[CharClass, int]:
    i = start + 1
    negated = i < len(pattern) and pattern[i] in "!^"
    if negated:
        i += 1
    # As in fnmatch: a "]" first in the class is a member, not its end.
    close = pattern.find("]", i + 1)
    if close < 0:
        raise ValueError(
            f'unclosed "[" at character {start + 1} of {_shown(pattern)} '
            '(write "[[]" for a literal "[")'
        )
    body = pattern[i:close]
    ranges: list[tuple[str, str]] = []
    j = 0
    while j < len(body):
        if j + 2 < len(body) and body[j + 1] == "-":
            low, high = body[j], body[j + 2]
            if low > high:
                raise ValueError(f'bad range "{low}-{high}" in {_shown(pattern)}')
            ranges.append((low, high))
            j += 3
        else:
            ranges.append((body[j], body[j]))
            j += 1
    return CharClass(tuple(ranges), negated), close + 1


def check_glob(pattern: str, *, path: bool) -> None:
    glob_parts(pattern, path=path)


# --- reading the file ----------------------------------------------------------------------

_LOADER: type[yaml.CSafeLoader] | type[yaml.SafeLoader] = (
    yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
)
_STANDARD_TAG = "tag:yaml.org,2002:"
_NULL = _STANDARD_TAG + "null"
_STR = _STANDARD_TAG + "str"
# What a scalar may be tagged with, implicitly or as `!!str`...: YAML's core types, no others.
_SCALAR_TAGS = frozenset(
    _STANDARD_TAG + name for name in ("str", "int", "float", "bool", "null", "timestamp")
)
_BOOL = _STANDARD_TAG + "bool"
_MERGE = _STANDARD_TAG + "merge"
_TRUE = frozenset({"true", "yes", "on", "y"})
_WHOLE = re.compile(r"\d+(?:_\d+)*")
_EVENT_NAMES = {member.short: member for member in EventType} | {
    member.value: member for member in EventType
}
# `matches` uses these field names too; the YAML key is the same but for `not` and `continue`.


def load_rules(path: Path) -> Rules:
    """Read, parse and validate a rules file; every failure is one RulesError."""
    label = str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RulesError(label, None, None, None, f"cannot read the rules file: {reason}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise RulesError(
            label, line, None, None, f"not UTF-8 text (byte 0x{data[error.start]:02x})"
        ) from None
    return parse_rules(text, label)


def parse_rules(text: str, path: str = "<rules>") -> Rules:
    """Parse and validate rules from text (tests, the CLI); every failure is one RulesError."""
    with _collector_paused():
        try:
            root = yaml.compose(text, Loader=_LOADER)
        except yaml.MarkedYAMLError as error:
            raise _syntax_error(path, text, error) from None
        except yaml.reader.ReaderError as error:  # a character YAML does not allow
            line = text.count("\n", 0, error.position) + 1
            message = f"YAML: unacceptable character #x{error.character:04x}: {error.reason}"
            raise RulesError(path, line, None, None, message) from None
        except yaml.YAMLError as error:
            raise RulesError(path, None, None, None, f"YAML: {error}") from None
        try:
            return _Reader(path).rules(root)
        except RecursionError:
            raise RulesError(path, None, None, None, "nested too deeply") from None


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Composing a 1,000-route file makes some 100,000 small objects, none of them in a cycle
    that outlives the parse; the collections they trigger would each walk every object the
    process holds (measured: 145 ms instead of 42 ms for bench.rules_file.example_rules(1000)).
    The collector is paused for the parse only, and only if it was running."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _syntax_error(path: str, text: str, error: yaml.MarkedYAMLError) -> RulesError:
    mark = error.problem_mark or error.context_mark
    line = None if mark is None else mark.line + 1
    problem = error.problem or error.context or "not valid YAML"
    message = f"YAML: {problem}"
    if error.context and error.problem and error.context_mark is not None:
        message += f" ({error.context} on line {error.context_mark.line + 1})"
    lines = text.split("\n")
    if line is not None and line <= len(lines) and "\t" in lines[line - 1]:
        message += " (indent with spaces: YAML does not allow tabs)"
    return RulesError(path, line, None, None, message)


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {_shown(close[0])}?)" if close else ""


class _Reader:
    """Walks the composed node tree; `fail` raises the one RulesError."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.route: str | None = None

    def fail(self, node: Node | None, field: str | None, message: str) -> RulesError:
        line = None if node is None else _line(node)
        return RulesError(self.path, line, self.route, field, message)

    # -- structure --

    def rules(self, root: Node | None) -> Rules:
        if root is None:
            raise RulesError(
                self.path, None, None, None, "the file is empty (it needs version: 1 and routes:)"
            )
        if not isinstance(root, MappingNode):
            raise self.fail(
                root, None, "the top level must be a mapping with version: 1 and routes:"
            )
        top = self.mapping(root, None, TOP_KEYS)
        if "version" not in top:
            raise self.fail(root, "version", f'missing: write "version: {VERSION}" at the top')
        _, version = top["version"]
        if not (isinstance(version, ScalarNode) and version.value == str(VERSION)):
            shown = _kind(version)
            raise self.fail(
                version,
                "version",
                f"unsupported version {shown}: this service reads version {VERSION}",
            )
        if "routes" not in top:
            raise self.fail(root, "routes", "missing: the file needs a list of routes")
        _, routes = top["routes"]
        if not isinstance(routes, SequenceNode):
            raise self.fail(routes, "routes", "must be a list of routes")
        if not routes.value:
            raise self.fail(routes, "routes", "the list is empty: write at least one route")
        specs: list[RouteSpec] = []
        lines: dict[str, int] = {}
        for index, node in enumerate(routes.value):
            spec = self.route_spec(node, index, lines)
            lines[spec.name] = spec.line
            specs.append(spec)
        return Rules(self.path, tuple(specs))

    def mapping(
        self, node: Node, field: str | None, allowed: tuple[str, ...], *, what: str = ""
    ) -> dict[str, tuple[Node, Node]]:
        """A mapping's entries by key (merges applied), checking for unknown and duplicate keys."""
        if not isinstance(node, MappingNode):
            raise self.fail(node, field, f"must be a mapping{what}")
        entries = self.entries(node, field, set())
        for key, (key_node, _) in entries.items():
            if key not in allowed:
                raise self.fail(key_node, _join(field, key), self.unknown_key(key, field, allowed))
        return entries

    def entries(
        self, node: MappingNode, field: str | None, merging: set[int]
    ) -> dict[str, tuple[Node, Node]]:
        own: dict[str, tuple[Node, Node]] = {}
        merged: dict[str, tuple[Node, Node]] = {}
        for key_node, value in node.value:
            if key_node.tag == _MERGE:
                for source in self.merge_sources(value, field):
                    if id(source) in merging:
                        raise self.fail(key_node, field, "a mapping cannot merge itself")
                    inner = self.entries(source, field, merging | {id(node)})
                    for key, entry in inner.items():
                        merged.setdefault(key, entry)  # the first source listed wins
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag == _NULL:
                raise self.fail(key_node, field, "keys must be plain names")
            if key_node.tag != _STR:
                self.check_tag(key_node, field)
            key = key_node.value
            if key in own:
                first = _line(own[key][0])
                raise self.fail(
                    key_node,
                    _join(field, key),
                    f"duplicate key {_shown(key)} (first on line {first})",
                )
            own[key] = (key_node, value)
        if not merged:
            return own
        return own | {key: entry for key, entry in merged.items() if key not in own}

    def merge_sources(self, value: Node, field: str | None) -> list[MappingNode]:
        if isinstance(value, MappingNode):
            return [value]
        if isinstance(value, SequenceNode) and all(isinstance(v, MappingNode) for v in value.value):
            return list(value.value)
        raise self.fail(value, field, '"<<" merges a mapping or a list of mappings')

    def unknown_key(self, key: str, field: str | None, allowed: tuple[str, ...]) -> str:
        message = f"unknown key {_shown(key)}"
        suggestion = _suggest(key, allowed)
        if suggestion:
            return message + suggestion
        at_route = field is None and self.route is not None
        if at_route and key in CONDITION_KEYS:
            return message + ' (conditions go under "match:")'
        if at_route and _suggest(key, CONDITION_KEYS):
            return message + _suggest(key, CONDITION_KEYS)[:-2] + ' under "match:"?)'
        if field in ("match", "not") and key in ROUTE_KEYS:
            return message + f' (it belongs to the route, beside "{field}:")'
        for section, keys in (("digest", DIGEST_KEYS), ("rate", RATE_KEYS)):
            if key in keys and field != section and (at_route or field in ("digest", "rate")):
                return message + f' (it goes under "{section}:")'
        return message + " (valid keys: " + ", ".join(allowed) + ")"

    def check_tag(self, node: Node, field: str | None) -> None:
        if node.tag not in _SCALAR_TAGS:
            raise self.fail(node, field, f"YAML tag {_shown(node.tag)} is not supported")

    # -- routes --

    def route_spec(self, node: Node, index: int, seen: dict[str, int]) -> RouteSpec:
        self.route = f"#{index + 1}"
        if not isinstance(node, MappingNode):
            raise self.fail(
                node, None, "a route must be a mapping with name:, match: and to: or drop:"
            )
        name_entry = next(
            (
                value
                for key, value in node.value
                if isinstance(key, ScalarNode) and key.value == "name"
            ),
            None,
        )
        if isinstance(name_entry, ScalarNode) and ROUTE_NAME.fullmatch(name_entry.value):
            self.route = name_entry.value
        entries = self.mapping(node, None, ROUTE_KEYS)
        if "name" not in entries:
            raise self.fail(node, "name", "missing: every route needs a name")
        name_node = entries["name"][1]
        name = self.text(name_node, "name")
        if not ROUTE_NAME.fullmatch(name):
            raise self.fail(
                name_node,
                "name",
                f"{_shown(name)} is not a route name: lowercase letters, digits and hyphens, "
                f"starting with a letter or digit{_name_hint(name)}",
            )
        if name in seen:
            raise self.fail(name_node, "name", f"duplicate route name (first on line {seen[name]})")

        match = Conditions()
        exclude: Conditions | None = None
        to: tuple[str, ...] = ()
        drop = continue_ = False
        templates: dict[str, str] = {}
        template_lines: dict[str, int] = {}
        digest: DigestSpec | None = None
        rate: RateSpec | None = None
        for key, (_, value) in entries.items():
            if key == "match":
                match = self.conditions(value, "match")
            elif key == "not":
                exclude = self.conditions(value, "not")
                if not exclude.given():
                    raise self.fail(value, "not", "is empty: it would exclude every event")
            elif key == "to":
                to = self.addresses(value)
            elif key == "drop":
                drop = self.boolean(value, "drop")
            elif key == "continue":
                continue_ = self.boolean(value, "continue")
            elif key == "digest":
                digest = self.digest(value)
            elif key == "rate":
                rate = self.rate(value)
            elif key in TEMPLATE_KEYS:
                if not isinstance(value, ScalarNode) or value.tag == _NULL:
                    raise self.fail(
                        value, key, "must be a string (a template; omit it for today's email)"
                    )
                self.check_tag(value, key)
                templates[key] = value.value
                # A block scalar (`|`, `>`) starts on the line after its indicator.
                template_lines[key] = _line(value) + (1 if value.style in ("|", ">") else 0)

        if drop:
            if "to" in entries:
                raise self.fail(
                    entries["drop"][1],
                    "drop",
                    'a dropped event emails nobody: remove "to" or "drop"',
                )
            if continue_:
                raise self.fail(
                    entries["continue"][1],
                    "continue",
                    "a dropped event emails nobody and stops nothing with continue: true; "
                    'remove "continue" or the route',
                )
            for key in TEMPLATE_KEYS:
                if key in entries:
                    raise self.fail(
                        entries[key][0], key, "a dropped event emails nobody: remove the template"
                    )
            for key in ("digest", "rate"):
                if key in entries:
                    raise self.fail(
                        entries[key][0],
                        key,
                        f'a dropped event emails nobody: remove "{key}" or "drop"',
                    )
        elif "to" not in entries:
            raise self.fail(
                node, "to", 'missing: a route needs "to" (who to email) or "drop: true"'
            )
        if digest is not None and rate is not None:
            raise self.fail(
                entries["rate"][0],
                "rate",
                "a digest route already sends at most one email per window; use one of them",
            )

        return RouteSpec(
            name=name,
            index=index,
            line=_line(node),
            match=match,
            exclude=exclude,
            to=to,
            drop=drop,
            continue_=continue_,
            subject=templates.get("subject"),
            text=templates.get("text"),
            html=templates.get("html"),
            template_lines=template_lines,
            digest=digest,
            rate=rate,
        )

    def digest(self, node: Node) -> DigestSpec:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            raise self.fail(
                node,
                "digest",
                f"must be a mapping{_DIGEST_EXAMPLE} (omit it to send each event alone)",
            )
        entries = self.mapping(node, "digest", DIGEST_KEYS, what=_DIGEST_EXAMPLE)
        if "window" not in entries:
            raise self.fail(node, "digest.window", 'missing: write how long a window is, like "5m"')
        window = self.duration(
            entries["window"][1], "digest.window", DIGEST_WINDOW, "a digest window"
        )
        max_items = 100
        if "max_items" in entries:
            max_items = self.whole(entries["max_items"][1], "digest.max_items", DIGEST_MAX_ITEMS)
        leading = False
        if "leading" in entries:
            leading = self.boolean(entries["leading"][1], "digest.leading")
        return DigestSpec(window_seconds=float(window), max_items=max_items, leading=leading)

    def rate(self, node: Node) -> RateSpec:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            raise self.fail(node, "rate", f"must be a mapping{_RATE_EXAMPLE}")
        entries = self.mapping(node, "rate", RATE_KEYS, what=_RATE_EXAMPLE)
        for key, what in (("max", 'how many emails, like "max: 20"'), ("per", _PER_HELP)):
            if key not in entries:
                raise self.fail(node, f"rate.{key}", f"missing: write {what}")
        limit = self.whole(entries["max"][1], "rate.max", RATE_MAX)
        per = self.duration(entries["per"][1], "rate.per", RATE_PER, "a rate period")
        return RateSpec(max=limit, per_seconds=float(per))

    def conditions(self, node: Node, field: str) -> Conditions:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            raise self.fail(
                node, field, "must be a mapping of conditions (omit it to match every event)"
            )
        entries = self.mapping(node, field, CONDITION_KEYS, what=" of conditions")
        values: dict[str, object] = {}
        for key, (_, value) in entries.items():
            where = f"{field}.{key}"
            if key == "events":
                values[key] = frozenset(
                    self.event(item, where) for item in self.items(value, where)
                )
            elif key in ("bucket", "content_type"):
                values[key] = self.globs(value, where, path=False)
            elif key == "name":
                values[key] = self.globs(value, where, path=True)
            elif key in ("prefix", "suffix"):
                values[key] = tuple(self.text(item, where) for item in self.items(value, where))
            elif key in ("min_size", "max_size"):
                values[key] = self.size(value, where)
            elif key == "metadata":
                values[key] = self.metadata(value, where)
        low, high = values.get("min_size"), values.get("max_size")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            raise self.fail(
                entries["max_size"][1],
                f"{field}.max_size",
                f"{size_text(high)} is less than min_size {size_text(low)}: nothing could match",
            )
        return Conditions(order=tuple(entries), **values)  # type: ignore[arg-type]

    # -- values --

    def items(self, node: Node, field: str) -> list[ScalarNode]:
        """One string or a non-empty list of strings, as scalar nodes."""
        if isinstance(node, ScalarNode):
            return [node]
        if isinstance(node, SequenceNode):
            if not node.value:
                raise self.fail(
                    node, field, "the list is empty (omit the condition to match anything)"
                )
            for item in node.value:
                if not isinstance(item, ScalarNode):
                    raise self.fail(item, field, "must be a string, or a list of strings")
            return list(node.value)
        raise self.fail(node, field, "must be a string, or a list of strings")

    def text(self, node: Node, field: str, *, empty: bool = False) -> str:
        if not isinstance(node, ScalarNode):
            raise self.fail(node, field, "must be a string")
        tag = node.tag
        if tag != _STR:
            if tag == _NULL:
                raise self.fail(node, field, "has no value")
            self.check_tag(node, field)
        if not node.value and not empty:
            raise self.fail(node, field, "must not be empty")
        return str(node.value)

    def globs(self, node: Node, field: str, *, path: bool) -> tuple[str, ...]:
        patterns = []
        for item in self.items(node, field):
            pattern = self.text(item, field)
            try:
                check_glob(pattern, path=path)
            except ValueError as error:
                raise self.fail(item, field, str(error)) from None
            patterns.append(pattern)
        return tuple(patterns)

    def event(self, node: ScalarNode, field: str) -> EventType:
        name = self.text(node, field)
        event = _EVENT_NAMES.get(name)
        if event is None:
            shorts = [member.short for member in EventType]
            raise self.fail(
                node,
                field,
                f"unknown event {_shown(name)}{_suggest(name, shorts)}"
                f" (events: {', '.join(shorts)})",
            )
        return event

    def size(self, node: Node, field: str) -> int:
        if not isinstance(node, ScalarNode) or node.tag in (_NULL, _BOOL):
            raise self.fail(node, field, f"must be a size ({_SIZE_HELP})")
        try:
            return parse_size(node.value)
        except ValueError as error:
            raise self.fail(node, field, str(error)) from None

    def metadata(self, node: Node, field: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(node, MappingNode):
            raise self.fail(node, field, 'must be a mapping of keys to value globs ("*" = present)')
        entries = self.entries(node, field, set())
        if not entries:
            raise self.fail(node, field, "is empty (omit it to match anything)")
        pairs = []
        for key, (_, value) in entries.items():
            if not key:
                raise self.fail(node, field, "a metadata key must not be empty")
            pattern = self.text(value, f"{field}.{key}", empty=True)
            try:
                check_glob(pattern, path=False)
            except ValueError as error:
                raise self.fail(value, f"{field}.{key}", str(error)) from None
            pairs.append((key, pattern))
        return tuple(pairs)

    def addresses(self, node: Node) -> tuple[str, ...]:
        addresses: dict[str, None] = {}  # ordered, each address once
        for item in self.items(node, "to"):
            address = self.text(item, "to")
            try:
                _check_address(address)
            except ValueError as error:
                hint = " (write a list: [a@example.com, b@example.com])" if "," in address else ""
                raise self.fail(item, "to", f"{error}{hint}") from None
            addresses[address] = None
        return tuple(addresses)

    def duration(self, node: Node, field: str, bounds: tuple[int, int], what: str) -> int:
        low, high = bounds
        if not isinstance(node, ScalarNode) or node.tag in (_NULL, _BOOL):
            raise self.fail(
                node, field, f"must be a duration, not {_kind(node)} (write {DURATION_HELP})"
            )
        try:
            seconds = parse_duration(node.value)
        except ValueError as error:
            raise self.fail(node, field, str(error)) from None
        if seconds < low:
            raise self.fail(
                node,
                field,
                f"{_shown(node.value)} is too short: {what} is at least {duration_text(low)}",
            )
        if seconds > high:
            raise self.fail(
                node,
                field,
                f"{_shown(node.value)} is too long: {what} is at most {duration_text(high)}",
            )
        return seconds

    def whole(self, node: Node, field: str, bounds: tuple[int, int]) -> int:
        low, high = bounds
        wanted = f"a whole number from {low} to {high}"
        if (
            not isinstance(node, ScalarNode)
            or node.tag in (_NULL, _BOOL)
            or not _WHOLE.fullmatch(node.value)
        ):
            raise self.fail(node, field, f"must be {wanted}, not {_kind(node)}")
        digits = node.value.replace("_", "")
        if len(digits) > 20 or not low <= int(digits) <= high:
            raise self.fail(node, field, f"{_shown(node.value)} is out of range: write {wanted}")
        return int(digits)

    def boolean(self, node: Node, field: str) -> bool:
        if not isinstance(node, ScalarNode) or node.tag != _BOOL:
            shown = _kind(node)
            raise self.fail(node, field, f"must be true or false, not {shown}")
        return str(node.value).lower() in _TRUE


def _name_hint(name: str) -> str:
    fixed = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f" (did you mean {_shown(fixed)}?)" if ROUTE_NAME.fullmatch(fixed) else ""


def _kind(node: Node) -> str:
    if isinstance(node, ScalarNode):
        return _shown(node.value)
    return "a list" if isinstance(node, SequenceNode) else "a mapping"


def _join(field: str | None, key: str) -> str:
    return key if field is None else f"{field}.{key}"
