"""Run-to-run comparison: matched points, change in latency and memory, a verdict per point.

Latency is decided from the raw samples (``latency_samples_ms``): a bootstrap
95% confidence interval of the ratio of medians (new / base, ``BOOTSTRAP``
resamples of each side, seeded; two-level where a side stores its timing rounds,
``latency_rounds``: the rounds drawn with replacement, then the samples within
each), divided by the calibration probe's ratio
between the runs (the median ``probe_ms`` of each run on that device), so a
machine that is slower as a whole does not read as a slower kernel. The point is
``slower`` when the interval lies above 1, ``faster`` below, else within noise;
it is a regression only when the interval's lower end exceeds ``1 + fail_above``.
A point stored ``contended`` in either run is ``inconclusive`` and never fails.
Records without samples (written before they were stored) fall back to their
p20-p80 intervals: the new run's interval wholly above the base's is slower
(``noise``, a relative band, where no interval is stored either).
Memory is deterministic, so any change beyond the threshold counts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd
from attnbench.bench.env import env_differences
from attnbench.reports.data import MIB, POINT_FIELDS, Run, resolution_text, tidy

from attnbench.errors import AttnbenchError

# Statuses that mean a point broke (a newly skipped point is a configuration change, not a regression).
BROKEN = ("oom", "error", "timeout")


class FingerprintMismatch(AttnbenchError, ValueError):
    """The two runs come from different environments."""

    def __init__(self, differences: list[str]):
        self.differences = differences
        super().__init__(
            "the runs have different environment fingerprints, so their numbers are not comparable ("
            + "; ".join(differences)
            + "); pass --force to compare them anyway"
        )


def fingerprint_differences(base: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``field: base X, new Y`` for every field that makes the environments incomparable (``bench.env``'s rule)."""
    return [f"{k}: base {base.get(k)!r}, new {new.get(k)!r}" for k in env_differences(base, new)]


@dataclasses.dataclass
class Comparison:
    """Matched points (one row each) and what did not match."""

    table: pd.DataFrame
    only_base: pd.DataFrame
    only_new: pd.DataFrame
    differences: list[str]
    fail_above: float
    # Whether points of the base that the new run lacks are accepted (else they fail the comparison).
    allow_missing: bool = False

    @property
    def regressions(self) -> pd.DataFrame:
        return self.table[self.table["regression"]]

    @property
    def missing(self) -> int:
        """Points of the base without a match in the new run; they fail the comparison unless allowed."""
        return len(self.only_base)

    @property
    def failed(self) -> bool:
        return bool(self.table["regression"].any()) or (self.missing > 0 and not self.allow_missing)


MATCH_KEYS = [f for f in POINT_FIELDS if f != "tokens"]
BOOTSTRAP = 2000
CONFIDENCE = 0.95


def _samples(value: Any) -> np.ndarray | None:
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) >= 2:
        arr = np.asarray(value, dtype="float64")
        if np.isfinite(arr).all() and (arr > 0).all():
            return arr
    return None


def _flag(value: Any) -> bool:
    return not isinstance(value, (list, dict)) and not pd.isna(value) and bool(value)


def _rounds(value: Any, samples: np.ndarray | None) -> list[int] | None:
    """The sample count of each timing round, where they are stored and add up to the samples."""
    if samples is None or not isinstance(value, (list, tuple, np.ndarray)) or len(value) < 2:
        return None
    counts = [int(v) for v in value if isinstance(v, (int, float, np.integer, np.floating)) and v >= 1]
    return counts if len(counts) == len(value) and sum(counts) == len(samples) else None


def _medians(samples: np.ndarray, rounds: list[int] | None, rng: np.random.Generator) -> np.ndarray:
    """``BOOTSTRAP`` medians of resamples of one point's samples. With its rounds, a two-level
    resample: the rounds with replacement, then each chosen round's samples with replacement, so
    a difference between rounds (the machine's state drifting) widens the interval as it should;
    without, the samples with replacement."""
    if rounds is None:
        return np.median(samples[rng.integers(0, len(samples), (BOOTSTRAP, len(samples)))], axis=1)
    sizes = np.asarray(rounds)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pick = rng.integers(0, len(sizes), (BOOTSTRAP, len(sizes)))  # (B, k): the rounds drawn
    n = sizes[pick][..., None]  # (B, k, 1): each drawn round's size
    within = np.floor(rng.random((BOOTSTRAP, len(sizes), int(sizes.max()))) * n).astype(int)  # (B, k, m)
    values = samples[starts[pick][..., None] + within]  # (B, k, m)
    values = np.where(np.arange(int(sizes.max())) < n, values, np.nan)  # a round's own size only
    return np.nanmedian(values.reshape(BOOTSTRAP, -1), axis=1)  # (B,)


