"""Numbers derived from stored results: scaling exponents, crossovers, the summary table.

Everything here is computed from the raw stored numbers at report time; nothing
derived is ever stored.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from attnbench.reports.data import MIB, SIDE_AXES, plain

from attnbench.errors import AttnbenchError

DEFAULT_BASELINE = "full"
# The baseline's implementation unless ``--baseline NAME:IMPL`` names another.
DEFAULT_IMPL = "fast"
# A fit (exponent, crossover) needs this many points, and a log-log exponent this R^2, to be shown as a number.
MIN_FIT_POINTS = 3
MIN_R2 = 0.9
# Label of each metric with its unit; FLOPs are always 2 x stored MACs.
METRICS = {
    "latency_ms_median": "latency (ms, median)",
    "peak_bytes": "peak memory (MiB)",
    "flops": "forward GFLOPs (= 2 x MACs)",
}
METRIC_SCALE = {"latency_ms_median": 1.0, "peak_bytes": 1.0 / MIB, "flops": 1e-9}


class BaselineError(AttnbenchError, ValueError):
    """``--baseline`` names a mechanism or implementation that is not in the runs."""


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The declared baseline: one mechanism and one implementation, never picked by latency."""

    name: str = DEFAULT_BASELINE
    impl: str = DEFAULT_IMPL
    # Why this implementation, when it was not asked for by name (e.g. the runs hold no fast one).
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} [{self.impl}]"

    def mask(self, df: pd.DataFrame) -> pd.Series:
        return (df["mechanism"] == self.name) & (df["impl"] == self.impl)


def parse_baseline(text: str) -> tuple[str, str | None]:
    """``"full"`` -> ("full", None), ``"full:reference"`` -> ("full", "reference")."""
    name, _, impl = str(text).strip().partition(":")
    if not name.strip() or (_ and not impl.strip()):
        raise BaselineError(f"--baseline takes NAME or NAME:IMPL (e.g. full or full:fast), not {text!r}")
    return name.strip(), (impl.strip() or None)


def resolve_baseline(df: pd.DataFrame, spec: str | Baseline | None = None, strict: bool = False) -> Baseline:
    """The baseline of ``df`` for ``spec`` (``NAME[:IMPL]``, default ``full``).

    Without an impl it is ``fast``; where the baseline mechanism never ran ``fast``, its only
    implementation, or else the first by name (a fixed rule, never the faster one). ``strict``
    (an explicit ``--baseline``) refuses a mechanism or impl the runs do not hold, with
    :class:`BaselineError` naming those they do; otherwise such a baseline matches no point and the
    report says there is no ratio.
    """
    impl: str | None
    if isinstance(spec, Baseline):
        name, impl = spec.name, spec.impl
    else:
        name, impl = parse_baseline(spec or DEFAULT_BASELINE)
    mechs = sorted(str(m) for m in df["mechanism"].unique()) if "mechanism" in df.columns else []
    if name not in mechs:
        if strict:
            have = ", ".join(mechs) if mechs else "none"
            raise BaselineError(f"no {name!r} points in these runs; --baseline takes one of their mechanisms: {have}")
        return Baseline(name, impl or DEFAULT_IMPL)
    impls = sorted(str(i) for i in df.loc[df["mechanism"] == name, "impl"].unique())
    if impl is not None:
        if impl not in impls and strict:
            raise BaselineError(f"{name} never ran impl {impl!r} in these runs; its impls: {', '.join(impls)}")
        return Baseline(name, impl)
    if DEFAULT_IMPL in impls:
        return Baseline(name, DEFAULT_IMPL)
    return Baseline(name, impls[0], note=f"{name} has no {DEFAULT_IMPL} points here, so its impl {impls[0]} is used")


def as_baseline(baseline: str | Baseline, df: pd.DataFrame) -> Baseline:
    return baseline if isinstance(baseline, Baseline) else resolve_baseline(df, baseline)


@dataclasses.dataclass(frozen=True)
class Fit:
    """A log-log fit y ~ x**exponent over ``n`` points; ``excluded`` points were left out (per-call overhead)."""

    exponent: float | None
    r2: float | None
    n: int
    excluded: int = 0

    @property
    def status(self) -> str:
        if self.exponent is None or self.n < MIN_FIT_POINTS:
            return "few"
        if self.r2 is not None and self.r2 < MIN_R2:
            return "poor"
        return "ok"

    @property
    def value(self) -> float | None:
        """The exponent where the data carry it, else None."""
        return self.exponent if self.status == "ok" else None

    def text(self) -> str:
        if self.status == "few":
            return f"n/a ({self.n} pt{'s' if self.n != 1 else ''})"
        if self.status == "poor":
            return f"poor fit (R\u00b2 {self.r2:.2f})"
        return f"{self.exponent:.2f}"


