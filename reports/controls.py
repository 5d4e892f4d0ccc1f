"""Whether a run could tell its variants apart: the controls' verdict, the smallest detectable
difference, and a ranking that calls every overlapping pair a tie. Torch-free; used by the
reproduce page (``reports.experiments``) and the match page (``reports.matching``).

- Negative control (a twin: one variant's configuration under a second name, its own seeds):
  holds when its 95% interval overlaps its twin's.
- Positive control (what the experiment studies taken away): holds when its 95% interval lies
  wholly below the interval of the variant it is set against (full attention, say).
- Smallest detectable difference: the half-width of the 95% Student-t interval of the
  difference of two means of ``n`` seeds each, ``t(0.975, df) * s_p * sqrt(2 / n)``, where
  ``s_p`` is the seed-to-seed standard deviation pooled over every variant with two or more
  seeds (``df`` = the sum of their seeds less one each) and ``n`` the fewest seeds of those
  variants. Two variants whose means differ by less cannot be told apart by this run.
- Ranking: variants by mean, best first; a pair whose intervals overlap is a tie, and is
  said to be one. An experiment whose controls fail gets no ranking at all.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from attnbench.reports.page import esc
from attnbench.reports.stats import mean_ci, overlap, t_quantile


@dataclasses.dataclass
class Check:
    kind: str  # "negative" or "positive"
    variant: str  # the control
    against: str  # its twin, or the variant it is set against
    held: bool | None  # None: a side has no rows, or too few seeds for an interval
    text: str


@dataclasses.dataclass
class Power:
    half_width: float  # smallest detectable difference, in the samples' unit
    pooled_sd: float
    df: int
    seeds: int  # n of the formula: the fewest seeds of a variant with two or more


def intervals(samples: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float, float]]:
    return {k: mean_ci(v) for k, v in samples.items()}


def detectable(samples: Mapping[str, Sequence[float]], level: float = 0.95) -> Power | None:
    """The smallest difference of two means this run could detect (see the module doc); None without any
    variant of two or more seeds."""
    ss, df, ns = 0.0, 0, []
    for vals in samples.values():
        xs = [float(x) for x in vals if x is not None and not math.isnan(float(x))]
        if len(xs) < 2:
            continue
        m = sum(xs) / len(xs)
        ss += sum((x - m) ** 2 for x in xs)
        df += len(xs) - 1
        ns.append(len(xs))
    if not ns:
        return None
    sd = math.sqrt(ss / df)
    n = min(ns)
    return Power(t_quantile(0.5 + level / 2.0, df) * sd * math.sqrt(2.0 / n), sd, df, n)


def _fmt(ci: tuple[float, float, float], scale: float) -> str:
    mean, lo, hi = ci
    if math.isnan(lo):
        return f"{scale * mean:.1f} (no interval)"
    return f"{scale * mean:.1f} [{scale * lo:.1f}, {scale * hi:.1f}]"


def checks(
    samples: Mapping[str, Sequence[float]],
    twins: Mapping[str, str],
    positives: Mapping[str, str],
    scale: float = 100.0,
) -> list[Check]:
    """The verdict of every declared control on ``samples`` (variant -> per-seed values, higher is better)."""
    ci = intervals(samples)
    out = []
    for kind, pairs in (("negative", twins), ("positive", positives)):
        for control, ref in pairs.items():
            if control not in ci or ref not in ci:
                missing = control if control not in ci else ref
                out.append(Check(kind, control, ref, None, f"{missing} has no rows in this run"))
                continue
            a, b = ci[control], ci[ref]
            if math.isnan(a[1]) or math.isnan(b[1]):
                out.append(Check(kind, control, ref, None, "one seed: no interval, so the control cannot be judged"))
                continue
            both = f"{control} {_fmt(a, scale)} against {ref} {_fmt(b, scale)}"
            if kind == "negative":
                held = overlap(a, b)
                why = (
                    "intervals overlap, as a twin's should"
                    if held
                    else "intervals do not overlap: seed noise or a bug separates identical configurations"
                )
            else:
                held = a[2] < b[1]
                why = (
                    "wholly below, as the ablation should be"
                    if held
                    else "not separated: the task does not need what this experiment studies, or the seeds are too few"
                    if overlap(a, b)
                    else "separated, but above: the ablation beats the full model"
                )
            out.append(Check(kind, control, ref, held, f"{both}: {why}"))
    return out


def ranking(samples: Mapping[str, Sequence[float]], exclude: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """Variants by mean, best first, each with the variants it ties with (overlapping 95% intervals)."""
    ci = {k: v for k, v in intervals(samples).items() if k not in exclude and not math.isnan(v[0])}
    order = sorted(ci, key=lambda k: -ci[k][0])
    return [(k, [o for o in order if o != k and overlap(ci[k], ci[o])]) for k in order]


def verdict_html(
    samples: Mapping[str, Sequence[float]],
    twins: Mapping[str, str],
    positives: Mapping[str, str],
    *,
    unit: str = "accuracy points",
    scale: float = 100.0,
    what: str = "held-out accuracy",
) -> tuple[str, bool]:
    """The controls' verdict, the smallest detectable difference and (only when both controls held) the
    ranking with ties, as HTML; and whether the controls held (False when any failed or none is declared)."""
    cs = checks(samples, twins, positives, scale)
    power = detectable(samples)
    parts = []
    kinds = {c.kind for c in cs}
    failed = [c for c in cs if c.held is False]
    unjudged = [c for c in cs if c.held is None]
    ok = bool(cs) and not failed and not unjudged and kinds == {"negative", "positive"}
    if not cs:
        head = (
            "No controls declared (twin_of, positive_control_of): this run's power to tell variants apart is "
            "not measured, so no ranking is claimed here (an order against the paper, where shown, is unchecked)."
        )
    elif failed:
        head = (
            "Controls failed: "
            + "; ".join(f"{c.kind} control {c.variant}" for c in failed)
            + ". No ranking is claimed."
        )
    elif unjudged or kinds != {"negative", "positive"}:
        lack = [k for k in ("negative", "positive") if k not in kinds]
        head = (
            "Controls not judged: "
            + "; ".join(
                [f"{c.kind} control {c.variant} ({c.text})" for c in unjudged]
                + [f"no {k} control declared" for k in lack]
            )
            + ". No ranking is claimed."
        )
    else:
        head = (
            "Both controls held: the negative control did not separate from its twin, and the positive control "
            "separated from the variant it is set against."
        )
    parts.append(f'<p class="{"note" if ok else "warn"}"><b>Controls.</b> {esc(head)}</p>')
    if cs:
        rel = {"negative": "twin of", "positive": "set against"}
        state = {True: "held", False: "FAILED", None: "not judged"}
        items = "".join(
            f"<li>{esc(c.kind)} control <b>{esc(c.variant)}</b> ({rel[c.kind]} {esc(c.against)}): "
            f"{state[c.held]}: {esc(c.text)}</li>"
            for c in cs
        )
        parts.append(f"<ul>{items}</ul>")
    if power is None:
        parts.append('<p class="note"><b>Smallest detectable difference.</b> None: no variant has two seeds.</p>')
    else:
        parts.append(
            f'<p class="note"><b>Smallest detectable difference: {scale * power.half_width:.1f} {esc(unit)}</b>, the '
            f"half-width of the 95% interval of a difference of two means of {power.seeds} seeds each, from the "
            f"seed-to-seed standard deviation of {esc(what)} pooled over the variants ({scale * power.pooled_sd:.2f}, "
            f"{power.df} degrees of freedom). Smaller differences cannot be told apart by this run.</p>"
        )
    if ok:
        control_names = list(twins)  # a twin repeats a variant: rank the original only
        rows = ranking(samples, exclude=control_names)
        ci = intervals(samples)
        items = "".join(
            f"<li><b>{esc(k)}</b> {esc(_fmt(ci[k], scale))}"
            + (f": tie with {esc(', '.join(ties))}" if ties else ": separated from every other")
            + "</li>"
            for k, ties in rows
        )
        parts.append(
            f'<p class="note"><b>Ranking</b> ({esc(what)}, mean [95% interval], best first; every pair whose '
            f"intervals overlap is a tie):</p><ol>{items}</ol>"
        )
    return "".join(parts), ok