def ratio_interval(
    base: np.ndarray,
    new: np.ndarray,
    seed: int = 0,
    base_rounds: list[int] | None = None,
    new_rounds: list[int] | None = None,
) -> tuple[float, float, float]:
    """median(new) / median(base) and its bootstrap ``CONFIDENCE`` interval (percentile method);
    two-level over the timing rounds of each side that has them (:func:`_medians`)."""
    rng = np.random.default_rng(seed)
    b = _medians(base, base_rounds, rng)
    n = _medians(new, new_rounds, rng)
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(n / b, [alpha, 1 - alpha])
    return float(np.median(new) / np.median(base)), float(lo), float(hi)


def probe_ratios(base: pd.DataFrame, new: pd.DataFrame) -> dict[str, float]:
    """Per device: the new run's median calibration probe over the base run's (1.0 where either lacks one)."""
    out: dict[str, float] = {}
    for device in set(base["device"].dropna()) | set(new["device"].dropna()):
        pb = pd.to_numeric(base.loc[base["device"] == device, "probe_ms"], errors="coerce").dropna()
        pn = pd.to_numeric(new.loc[new["device"] == device, "probe_ms"], errors="coerce").dropna()
        out[str(device)] = float(pn.median() / pb.median()) if len(pb) and len(pn) and pb.median() > 0 else 1.0
    return out


def _latency_decision(rb: pd.Series, rn: pd.Series, probe: float, fail_above: float, noise: float) -> dict[str, Any]:
    """verdict, what decided it (``samples``, ``intervals`` or ``contended``), regression, the
    probe-corrected change and its interval, for two ok points."""
    out: dict[str, Any] = {"ratio_low": math.nan, "ratio_high": math.nan, "probe_ratio": probe}
    if _flag(rb["contended"]) or _flag(rn["contended"]):
        out.update(verdict="inconclusive", decided_by="contended", regression=False)
        out["latency_change"] = rn["latency_ms_median"] / rb["latency_ms_median"] / probe - 1.0
        return out
    sb, sn = _samples(rb["latency_samples_ms"]), _samples(rn["latency_samples_ms"])
    if sb is None or sn is None:  # records without samples: their stored intervals decide
        verdict = latency_verdict(rb, rn, noise)
        change = rn["latency_ms_median"] / rb["latency_ms_median"] - 1.0
        out.update(verdict=verdict, decided_by="intervals", latency_change=change)
        out["regression"] = verdict == "slower" and change > fail_above
        return out
    rounds = _rounds(rb["latency_rounds"], sb), _rounds(rn["latency_rounds"], sn)
    ratio, lo, hi = ratio_interval(sb, sn, base_rounds=rounds[0], new_rounds=rounds[1])
    ratio, lo, hi = ratio / probe, lo / probe, hi / probe
    verdict = "slower" if lo > 1 else "faster" if hi < 1 else "within noise"
    out.update(verdict=verdict, decided_by="samples", regression=bool(lo > 1 + fail_above), latency_change=ratio - 1.0)
    out.update(ratio_low=lo, ratio_high=hi)
    return out


def latency_verdict(base: pd.Series, new: pd.Series, noise: float) -> str:
    """faster, slower or within noise, from the p20/p80 spreads (or ``noise`` where a spread is missing)."""
    spread = [base["latency_ms_p20"], base["latency_ms_p80"], new["latency_ms_p20"], new["latency_ms_p80"]]
    if all(isinstance(v, float) and math.isfinite(v) for v in spread):
        b20, b80, n20, n80 = spread
        if n20 > b80:
            return "slower"
        if n80 < b20:
            return "faster"
        return "within noise"
    change = new["latency_ms_median"] / base["latency_ms_median"] - 1.0
    if change > noise:
        return "slower"
    if change < -noise:
        return "faster"
    return "within noise"