def fit(x: Sequence[float], y: Sequence[float], exclude: Sequence[bool] | None = None) -> Fit:
    """Least-squares log-log fit over the positive, finite points not in ``exclude``."""
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & (ys > 0)
    dropped = 0
    if exclude is not None:
        ex = np.asarray(exclude, dtype=bool)
        dropped = int((keep & ex).sum())
        keep &= ~ex
    lx, ly = np.log(xs[keep]), np.log(ys[keep])
    n = int(np.unique(lx).size)
    if n < 2:
        return Fit(None, None, n, dropped)
    slope, icpt = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + icpt)
    total = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    return Fit(float(slope), r2, n, dropped)


def fit_exponent(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): y ~ x**slope. None with fewer than two distinct x."""
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & (ys > 0)
    xs, ys = np.log(xs[keep]), np.log(ys[keep])
    if np.unique(xs).size < 2:
        return None
    slope, _ = np.polyfit(xs, ys, 1)
    return float(slope)


@dataclasses.dataclass(frozen=True)
class Crossover:
    """Where a mechanism's metric drops below the baseline's, along tokens.

    ``kind`` is "always" (below at every matched point), "never" (never below in
    range), "from" (below from ``tokens`` on, with ``first_point`` the first
    measured point that is), "mixed" (below from ``tokens`` on, but also below
    at some smaller point before rising above again) or "until" (below at
    smaller sizes only, above again from ``tokens``; ``first_point`` is the
    first measured point above). ``tokens`` is interpolated log-log between the
    two measured points that bracket the crossing.
    """

    kind: str
    tokens: float | None = None
    first_point: float | None = None
    range: tuple[float, float] | None = None
    n: int = 0

    def describe(self) -> str:
        if self.kind == "none":
            return "no matched points"
        if self.kind == "few":
            return f"too few points to tell ({self.n} above the per-call overhead; {MIN_FIT_POINTS} needed)"
        lo, hi = self.range or (math.nan, math.nan)
        span = f"{square(lo)} to {square(hi)}"
        if self.kind == "never":
            return f"never in range ({span})"
        if self.kind == "always":
            return f"always in range ({span})"
        assert self.tokens is not None and self.first_point is not None
        where = f"~{square(self.tokens)} ({self.tokens:,.0f} tokens)"
        if self.kind == "until":
            return f"only below {where}; not from {square(self.first_point)} on"
        text = f"from {where}; first measured {square(self.first_point)}"
        return text + (" (also below at a smaller size)" if self.kind == "mixed" else "")


def square(tokens: float) -> str:
    """Tokens as the equivalent square map, e.g. 3136 -> '56x56', 3000 -> '54.8x54.8'."""
    if tokens is None or not math.isfinite(tokens):
        return "-"
    s = math.sqrt(tokens)
    side = f"{s:.0f}" if abs(s - round(s)) < 0.05 else f"{s:.1f}"
    return f"{side}x{side}"


def crossover(tokens: Sequence[float], ratio: Sequence[float], min_points: int = 1) -> Crossover:
    """Crossover of ``ratio`` = mechanism / baseline through 1 as tokens grow.

    ``ratio < 1`` means the mechanism is below (faster, smaller) the baseline.
    The crossing is interpolated linearly in log(ratio) against log(tokens), so
    a power-law ratio gives the exact crossing.
    """
    t = np.asarray(tokens, dtype=float)
    r = np.asarray(ratio, dtype=float)
    keep = np.isfinite(t) & np.isfinite(r) & (t > 0) & (r > 0)
    t, r = t[keep], r[keep]
    if t.size == 0 and min_points <= 1:
        return Crossover("none")
    if t.size < min_points:
        return Crossover("few", range=(float(t.min()), float(t.max())) if t.size else None, n=int(t.size))
    order = np.argsort(t)
    t, r = t[order], r[order]
    span = (float(t[0]), float(t[-1]))
    below = r < 1.0
    if below.all():
        return Crossover("always", range=span)
    if not below.any():
        return Crossover("never", range=span)
    last_above = int(np.nonzero(~below)[0][-1])
    if last_above == t.size - 1:
        # Above again at the largest point: below only up to the last crossing back above.
        i = max(j for j in range(1, t.size) if not below[j] and below[j - 1])
        return Crossover("until", _interp(t, r, i), float(t[i]), span)
    i = last_above + 1
    kind = "from" if below[: last_above + 1].sum() == 0 else "mixed"
    return Crossover(kind, _interp(t, r, i), float(t[i]), span)


def _interp(t: np.ndarray, r: np.ndarray, i: int) -> float:
    """Tokens where log(r) crosses 0 between points i-1 and i (which lie on either side of 1)."""
    x0, x1 = math.log(t[i - 1]), math.log(t[i])
    y0, y1 = math.log(r[i - 1]), math.log(r[i])
    if y0 == y1:
        return float(t[i])
    return float(math.exp(x0 + (0.0 - y0) * (x1 - x0) / (y1 - y0)))


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference context: side axes fixed to their most common values, and one resolution."""

    side: dict[str, Any]
    height: float | None
    width: float | None
    tokens: float | None
    # Mechanisms with no point in ``side`` (e.g. one that only runs cross attention) keep their own.
    own: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def side_for(self, mechanism: str) -> dict[str, Any]:
        return self.own.get(mechanism, self.side)

    def describe(self) -> str:
        parts = [f"{k} {plain(v)}" for k, v in self.side.items()]
        res = f"{self.height:.0f}x{self.width:.0f} ({self.tokens:.0f} tokens)" if self.tokens else "-"
        text = f"{res}, " + ", ".join(parts)
        for mech, side in self.own.items():
            diff = ", ".join(f"{k} {plain(v)}" for k, v in side.items() if self.side.get(k) != v)
            text += f" ({mech}: {diff})"
        return text


