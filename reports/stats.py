"""Small torch-free statistics shared by the reports: the mean of a few seeds with its 95% interval.

``mean_ci(values) -> (mean, lo, hi)`` uses Student's t with n - 1 degrees of freedom
(the two-sided 97.5% quantile), so three seeds give a wide, honest interval. The
quantiles are computed here by bisection on the t distribution's CDF (regularised
incomplete beta function by its continued fraction), so no SciPy is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t interval at ``level``: (mean, lo, hi).

    One value gives (v, nan, nan): no interval can be drawn from a single seed. NaNs are dropped.
    """
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return (math.nan, math.nan, math.nan)
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return (mean, math.nan, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def overlap(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """True when two (mean, lo, hi) intervals overlap, or either has none (then nothing can be told apart)."""
    if any(math.isnan(v) for v in (a[1], a[2], b[1], b[2])):
        return True
    return a[1] <= b[2] and b[1] <= a[2]


def _flag(value: object) -> bool:
    return value is True or (isinstance(value, (int, float)) and not isinstance(value, bool) and bool(value))


def cost_flags(rows: Iterable[dict]) -> str:
    """The flags of a cell made from cost rows, as the sweep report marks points: "contended" when any
    was measured with the machine's calibration probe over its margin for most rounds, "noisy" when any
    kept wide samples; "" when none."""
    rows = list(rows)
    flags = [name for name in ("contended", "noisy") if any(_flag(r.get(name)) for r in rows)]
    return ", ".join(flags)


def conditions(rows: Iterable[dict]) -> str:
    """One sentence on how the cost rows were measured, from the rows themselves: the 1-minute load
    average over their points, threads, and how many were contended or noisy."""
    rows = [r for r in rows if r.get("latency_ms_median") is not None]
    if not rows:
        return "No cost row holds a latency."
    loads = [float(r["load_avg"][0]) for r in rows if isinstance(r.get("load_avg"), list) and r["load_avg"]]
    threads = sorted({int(r["threads"]) for r in rows if isinstance(r.get("threads"), (int, float))})
    load = f"load average {min(loads):.1f} to {max(loads):.1f}" if loads else "load average not recorded"
    contended = sum(_flag(r.get("contended")) for r in rows)
    noisy = sum(_flag(r.get("noisy")) for r in rows)
    return (
        f"Measured at {load} (1 minute, over the {len(rows)} cost rows), "
        f"{'/'.join(map(str, threads)) or '?'} thread(s); {contended} contended and {noisy} noisy "
        "(marked in the table; compare such cells with care)."
    )