def compare(
    base: Run,
    new: Run,
    fail_above: float = 0.10,
    noise: float = 0.05,
    force: bool = False,
    allow_missing: bool = False,
) -> Comparison:
    """Compare two runs point by point.

    ``fail_above`` (a fraction) is the latency or memory growth beyond which a
    point that got slower (or bigger) counts as a regression; a point that ran
    in ``base`` but hits oom, error or timeout in ``new`` is one too. Points of
    ``base`` missing from ``new`` fail the comparison unless ``allow_missing``
    (a run that lost its points must not pass a regression gate). Raises
    :class:`FingerprintMismatch` when the environments differ, unless ``force``.
    """
    differences = fingerprint_differences(base.env, new.env)
    if differences and not force:
        raise FingerprintMismatch(differences)
    a, b = tidy([base]), tidy([new])
    cols = MATCH_KEYS + [
        "tokens",
        "knobs_varied",
        "status",
        "reason",
        "latency_ms_median",
        "latency_ms_p20",
        "latency_ms_p80",
        "peak_bytes",
        "noisy",
        "latency_samples_ms",
        "latency_rounds",
        "contended",
        "probe_ms",
    ]
    probes = probe_ratios(a, b)
    a, b = a[cols].drop_duplicates(MATCH_KEYS, keep="last"), b[cols].drop_duplicates(MATCH_KEYS, keep="last")
    merged = a.merge(b, on=MATCH_KEYS, how="outer", suffixes=("_base", "_new"), indicator=True)
    only_base = merged[merged["_merge"] == "left_only"][MATCH_KEYS]
    only_new = merged[merged["_merge"] == "right_only"][MATCH_KEYS]
    both = merged[merged["_merge"] == "both"].drop(columns=["_merge"]).reset_index(drop=True)
    rows = []
    for _, r in both.iterrows():
        rb = _side(r, "_base")
        rn = _side(r, "_new")
        row = {k: r[k] for k in MATCH_KEYS}
        row["tokens"] = r["tokens_base"]
        row["knobs_varied"] = r["knobs_varied_base"]
        row.update(
            {
                "status_base": rb["status"],
                "status_new": rn["status"],
                "latency_ms_base": rb["latency_ms_median"],
                "latency_ms_new": rn["latency_ms_median"],
                "latency_change": math.nan,
                "peak_mib_base": rb["peak_bytes"] / MIB,
                "peak_mib_new": rn["peak_bytes"] / MIB,
                "memory_change": math.nan,
                "noisy": bool(rb["noisy"] or rn["noisy"]),
            }
        )
        if rb["status"] == "ok" and rn["status"] == "ok":
            if rb["peak_bytes"] > 0:
                row["memory_change"] = rn["peak_bytes"] / rb["peak_bytes"] - 1.0
            row.update(_latency_decision(rb, rn, probes.get(str(r["device"]), 1.0), fail_above, noise))
            bigger = row["memory_change"] > fail_above
            if bigger:
                row["verdict"] += ", memory grew"
            row["regression"] = bool(row["regression"] or bigger)
        elif rb["status"] == "ok":
            row["verdict"] = f"now {rn['status']}"
            row["regression"] = rn["status"] in BROKEN
        elif rn["status"] == "ok":
            row["verdict"] = f"runs now (was {rb['status']})"
            row["regression"] = False
        else:
            same = rb["status"] == rn["status"]
            row["verdict"] = f"still {rb['status']}" if same else f"{rb['status']} -> {rn['status']}"
            row["regression"] = False
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=MATCH_KEYS + ["verdict", "regression", "latency_change", "memory_change"])
    else:
        order = np.where(table["regression"], 0, 1)
        table = (
            table.assign(_o=order, _c=-table["latency_change"].fillna(0))
            .sort_values(["_o", "_c", "mechanism", "tokens"])
            .drop(columns=["_o", "_c"])
            .reset_index(drop=True)
        )
    return Comparison(table, only_base, only_new, differences, fail_above, allow_missing)