def reference(df: pd.DataFrame, baseline: str | Baseline = DEFAULT_BASELINE) -> Reference:
    """Pick the reference point of a run.

    Side axes (batch, dtype, ...) take their most common combination among the
    measured points; the resolution is the largest one at which the baseline
    ran, or, without a baseline, the largest at which the most series ran.
    """
    ok = df[df["status"] == "ok"]
    pool = ok if not ok.empty else df
    if pool.empty:
        return Reference({}, None, None, None)
    side = _most_common(pool)
    own = {str(m): _most_common(g) for m, g in pool.groupby("mechanism") if not _mask(g, side, ()).any()}
    ctx = in_side(ok, side).dropna(subset=["tokens", "height", "width"])
    if ctx.empty:
        return Reference(side, None, None, None, own)
    base = ctx[as_baseline(baseline, df).mask(ctx)]
    if not base.empty:
        # Prefer the largest resolution at which the baseline ran in every pass, so every row has a speed-up.
        n_pass = ctx["pass"].nunique()
        full_cover = base.groupby(["tokens", "height", "width"])["pass"].nunique()
        full_cover = full_cover[full_cover == n_pass]
        if not full_cover.empty:
            base = base.set_index(["tokens", "height", "width"]).loc[full_cover.index].reset_index()
        row = base.sort_values(["tokens", "height"]).iloc[-1]
    else:
        counts = ctx.groupby(["tokens", "height", "width"])["series"].nunique().reset_index()
        counts = counts.sort_values(["series", "tokens"])
        row = counts.iloc[-1]
    return Reference(side, float(row["height"]), float(row["width"]), float(row["tokens"]), own)


def _most_common(df: pd.DataFrame) -> dict[str, Any]:
    combo = df.groupby(SIDE_AXES, dropna=False).size().sort_values(ascending=False).index[0]
    return dict(zip(SIDE_AXES, combo, strict=True))


class References(dict):
    """The reference of each run (run name -> :class:`Reference`): runs from different machines or
    dtypes each keep their own context, so none of them drops out of a combined report."""

    def describe(self) -> str:
        if len(self) == 1:
            return next(iter(self.values())).describe()
        return "; ".join(f"{run}: {ref.describe()}" for run, ref in self.items())

    @property
    def any_point(self) -> bool:
        return any(ref.tokens is not None for ref in self.values())


