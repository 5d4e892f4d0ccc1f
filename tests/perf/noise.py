"""Run-to-run noise of the perf cases, to choose nox -s bench's failure threshold from measurement.

    pytest tests/perf --benchmark-only --benchmark-json=/tmp/run1.json     # three times, code unchanged
    python tests/perf/noise.py .benchmarks/<machine>/*/0001_*.json /tmp/run1.json /tmp/run2.json /tmp/run3.json

The first file is the baseline. For each other run it prints how much the statistic (median by default,
``--stat min`` etc.) of every case changed against the baseline: the largest increase, the 95th percentile,
the median change and the three worst cases; then the largest change between any two of the files. A
threshold above the largest increase of unchanged code does not fail on noise.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path


def load(path: str, stat: str) -> dict[str, float]:
    data = json.loads(Path(path).read_text())
    return {b["fullname"]: float(b["stats"][stat]) for b in data["benchmarks"]}


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--stat", default="median", help="the pytest-benchmark statistic (median, min, mean)")
    args = parser.parse_args()
    files = [args.baseline, *args.runs]
    values = [load(f, args.stat) for f in files]
    common = sorted(set.intersection(*(set(v) for v in values)))
    if not common:
        raise SystemExit("error: the files share no benchmark; were they taken from the same tests?")
    print(f"{len(common)} cases, change of the {args.stat} against {Path(args.baseline).name}:")
    for path, run in zip(args.runs, values[1:], strict=True):
        change = {name: 100.0 * (run[name] / values[0][name] - 1.0) for name in common}
        ordered = sorted(change.values())
        worst = sorted(change.items(), key=lambda kv: -kv[1])[:3]
        print(
            f"  {Path(path).name}: largest increase {ordered[-1]:+.1f}%, p95 {percentile(ordered, 0.95):+.1f}%, "
            f"median {ordered[len(ordered) // 2]:+.1f}%, largest decrease {ordered[0]:+.1f}%"
        )
        for name, pct in worst:
            print(f"      {pct:+.1f}%  {name}")
    pairs = [
        max(abs(values[j][n] / values[i][n] - 1.0) * 100.0 for n in common)
        for i, j in itertools.combinations(range(len(files)), 2)
    ]
    print(f"largest change between any two files: {max(pairs):.1f}%")


if __name__ == "__main__":
    main()
