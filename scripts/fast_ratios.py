"""Fast/reference latency ratios of every mechanism, measured interleaved (docs/performance.md).

For each mechanism (the quick preset's knobs: dim 96, 3 heads, float32, one thread), map side and
pass, the reference and the fast module are built with the same seed and timed in alternating
blocks of calls (A B B A ...) by the harness's CPU timer, ``--rounds`` times; each round gives one
ratio fast/reference (its two blocks taken back to back, so a load change hits both). Printed: the
median ratio and the p20..p80 spread of the rounds' ratios, and the machine's load average.
``--versus full`` times each mechanism's fast path against full attention's instead.

    python scripts/fast_ratios.py [--mechanism pooling] [--sizes 16,24,32,48,64] [--rounds 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

from attnbench.bench.samples import quantile


def _block(step: Any, zero: Any, number: int) -> float:
    """Seconds per call of one block, by the harness's CPU timer."""
    from attnbench.bench.measure import block_seconds

    return block_seconds(step, zero, number) / number


def ratio(a: Any, b: Any, rounds: int, block_s: float) -> dict[str, float]:
    """b's time over a's, per round of two back-to-back blocks (order alternating)."""
    for w in (a, b):
        for _ in range(2):
            w.zero_grads()
            w.step()
    per = [max(_block(w.step, w.zero_grads, 1), 1e-6) for w in (a, b)]
    numbers = [max(1, int(block_s / p)) for p in per]
    ratios, times_a, times_b = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            ta = _block(a.step, a.zero_grads, numbers[0])
            tb = _block(b.step, b.zero_grads, numbers[1])
        else:
            tb = _block(b.step, b.zero_grads, numbers[1])
            ta = _block(a.step, a.zero_grads, numbers[0])
        ratios.append(tb / ta)
        times_a.append(ta)
        times_b.append(tb)
    return {
        "ratio": statistics.median(ratios),
        "p20": quantile(ratios, 0.2),
        "p80": quantile(ratios, 0.8),
        "a_ms": statistics.median(times_a) * 1e3,
        "b_ms": statistics.median(times_b) * 1e3,
    }


def main() -> None:
    import torch
    from attnbench.bench.measure import build_workload
    from attnbench.bench.points import expand
    from attnbench.bench.sweep import resolve_request

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mechanism", action="append")
    ap.add_argument("--sizes", default="16,24,32,48,64")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--block-s", type=float, default=0.01)
    ap.add_argument("--versus", help="compare each mechanism's fast path with this mechanism's fast path")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    impls = ["fast"] if args.versus else ["reference", "fast"]
    axes = {"resolutions": args.sizes.split(","), "impls": impls, "passes": args.passes.split(",")}
    if args.mechanism:
        axes["mechanisms"] = list(args.mechanism) + ([args.versus] if args.versus else [])
    grid, _ = resolve_request(preset="quick", axes=axes)
    points = [p for p in expand(grid).points if not p.cross or p.mechanism == "cross"]
    by_key: dict[tuple, Any] = {(p.mechanism, p.hw, p.pass_, p.impl): p for p in points}
    rows = []
    print(f"load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}  (1 and 5 min)", flush=True)
    for (mech, hw, pass_, impl), point in by_key.items():
        if args.versus:
            if mech == args.versus:
                continue
            other = by_key[(args.versus, hw, pass_, "fast")]
            a, b = build_workload(other), build_workload(point)
        else:
            if impl != "fast" or (mech, hw, pass_, "reference") not in by_key:
                continue
            a, b = build_workload(by_key[(mech, hw, pass_, "reference")]), build_workload(point)
        r = ratio(a, b, args.rounds, args.block_s)
        row = {"mechanism": mech, "hw": f"{hw[0]}x{hw[1]}", "pass": pass_, **r, "load": os.getloadavg()[0]}
        rows.append(row)
        print(
            f"{mech:10s} {row['hw']:6s} {pass_:8s} ratio {r['ratio']:.3f} [{r['p20']:.3f}..{r['p80']:.3f}] "
            f"{r['a_ms']:.3f} -> {r['b_ms']:.3f} ms  load {row['load']:.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