def references(df: pd.DataFrame, baseline: str | Baseline = DEFAULT_BASELINE) -> References:
    """:func:`reference` of every run in ``df``."""
    base = as_baseline(baseline, df)
    return References({str(run): reference(g, base) for run, g in df.groupby("run", sort=False)})


def _mask(df: pd.DataFrame, side: dict[str, Any], skip: Sequence[str]) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for k, v in side.items():
        if k not in skip:
            # A missing value (an old record without the field) matches the missing value.
            mask &= (df[k] == v) | (df[k].isna() & pd.isna(v)) if not isinstance(v, (list, dict)) else False
    return mask


def in_side(df: pd.DataFrame, side: dict[str, Any] | Reference | References, skip: Sequence[str] = ()) -> pd.DataFrame:
    """Rows whose side axes equal ``side`` (except the axes in ``skip``); with :class:`References`,
    each run's rows are held to that run's reference."""
    if isinstance(side, References):
        mask = pd.Series(False, index=df.index)
        for run, ref in side.items():
            mask |= (df["run"] == run) & _ref_mask(df, ref, skip)
        return df[mask]
    if isinstance(side, Reference):
        return df[_ref_mask(df, side, skip)]
    return df[_mask(df, side, skip)]


def _ref_mask(df: pd.DataFrame, ref: Reference, skip: Sequence[str]) -> pd.Series:
    mask = _mask(df, ref.side, skip) & ~df["mechanism"].isin(list(ref.own))
    for mech, side in ref.own.items():
        mask |= (df["mechanism"] == mech) & _mask(df, side, skip)
    return mask


def at_reference(df: pd.DataFrame, refs: References) -> pd.DataFrame:
    """Rows at each run's reference point (side axes and resolution)."""
    mask = pd.Series(False, index=df.index)
    for run, ref in refs.items():
        if ref.tokens is not None:
            here = (df["height"] == ref.height) & (df["width"] == ref.width)
            mask |= (df["run"] == run) & _ref_mask(df, ref, ()) & here
    return df[mask]


def pass_macs(df: pd.DataFrame) -> pd.Series:
    """The MACs of the timed pass: forward, plus backward for fwd+bwd (measured where counted, else 2 x forward)."""
    backward = df["backward_macs"].fillna(2 * df["macs"])
    return df["macs"] + backward.where(df["pass"] == "fwd+bwd", 0.0)


def with_baseline(df: pd.DataFrame, baseline: str | Baseline = DEFAULT_BASELINE) -> pd.DataFrame:
    """Each row joined with the declared baseline's row (mechanism and impl) of the same run and context.

    Adds ``base_latency_ms``, ``base_peak_bytes``, ``base_status`` (the baseline's status there, e.g.
    "oom", or "missing"), ``base_overhead_bound``, ``speedup`` (baseline / mechanism latency),
    ``mem_ratio`` (baseline / mechanism peak memory: above 1 is smaller), ``promised`` (baseline MACs /
    mechanism MACs of the timed pass: the speed-up its FLOPs promise) and ``realised`` (speedup / promised,
    where a saving is promised).
    """
    from attnbench.reports.data import CONTEXT_FIELDS

    base = as_baseline(baseline, df)
    keys = ["run"] + CONTEXT_FIELDS
    df = df.assign(pass_macs=pass_macs(df))
    base_all = df[base.mask(df)]
    base_ok = base_all[base_all["status"] == "ok"].drop_duplicates(keys, keep="last")
    cols = {
        "latency_ms_median": "base_latency_ms",
        "peak_bytes": "base_peak_bytes",
        "pass_macs": "base_pass_macs",
        "overhead_bound": "base_overhead_bound",
    }
    ok = base_ok[keys + list(cols)].rename(columns=cols)
    failed = base_all[base_all["status"] != "ok"].drop_duplicates(keys)[keys + ["status"]]
    failed = failed.rename(columns={"status": "base_failed"})
    failed = failed.merge(ok[keys], on=keys, how="left", indicator=True)
    failed = failed[failed["_merge"] == "left_only"].drop(columns=["_merge"])
    out = df.merge(ok, on=keys, how="left").merge(failed, on=keys, how="left")
    matched = out["base_latency_ms"].notna() | out["base_peak_bytes"].notna()
    out["base_status"] = np.where(matched, "ok", out["base_failed"].fillna("missing").astype(str))
    out["base_overhead_bound"] = out["base_overhead_bound"].astype(object).fillna(False).astype(bool)
    ok_rows = out["status"] == "ok"
    out["speedup"] = (out["base_latency_ms"] / out["latency_ms_median"]).where(ok_rows)
    out["mem_ratio"] = (out["base_peak_bytes"] / out["peak_bytes"]).where(ok_rows & (out["peak_bytes"] > 0))
    out["promised"] = (out["base_pass_macs"] / out["pass_macs"]).where(out["pass_macs"] > 0)
    out["realised"] = (out["speedup"] / out["promised"]).where(out["promised"] > 1.0)
    return out.drop(columns=["base_failed"])