def _side(r: pd.Series, suffix: str) -> pd.Series:
    keys = ["status", "latency_ms_median", "latency_ms_p20", "latency_ms_p80", "peak_bytes", "noisy"]
    keys += ["latency_samples_ms", "latency_rounds", "contended"]
    return pd.Series({k: r[k + suffix] for k in keys})


def display_table(cmp: Comparison) -> pd.DataFrame:
    """The comparison as shown to a person: one row per matched point, changes in percent."""
    t = cmp.table
    if t.empty:
        return pd.DataFrame()
    return pd.DataFrame(
        {
            "mechanism": t["mechanism"],
            "knobs": t["knobs_varied"],
            "resolution": [resolution_text(h, w) for h, w in zip(t["height"], t["width"], strict=True)],
            "batch": t["batch"],
            "dtype": t["dtype"],
            "pass": t["pass"],
            "impl": t["impl"],
            "base ms": t["latency_ms_base"],
            "new ms": t["latency_ms_new"],
            "latency change %": 100.0 * t["latency_change"],
            "base MiB": t["peak_mib_base"],
            "new MiB": t["peak_mib_new"],
            "memory change %": 100.0 * t["memory_change"],
            "verdict": t["verdict"] + np.where(t["noisy"], " (noisy)", ""),
            "regression": np.where(t["regression"], "REGRESSION", ""),
        }
    )


def summary_line(cmp: Comparison) -> str:
    t = cmp.table
    counts = t["verdict"].value_counts().to_dict() if not t.empty else {}
    parts = [f"{len(t)} matched points"] + [f"{n} {v}" for v, n in sorted(counts.items())]
    if len(cmp.only_base):
        parts.append(f"{len(cmp.only_base)} only in base")
    if len(cmp.only_new):
        parts.append(f"{len(cmp.only_new)} only in new")
    n_reg = int(t["regression"].sum()) if not t.empty else 0
    parts.append(f"{n_reg} regressed beyond {100 * cmp.fail_above:g}%")
    return ", ".join(parts)


def missing_line(cmp: Comparison) -> str | None:
    """Why the comparison fails for points the new run lacks (None: it does not)."""
    if not cmp.missing or cmp.allow_missing:
        return None
    return (
        f"{cmp.missing} point(s) of the base are missing from the new run, so the comparison fails; "
        "rerun them, or pass --allow-missing to compare the points both hold"
    )


class PercentError(AttnbenchError, ValueError):
    """A percentage option (``--fail-above``, ``--noise``) that does not read as one."""


def parse_percent(text: str) -> float:
    """'10%' or '10' -> 0.10 (always a percentage); raises PercentError naming the expected form."""
    raw = str(text).strip().rstrip("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise PercentError(f"expected a percentage such as 10% or 2.5, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise PercentError(f"expected a non-negative percentage such as 10%, got {text!r}")
    return value / 100.0


def _interval(r: dict[str, Any]) -> str:
    """The probe-corrected ratio's bootstrap interval as text, or what decided instead."""
    lo, hi = r.get("ratio_low"), r.get("ratio_high")
    if isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi):
        return f"[{lo:.2f}, {hi:.2f}]"
    decided = r.get("decided_by")
    return decided if isinstance(decided, str) else "-"


def terminal_table(cmp: Comparison) -> pd.DataFrame:
    """A narrow view for the terminal: the point in one column, then base -> new and the change."""
    t = cmp.table
    if t.empty:
        return pd.DataFrame()
    point = [
        f"{r['mechanism']}"
        + (f" {r['knobs_varied']}" if r["knobs_varied"] != "-" else "")
        + f" {resolution_text(r['height'], r['width'])} b{r['batch']:g} {r['dtype']} {r['pass']} {r['impl']}"
        for r in t.to_dict("records")
    ]
    return pd.DataFrame(
        {
            "point": point,
            "base ms": t["latency_ms_base"],
            "new ms": t["latency_ms_new"],
            "latency %": 100.0 * t["latency_change"],
            "memory %": 100.0 * t["memory_change"],
            "ratio 95%": [_interval(r) for r in t.to_dict("records")],
            "verdict": t["verdict"] + np.where(t["noisy"], " (noisy)", "") + np.where(t["regression"], " !", ""),
        }
    )
