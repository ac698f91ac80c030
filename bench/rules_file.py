"""Rules files for the benchmark (issue 10, items 6 and 7), and the in-process timings of them.

`example_rules(n)` writes n routes with distinct prefixes. The benchmark's events (bench/events.lua:
"reports/<id>/day-<n>.csv", finalized) match only the last route, so a matcher that scanned every
route would pay for all n of them on every event; the indexed matcher looks up one prefix.

`python -m bench.rules_file [N]` prints the time to parse and validate an N-route file and the
cost of `Matcher.select` per event with 1 route and with N routes.
"""

from __future__ import annotations

import functools
import sys
import time
import timeit
from collections.abc import Sequence

from app.events.models import EventType, StorageEvent, StorageObjectData
from app.rules.match import Matcher
from app.rules.model import parse_rules

_FILLER = """\
  - name: team-{i:04d}
    match:
      events: [finalized, deleted]
      prefix: "team-{i:04d}/"
      name: "team-{i:04d}/**/*.{ext}"
      min_size: 1KiB
      metadata: {{owner: "team-{i:04d}", reviewed: "*"}}
    not: {{suffix: [".tmp", ".part"]}}
    to: [team-{i:04d}@example.com, ops@example.com]
    continue: {cont}
"""

_PLAIN = """\
  - name: team-{i:04d}
    match: {{prefix: "team-{i:04d}/", suffix: .csv}}
    to: [team-{i:04d}@example.com]
"""

_MATCHING = """\
  - name: reports
    match:
      events: [finalized]
      prefix: "reports/"
      suffix: ".csv"
    not: {{suffix: ".tmp"}}
    to: [{to}]
{digest}"""


def example_rules(
    n: int,
    to: Sequence[str] = ("ops@example.com",),
    *,
    rich: bool = True,
    digest_window: str | None = None,
) -> str:
    """A rules file of n routes: n - 1 routes for prefixes "team-0000/"... and, last, the route
    that the benchmark's events match ("reports/" ... ".csv", emailing `to`).

    rich: the filler routes use most of the format (events, prefix, a name glob, a size,
    metadata, a `not` list, two addresses, some `continue`: 10 lines, ~300 bytes each); else
    three lines each (prefix, suffix, one address: ~100 bytes). Loading costs in proportion to
    the YAML nodes, so the rich file is the slower one to load; matching costs the same.

    digest_window: the matching route gathers its events in a digest window of this length
    (issue 11: "1h", so that no window closes during a run) instead of emailing each one."""
    if n < 1:
        raise ValueError("a rules file needs at least one route")
    filler = (
        _FILLER.format(i=i, ext=("csv", "json", "parquet")[i % 3], cont=str(i % 7 == 0).lower())
        if rich
        else _PLAIN.format(i=i)
        for i in range(n - 1)
    )
    digest = f"    digest: {{window: {digest_window}}}\n" if digest_window else ""
    matching = _MATCHING.format(to=", ".join(to), digest=digest)
    return "version: 1\nroutes:\n" + "".join(filler) + matching


def benchmark_event(number: int = 1) -> StorageEvent:
    """An event shaped like bench/events.lua's."""
    name = f"reports/{number}/day-{number}.csv"
    data = {"bucket": "bench-bucket", "name": name, "size": "352", "contentType": "text/csv"}
    return StorageEvent(
        id=str(number),
        source="//storage.googleapis.com/projects/_/buckets/bench-bucket",
        type=EventType.FINALIZED,
        data=StorageObjectData.model_validate(data),
    )


def load_ms(n: int, repeat: int = 5, *, rich: bool = True) -> float:
    """Median milliseconds to parse and validate an n-route file and build its matcher (in a
    warm process; a fresh process, as at start-up, takes about the same)."""
    text = example_rules(n, rich=rich)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        Matcher(parse_rules(text).routes)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def select_us(n: int, number: int = 20_000) -> float:
    """Best-of-5 microseconds per `Matcher.select` with an n-route file."""
    matcher = Matcher(parse_rules(example_rules(n)).routes)
    event = benchmark_event()
    assert [route.name for route in matcher.select(event)] == ["reports"]
    best = min(timeit.repeat(lambda: matcher.select(event), number=number, repeat=5))
    return best / number * 1e6


def worst_glob_us(repeat: int = 5) -> tuple[float, str]:
    """Issue 19: the slowest match of any glob of an adversarial corpus (globs whose backtracking
    regex took seconds) against any hostile value (1,024-byte names, 8 KiB metadata values),
    in microseconds (each pair's best of `repeat`), and which pair it was."""
    from app.rules.match import glob_regex
    from tests.security.test_hostile_globs import NAMES, PATH_GLOBS, PLAIN_GLOBS, VALUES

    pairs = [(p, v, True) for p in PATH_GLOBS for v in NAMES]
    pairs += [(p, v, False) for p in PLAIN_GLOBS for v in VALUES]
    worst, which = 0.0, ""
    for pattern, value, path in pairs:
        match = functools.partial(glob_regex(pattern, path=path).match, value)
        best = min(timeit.repeat(match, number=1, repeat=repeat))
        if best > worst:
            worst, which = best, f"{pattern!r} against {len(value):,} characters"
    return worst * 1e6, which


def main(argv: Sequence[str]) -> None:
    n = int(argv[0]) if argv else 1000
    print(f"parse + validate + index {n} rich routes:  {load_ms(n):.1f} ms")
    print(f"parse + validate + index {n} plain routes: {load_ms(n, rich=False):.1f} ms")
    print(f"select, 1 route:     {select_us(1):.2f} us/event")
    print(f"select, {n} routes: {select_us(n):.2f} us/event")
    worst, which = worst_glob_us()
    print(f"slowest glob match of the hostile corpus: {worst:.1f} us ({which})")


if __name__ == "__main__":
    main(sys.argv[1:])
