"""Numbers derived from stored results: scaling exponents, crossovers, the summary table.

Everything here is computed from the raw stored numbers at report time; nothing
derived is ever stored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from reports.data import MIB, SIDE_AXES, plain

DEFAULT_BASELINE = "full"
# Label of each metric with its unit; FLOPs are always 2 x stored MACs.
METRICS = {
    "latency_ms_median": "latency (ms, median)",
    "peak_bytes": "peak memory (MiB)",
    "flops": "forward GFLOPs (= 2 x MACs)",
}
METRIC_SCALE = {"latency_ms_median": 1.0, "peak_bytes": 1.0 / MIB, "flops": 1e-9}


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

    def describe(self) -> str:
        if self.kind == "none":
            return "no matched points"
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


def crossover(tokens: Sequence[float], ratio: Sequence[float]) -> Crossover:
    """Crossover of ``ratio`` = mechanism / baseline through 1 as tokens grow.

    ``ratio < 1`` means the mechanism is below (faster, smaller) the baseline.
    The crossing is interpolated linearly in log(ratio) against log(tokens), so
    a power-law ratio gives the exact crossing.
    """
    t = np.asarray(tokens, dtype=float)
    r = np.asarray(ratio, dtype=float)
    keep = np.isfinite(t) & np.isfinite(r) & (t > 0) & (r > 0)
    t, r = t[keep], r[keep]
    if t.size == 0:
        return Crossover("none")
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


def reference(df: pd.DataFrame, baseline: str = DEFAULT_BASELINE) -> Reference:
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
    ctx = in_side(ok, side)
    if ctx.empty:
        return Reference(side, None, None, None)
    base = ctx[ctx["mechanism"] == baseline]
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


def references(df: pd.DataFrame, baseline: str = DEFAULT_BASELINE) -> References:
    """:func:`reference` of every run in ``df``."""
    return References({str(run): reference(g, baseline) for run, g in df.groupby("run", sort=False)})


def _mask(df: pd.DataFrame, side: dict[str, Any], skip: Sequence[str]) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for k, v in side.items():
        if k not in skip:
            mask &= df[k] == v
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


def with_baseline(df: pd.DataFrame, baseline: str = DEFAULT_BASELINE) -> pd.DataFrame:
    """Each ok row joined with the fastest ok baseline row of the same run and context.

    Adds ``base_latency_ms``, ``base_peak_bytes``, ``base_status`` (the baseline's
    status there, e.g. "oom", or "missing"), ``speedup`` (baseline / mechanism
    latency) and ``mem_saving`` (1 - mechanism / baseline peak memory).
    """
    from reports.data import CONTEXT_FIELDS

    keys = ["run"] + CONTEXT_FIELDS
    base_all = df[df["mechanism"] == baseline]
    base_ok = base_all[base_all["status"] == "ok"].sort_values("latency_ms_median")
    best = base_ok.drop_duplicates(keys, keep="first")[keys + ["latency_ms_median", "peak_bytes"]]
    best = best.rename(columns={"latency_ms_median": "base_latency_ms", "peak_bytes": "base_peak_bytes"})
    failed = base_all[base_all["status"] != "ok"].drop_duplicates(keys)[keys + ["status"]]
    failed = failed.rename(columns={"status": "base_failed"})
    out = df.merge(best, on=keys, how="left").merge(failed, on=keys, how="left")
    out["base_status"] = np.where(
        out["base_latency_ms"].notna(), "ok", out["base_failed"].fillna("missing").astype(str)
    )
    out["speedup"] = out["base_latency_ms"] / out["latency_ms_median"]
    out["mem_saving"] = 1.0 - out["peak_bytes"] / out["base_peak_bytes"]
    return out.drop(columns=["base_failed"])


def crossovers(df: pd.DataFrame, side: dict[str, Any] | References, baseline: str = DEFAULT_BASELINE) -> pd.DataFrame:
    """Per series and pass, where it becomes faster and smaller than the baseline (in the reference context)."""
    ctx = with_baseline(in_side(df, side), baseline)
    ctx = ctx[(ctx["mechanism"] != baseline) & (ctx["status"] == "ok")]
    rows = []
    for (series, pass_), g in ctx.groupby(["series", "pass"], sort=True):
        matched = g[g["base_status"] == "ok"]
        lat = crossover(matched["tokens"], matched["latency_ms_median"] / matched["base_latency_ms"])
        mem = crossover(matched["tokens"], matched["peak_bytes"] / matched["base_peak_bytes"])
        beyond = g[g["base_status"].isin(["oom", "timeout"])]
        note = ""
        if not beyond.empty:
            statuses = "/".join(sorted(beyond["base_status"].unique()))
            note = f"{baseline} hit {statuses} from {square(beyond['tokens'].min())}, where this one ran"
        rows.append(
            {
                "series": series,
                "pass": pass_,
                "faster_than_baseline": lat.describe(),
                "smaller_than_baseline": mem.describe(),
                "faster_tokens": lat.tokens,
                "smaller_tokens": mem.tokens,
                "faster_kind": lat.kind,
                "smaller_kind": mem.kind,
                "note": note,
            }
        )
    return pd.DataFrame(rows)


def exponents(df: pd.DataFrame, metric: str) -> dict[tuple[str, str], float | None]:
    """Fitted tokens exponent of ``metric`` per (series, pass) over ok rows of ``df``."""
    ok = df[df["status"] == "ok"]
    return {(str(s), str(p)): fit_exponent(g["tokens"], g[metric]) for (s, p), g in ok.groupby(["series", "pass"])}


FLOPS_NOTE = (
    "FLOPs = 2 x the stored multiply-adds (MACs) of one forward pass. Achieved TFLOP/s and % of peak come from "
    "bench.store: a fwd+bwd point counts forward plus backward MACs (the measured backward count where the "
    "counter gave one, else 2 x forward), against the dense tensor-core peak of the point's GPU for its dtype. "
    "Uncounted ops are ops the FLOP counter saw but could not count: those counts are incomplete."
)


def summary_table(df: pd.DataFrame, refs: References, baseline: str = DEFAULT_BASELINE) -> pd.DataFrame:
    """One row per series and pass at each run's reference point, numeric columns with units in their names.

    The ``% of peak`` column appears only when some point ran on a GPU whose peak is known.
    """
    at = at_reference(df, refs)
    if at.empty:
        return pd.DataFrame()
    at = with_baseline(at, baseline)
    rows = []
    for _, r in at.sort_values(["run", "pass", "mechanism", "series"]).iterrows():
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
            "peak memory MiB": r["peak_bytes"] / MIB if ok else math.nan,
            "GFLOPs fwd (2 x MACs)": r["flops"] * 1e-9,
            "uncounted ops": r["uncounted_ops"] or "-",
            "achieved TFLOP/s": r["tflops"] if ok else math.nan,
            "% of peak": r["pct_peak"] if ok and is_gpu(r["device"]) else math.nan,
        }
        # The baseline's own rows too: its slower implementations sit below 1 against its fastest.
        row[f"speed-up vs {baseline} (x)"] = r["speedup"]
        row[f"memory saving vs {baseline} %"] = 100.0 * r["mem_saving"]
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    if table["% of peak"].isna().all():
        table = table.drop(columns=["% of peak"])
    if (table["uncounted ops"] == "-").all():
        table = table.drop(columns=["uncounted ops"])
    if table["run"].nunique() == 1:
        table = table.drop(columns=["run"])
    if table["impl"].nunique() == 1:
        table = table.drop(columns=["impl"])
    return table


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
