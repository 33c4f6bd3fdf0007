"""`python -m benchmarks.timeline PATH`: where a batch waits, from the `timeline=PATH` probe.

The probe (`python -m benchmarks.run --phases latency --launcher --experiments
uvloop,timeline=PATH`, benchmarks/serve.py) writes a line per stage boundary (`claim+`,
`claim-`, ...) with its monotonic time, and per record an `age` line: how old the record
was (from its Kafka timestamp) when the dispatcher got it, and whether FastStream's poll
took it (`taken`) or the consumer's catch-up poll (`caught-up`).

This prints, over the batches (the first few skipped: start-up), for each mark its median
offset from the batch's start (first and last occurrence in a batch), each stage's median
and p90 duration, the gap between batches, and the records' ages.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Summary:
    batches: int
    first: dict[str, float]  # mark → median offset of its first occurrence, ms
    last: dict[str, float]  # mark → median offset of its last occurrence, ms
    duration: dict[str, tuple[float, float]]  # stage → (p50, p90) ms
    gap_ms: float  # median time between a batch's end and the next one's start
    ages: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    """"all", "taken", "caught-up" → (records, p50 ms, p90 ms)."""


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.9 * (len(ordered) - 1))]


def summarise(lines: list[str], skip: int = 5) -> Summary:
    batches: list[list[tuple[float, str]]] = []
    starts: list[float] = []
    ends: list[float] = []
    ages: dict[str, list[float]] = defaultdict(list)
    current: list[tuple[float, str]] | None = None
    start = 0.0
    for line in lines:
        parts = line.split()
        if len(parts) < 2:
            continue
        at, what = float(parts[0]), parts[1]
        if what == "age":
            if len(batches) >= skip:
                ages[parts[3]].append(float(parts[2]))
            continue
        if what == "handle+":
            current, start = [], at
            starts.append(at)
            continue
        if current is None:
            continue
        current.append((at - start, what))
        if what == "handle-":
            batches.append(current)
            ends.append(at)
            current = None
    kept = batches[skip:]
    first: dict[str, list[float]] = defaultdict(list)
    last: dict[str, list[float]] = defaultdict(list)
    durations: dict[str, list[float]] = defaultdict(list)
    for marks in kept:
        seen_first: dict[str, float] = {}
        seen_last: dict[str, float] = {}
        open_: dict[str, list[float]] = defaultdict(list)
        for offset, what in marks:
            seen_first.setdefault(what, offset)
            seen_last[what] = offset
            stage, edge = what[:-1], what[-1]
            if edge == "+":
                open_[stage].append(offset)
            elif edge == "-" and open_[stage]:
                durations[stage].append(offset - open_[stage].pop(0))
        for what, offset in seen_first.items():
            first[what].append(offset)
        for what, offset in seen_last.items():
            last[what].append(offset)
    gaps = [starts[i + 1] - ends[i] for i in range(skip, min(len(ends), len(starts) - 1))]
    summary = Summary(
        batches=len(kept),
        first={w: 1000 * statistics.median(v) for w, v in first.items()},
        last={w: 1000 * statistics.median(v) for w, v in last.items()},
        duration={s: (1000 * statistics.median(v), 1000 * _p90(v)) for s, v in durations.items()},
        gap_ms=1000 * statistics.median(gaps) if gaps else 0.0,
    )
    everything = [a for values in ages.values() for a in values]
    for name, values in (("all", everything), *sorted(ages.items())):
        if values:
            summary.ages[name] = (len(values), statistics.median(values), _p90(values))
    return summary


def report(summary: Summary) -> str:
    out = [
        f"{summary.batches} batches; {summary.gap_ms:.2f} ms between batches (median)",
        f"{'mark':20} {'first':>8} {'last':>8} {'p50':>8} {'p90':>8}  (ms from the batch's start;"
        " p50/p90: the stage's duration)",
    ]
    for what in sorted(summary.first, key=lambda w: summary.first[w]):
        line = f"{what:20} {summary.first[what]:8.2f} {summary.last[what]:8.2f}"
        if what.endswith("+") and what[:-1] in summary.duration:
            p50, p90 = summary.duration[what[:-1]]
            line += f" {p50:8.2f} {p90:8.2f}"
        out.append(line)
    for name, (count, p50, p90) in summary.ages.items():
        out.append(f"record age ({name}): p50 {p50:.1f} ms, p90 {p90:.1f} ms, {count} records")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--skip", type=int, default=5, help="first batches left out")
    args = parser.parse_args()
    print(report(summarise(args.path.read_text().splitlines(), args.skip)))


if __name__ == "__main__":
    main()