def crossovers(
    df: pd.DataFrame, side: dict[str, Any] | References, baseline: str | Baseline = DEFAULT_BASELINE
) -> pd.DataFrame:
    """Per series and pass, where it becomes faster and smaller than the baseline (in the reference context).

    Latency crossovers use only points where neither side is overhead-bound; a crossover over fewer
    than :data:`MIN_FIT_POINTS` points is "few", not a number.
    """
    base = as_baseline(baseline, df)
    ctx = with_baseline(in_side(df, side), base)
    ctx = ctx[~base.mask(ctx) & (ctx["status"] == "ok")]
    rows = []
    for (series, pass_), g in ctx.groupby(["series", "pass"], sort=True):
        matched = g[g["base_status"] == "ok"]
        timed = matched[~(matched["overhead_bound"] | matched["base_overhead_bound"])]
        lat = crossover(timed["tokens"], 1.0 / timed["speedup"], MIN_FIT_POINTS) if len(matched) else Crossover("none")
        mem = crossover(matched["tokens"], 1.0 / matched["mem_ratio"], MIN_FIT_POINTS)
        beyond = g[g["base_status"].isin(["oom", "timeout"])]
        note = ""
        if not beyond.empty:
            statuses = "/".join(sorted(beyond["base_status"].unique()))
            note = f"{base.label} hit {statuses} from {square(beyond['tokens'].min())}, where this one ran"
        if len(timed) < len(matched):
            note = "; ".join(x for x in (note, f"{len(matched) - len(timed)} overhead-bound point(s) left out") if x)
        rows.append(
            {
                "series": series,
                "mechanism": g["mechanism"].iloc[0],
                "impl": g["impl"].iloc[0],
                "pass": pass_,
                "faster_than_baseline": lat.describe(),
                "smaller_than_baseline": mem.describe(),
                "faster_tokens": lat.tokens,
                "smaller_tokens": mem.tokens,
                "faster_kind": lat.kind,
                "smaller_kind": mem.kind,
                "faster_range": lat.range,
                "smaller_range": mem.range,
                "note": note,
            }
        )
    return pd.DataFrame(rows)


def exponents(df: pd.DataFrame, metric: str, x: str = "tokens") -> dict[tuple[str, str], Fit]:
    """The fit of ``metric`` against ``x`` per (series, pass) over ok rows of ``df``; latency fits leave
    overhead-bound points out."""
    ok = df[df["status"] == "ok"]
    out = {}
    for (s, p), g in ok.groupby(["series", "pass"]):
        exclude = g["overhead_bound"] if metric == "latency_ms_median" else None
        out[(str(s), str(p))] = fit(g[x], g[metric], exclude)
    return out


FLOPS_NOTE = (
    "FLOPs = 2 x the stored multiply-adds (MACs) of one forward pass. Achieved TFLOP/s comes from bench.store: a "
    "fwd+bwd point counts forward plus backward MACs (the measured backward count where the counter gave one, else "
    "2 x forward). Uncounted ops are ops the FLOP counter saw but could not count: those counts are incomplete."
)
# Said only where some point ran on a GPU: a CPU report has no % of peak column to explain.
GPU_PEAK_NOTE = (
    "% of peak sets the achieved TFLOP/s against the dense tensor-core peak of the point's GPU for its dtype."
)


def flops_note(devices: Any) -> str:
    """FLOPS_NOTE, with the tensor-core peak sentence only when one of ``devices`` is a GPU."""
    return FLOPS_NOTE + (" " + GPU_PEAK_NOTE if any(is_gpu(d) for d in devices) else "")


