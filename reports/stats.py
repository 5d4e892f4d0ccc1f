"""Statistics over seeds, torch-free: the mean with its 95% Student t interval."""

from __future__ import annotations

import math
from collections.abc import Iterable


def _t_density(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf_half(t: float, df: int, steps: int = 2000) -> float:
    """P(0 <= T <= t) for Student's t with ``df`` degrees of freedom (Simpson's rule)."""
    h = t / steps
    total = _t_density(0.0, df) + _t_density(t, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, steps))
    return total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom, by bisection."""
    lo, hi = 0.0, 1.0
    while _t_cdf_half(hi, df) < p - 0.5:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf_half(mid, df) < p - 0.5 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Iterable[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``values`` and its two-sided 95% Student t interval.

    None and NaN are dropped; one value gives a zero-width interval at that value, none gives NaNs.
    """
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return (math.nan, math.nan, math.nan)
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return (mean, mean, mean)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)
