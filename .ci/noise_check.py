"""Count conclusive regressions between two runs: ``python .ci/noise_check.py BASE NEW [--slowed NAME]``.

Prints the comparison's summary and the number of conclusive regressions. With
``--slowed NAME`` it also checks that every point of NAME that ran in both runs
is flagged and no other point is, and exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from attnbench.reports.compare import summary_line

from attnbench import reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base")
    parser.add_argument("new")
    parser.add_argument("--slowed", help="the mechanism a plugin made slower")
    parser.add_argument("--fail-above", type=float, default=0.10)
    args = parser.parse_args()
    cmp = reports.compare(reports.load_run(args.base), reports.load_run(args.new), fail_above=args.fail_above)
    t = cmp.table
    flagged = t[t["regression"]]
    print(summary_line(cmp))
    print(f"conclusive regressions: {len(flagged)} of {len(t)} matched points")
    print("verdicts: " + ", ".join(f"{v} {n}" for v, n in t["verdict"].value_counts().items()))
    if not args.slowed:
        return 0
    ran = t[(t["status_base"] == "ok") & (t["status_new"] == "ok")]
    target = ran[ran["mechanism"] == args.slowed]
    missed = target[~target["regression"]]
    extra = flagged[flagged["mechanism"] != args.slowed]
    print(f"{args.slowed}: flagged at {len(target) - len(missed)} of its {len(target)} points; elsewhere: {len(extra)}")
    for _, r in missed.iterrows():
        print(f"  missed: {r['mechanism']} {r['height']}x{r['width']} {r['pass']} {r['impl']}: {r['verdict']}")
    for _, r in extra.iterrows():
        print(f"  extra: {r['mechanism']} {r['height']}x{r['width']} {r['pass']} {r['impl']}: {r['verdict']}")
    return 0 if missed.empty and extra.empty else 1


if __name__ == "__main__":
    sys.exit(main())