def latency_ranks(median: Any, p20: Any, p80: Any) -> list[str]:
    """Rank by latency where the p20-p80 intervals allow: 1 + the number of series conclusively faster (their
    p80 below this one's p20). Series whose intervals overlap share a rank, marked "=" ("1=", "1=", "3")."""
    med = [float(v) for v in median]
    lo = [float(a) if math.isfinite(float(a)) else m for a, m in zip(p20, med, strict=True)]
    hi = [float(b) if math.isfinite(float(b)) else m for b, m in zip(p80, med, strict=True)]
    ranks = []
    for i, m in enumerate(med):
        if not math.isfinite(m):
            ranks.append(0)
            continue
        ranks.append(1 + sum(1 for j in range(len(med)) if j != i and math.isfinite(med[j]) and hi[j] < lo[i]))
    shared = Counter(ranks)
    return ["-" if r == 0 else f"{r}=" if shared[r] > 1 else str(r) for r in ranks]


def speedup_column(base: Baseline) -> str:
    return f"speed-up vs {base.label} (x)"


def memory_column(base: Baseline) -> str:
    return f"memory vs {base.label} (x smaller)"


def promise_column(base: Baseline) -> str:
    return f"MACs vs {base.label} (x fewer)"


REALISED_COLUMN = "share of MAC promise realised %"
# Words for a ratio above / below 1, by the start of its column name; shown as "3.2x faster", "15x larger".
RATIO_WORDS = {"speed-up vs ": ("faster", "slower"), "memory vs ": ("smaller", "larger"), "MACs vs ": ("fewer", "more")}


def ratio_text(ratio: Any, better: str, worse: str) -> str:
    """A ratio (baseline / this) as words: 4 -> "4x faster", 0.25 -> "4x slower", 1 -> "same"; NaN -> "-"."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(r) or r <= 0:
        return "-"
    if abs(r - 1.0) < 5e-3:
        return "same"
    return f"{fmt_number(r)}x {better}" if r > 1 else f"{fmt_number(1.0 / r)}x {worse}"


def summary_table(df: pd.DataFrame, refs: References, baseline: str | Baseline = DEFAULT_BASELINE) -> pd.DataFrame:
    """One row per series and pass at each run's reference point, numeric columns with units in their names.

    Rows run by pass, fastest first. Ratios are against the declared baseline (mechanism and impl); the
    ``% of peak`` column appears only when some point ran on a GPU whose peak is known, the overhead column
    only where the per-call overhead was measured, ``contended`` only where a point was measured on a
    contended machine.
    """
    base = as_baseline(baseline, df)
    at = at_reference(df, refs)
    if at.empty:
        return pd.DataFrame()
    at = with_baseline(at, base)
    at = at.assign(_lat=at["latency_ms_median"].where(at["status"] == "ok"))
    rows = []
    for _, r in at.sort_values(["run", "pass", "_lat", "mechanism", "series"], na_position="last").iterrows():
        ok = r["status"] == "ok"
        row: dict[str, Any] = {
            "mechanism": r["mechanism"],
            "knobs": r["knobs_varied"],
            "impl": r["impl"],
            "run": r["run"],
            "pass": r["pass"],
            "status": r["status"],
            "latency ms (median)": r["latency_ms_median"] if ok else math.nan,
            "latency ms (p20)": r["latency_ms_p20"] if ok else math.nan,
            "latency ms (p80)": r["latency_ms_p80"] if ok else math.nan,
            "per-call overhead ms": r["overhead_ms"],
            "overhead-bound": ("yes" if r["overhead_bound"] else "") if ok else "",
            "contended": "yes" if r["contended"] else "",
            "peak memory MiB": r["peak_bytes"] / MIB if ok else math.nan,
            "GFLOPs fwd (2 x MACs)": r["flops"] * 1e-9,
            "uncounted ops": r["uncounted_ops"] or "-",
            "achieved TFLOP/s": r["tflops"] if ok else math.nan,
            "% of peak": r["pct_peak"] if ok and is_gpu(r["device"]) else math.nan,
        }
        row[speedup_column(base)] = r["speedup"]
        row[memory_column(base)] = r["mem_ratio"]
        row[promise_column(base)] = r["promised"]
        row[REALISED_COLUMN] = 100.0 * r["realised"]
        rows.append(row)
    table = pd.DataFrame(rows)
    ranks = pd.Series("-", index=table.index)
    for _, g in table.groupby(["run", "pass"], sort=False):
        ranks[g.index] = latency_ranks(g["latency ms (median)"], g["latency ms (p20)"], g["latency ms (p80)"])
    table.insert(list(table.columns).index("latency ms (median)"), "latency rank (ties share)", ranks)
    if table["% of peak"].isna().all():
        table = table.drop(columns=["% of peak"])
    if table["per-call overhead ms"].isna().all():
        table = table.drop(columns=["per-call overhead ms", "overhead-bound"])
    if (table["contended"] == "").all():
        table = table.drop(columns=["contended"])
    if (table["uncounted ops"] == "-").all():
        table = table.drop(columns=["uncounted ops"])
    if table["run"].nunique() == 1:
        table = table.drop(columns=["run"])
    if table["impl"].nunique() == 1:
        table = table.drop(columns=["impl"])
    return table


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The summary as a person reads it: ratio columns as words ("3.2x faster", "15x larger")."""
    out = table.copy()
    for col in out.columns:
        words = next((w for prefix, w in RATIO_WORDS.items() if str(col).startswith(prefix)), None)
        if words is not None:
            name = str(col).rsplit(" (", 1)[0]
            out[col] = [ratio_text(v, *words) for v in out[col]]
            out = out.rename(columns={col: name})
    return out


