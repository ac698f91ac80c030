"""Durations as people write them ("30s", "5m", "1h", "8d"), read by the rules file and by
settings such as DEDUPE_RETENTION, with one-line reasons when they are wrong."""

from __future__ import annotations

import re

DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# Other ways people write a unit, read only to say which spelling to use instead.
_UNIT_WORDS = {
    **dict.fromkeys(("sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("day", "days"), 86400),
    **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), 7 * 86400),
}
_DURATION = re.compile(r"([-+]?)(\d+(?:_\d+)*)(?:\.(\d+))?\s*([A-Za-z]*)")
DURATION_HELP = 'a whole number and s, m, h or d, like "30s", "5m", "1h", "1d"'


def parse_duration(value: object) -> int:
    """300, "30s", "5m", "1h", "1d" -> whole seconds (0 included: ranges are the caller's);
    ValueError with a one-line reason, saying what to write, otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not a duration: {shown(value)} (write {DURATION_HELP})")
    text = str(value).strip()
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {shown(text)} (write {DURATION_HELP})")
    sign, whole, point, unit = (str(group or "") for group in match.groups())
    digits = whole.replace("_", "") + point  # the number without its decimal point
    if len(digits) > 30:  # int() refuses huge strings with its own error
        raise ValueError(f"{shown(text)} is far too long (write {DURATION_HELP})")
    scale = DURATION_UNITS.get(unit or "s")
    if scale is None:  # "5M", "5 minutes": told what to write below
        scale = DURATION_UNITS.get(unit.lower()) or _UNIT_WORDS.get(unit.lower())
    if scale is None:
        raise ValueError(f"unknown unit {shown(unit)} in {shown(text)} (write {DURATION_HELP})")
    numerator, denominator = int(digits) * scale, int("1" + "0" * len(point))
    if sign == "-" and numerator:
        raise ValueError(f"{shown(text)} is negative (write {DURATION_HELP})")
    if numerator % denominator:
        raise ValueError(f"{shown(text)} is not a whole number of seconds (write {DURATION_HELP})")
    seconds = numerator // denominator
    if point or sign or (unit and unit not in DURATION_UNITS):
        raise ValueError(f"write {shown(duration_text(seconds))} for {shown(text)}")
    return seconds


def duration_text(seconds: int) -> str:
    """Seconds in the largest unit that holds them whole: 300 -> "5m", 90 -> "90s", 0 -> "0s"."""
    for unit, scale in DURATION_UNITS.items():
        if seconds and seconds % scale == 0:
            return f"{seconds // scale}{unit}"
    return f"{seconds}s"


def shown(value: object) -> str:
    """A value quoted for a one-line message; control characters escaped."""
    if isinstance(value, str):
        text = value if value.isprintable() else escaped(value)
        cut = text if len(text) <= 80 else text[:77] + "..."
        return '"' + cut.replace('"', '\\"') + '"'
    return repr(value)


def escaped(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")
