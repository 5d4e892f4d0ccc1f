"""Timing samples: how they are stored and the one place their summary is derived.

A record stores its samples in ``latency_samples_ms`` (milliseconds per call,
rounded to ``DIGITS`` significant digits). ``latency_ms_median``, ``_p20``,
``_p80`` and ``samples`` are derived from them by :func:`summary` only: the
measurement writes them for readers of the raw JSON lines, and ``bench.load``
derives them again from the samples wherever a record has samples, so the two
can never disagree. Records written before samples were stored keep their
stored summary. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DIGITS = 4
SUMMARY_COLUMNS = ("latency_ms_median", "latency_ms_p20", "latency_ms_p80", "samples")


def compact(times_ms: Sequence[float]) -> list[float]:
    """The samples as stored: ``DIGITS`` significant digits each."""
    return [float(f"{t:.{DIGITS}g}") for t in times_ms]


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a non-empty sequence."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> float:
    """(p80 - p20) / median: the relative spread that flags a point as noisy."""
    med = quantile(values, 0.5)
    return (quantile(values, 0.8) - quantile(values, 0.2)) / med if med > 0 else 0.0


def median_ci_width(values: Sequence[float], z: float = 1.96) -> float:
    """Relative width (hi - lo) / median of the distribution-free 95% confidence interval of
    the median (order statistics n/2 -+ z sqrt(n)/2): how well the samples pin the median
    down. A load burst on a minority of samples moves the p80 but not this."""
    s = sorted(values)
    n = len(s)
    med = quantile(s, 0.5)
    lo = max(0, math.floor((n - z * math.sqrt(n)) / 2) - 1)
    hi = min(n - 1, math.ceil((n + z * math.sqrt(n)) / 2) - 1)
    return (s[hi] - s[lo]) / med if med > 0 else 0.0


def summary(values: Sequence[float]) -> dict[str, Any]:
    """The summary columns of a point's samples."""
    return {
        "latency_ms_median": quantile(values, 0.5),
        "latency_ms_p20": quantile(values, 0.2),
        "latency_ms_p80": quantile(values, 0.8),
        "samples": len(values),
    }


def rederive(df: Any) -> Any:
    """``bench.load``'s step: the summary columns of every row holding samples, from its samples."""
    if "latency_samples_ms" not in df.columns or not len(df):
        return df
    for i, values in df["latency_samples_ms"].items():
        if isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values):
            for col, value in summary(values).items():
                df.at[i, col] = value
    return df