def verdict(df: pd.DataFrame, refs: References, baseline: str | Baseline = DEFAULT_BASELINE) -> pd.DataFrame:
    """Per run and pass at the reference point: the fastest and the smallest series, with their ratio to
    the baseline. Only series measured in the baseline's context are ranked (a cross-attention-only
    mechanism has none); without a baseline point, every ok series is ranked and no ratio is given."""
    base = as_baseline(baseline, df)
    at = at_reference(df, refs)
    at = with_baseline(at[at["status"] == "ok"], base) if not at.empty else at
    rows = []
    for (run, pass_), g in at.groupby(["run", "pass"], sort=False) if not at.empty else []:
        ranked = g[g["base_status"] == "ok"] if (g["base_status"] == "ok").any() else g
        row: dict[str, Any] = {"run": run, "pass": pass_, "resolution": g["resolution"].iloc[0]}
        for what, metric, ratio, words in (
            ("fastest", "latency_ms_median", "speedup", RATIO_WORDS["speed-up vs "]),
            ("smallest", "peak_bytes", "mem_ratio", RATIO_WORDS["memory vs "]),
        ):
            cand = ranked.dropna(subset=[metric])
            if cand.empty:
                row.update({what: "-", f"{what}_value": math.nan, f"{what}_ratio": math.nan, f"{what}_text": "-"})
                continue
            cand = cand.sort_values([metric, "series"])
            best = cand.iloc[0]
            row[what] = best["series"]
            if what == "fastest":
                # Tied: every series whose p20-p80 overlaps the fastest's; none of them is faster than another.
                ranks = latency_ranks(cand[metric], cand["latency_ms_p20"], cand["latency_ms_p80"])
                tied = cand[[r == "1=" for r in ranks]]
                row["fastest_tied"] = [
                    (str(t["series"]), float(t[metric]), float(t["latency_ms_p20"]), float(t["latency_ms_p80"]))
                    for _, t in tied.iterrows()
                ]
            row[f"{what}_value"] = best[metric]
            row[f"{what}_ratio"] = best[ratio]
            row[f"{what}_text"] = ratio_text(best[ratio], *words) if math.isfinite(best[ratio]) else "no baseline"
            row[f"{what}_bound"] = bool(best["overhead_bound"]) if what == "fastest" else False
        row["unranked"] = sorted(set(g["mechanism"]) - set(ranked["mechanism"]))
        rows.append(row)
    return pd.DataFrame(rows)


def is_gpu(device: Any) -> bool:
    return str(device).startswith("cuda")


def format_table(table: pd.DataFrame, fmt: str) -> str:
    """The summary table as ``md`` (GitHub pipe table) or ``csv`` (full precision); "" for an empty table."""
    if fmt not in ("md", "csv"):
        raise ValueError(f"unknown format {fmt!r}; use md or csv")
    if table.empty:
        return ""
    if fmt == "csv":
        return table.to_csv(index=False)
    table = display_table(table)
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_md_cell(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _md_cell(v: Any) -> str:
    text = fmt_number(v)
    # Pipes would split the cell, newlines the row; angle brackets stay text when pasted into a renderer.
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def fmt_number(v: Any) -> str:
    """Numbers to 3 significant digits (thousands kept whole), NaN as '-'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)
