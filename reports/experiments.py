"""The report of ``attnbench reproduce``: per experiment, accuracy over seeds against cost and the paper.

Reads only the stored rows (``kind: "experiment"`` and ``"experiment_cost"`` of a
results store) and ``experiment.json``; pandas and plotly, no torch. One section per
experiment and mode: variant, params, MACs (and the paper's), latency and peak memory
at each cost resolution, held-out accuracy as the mean over seeds with its 95%
Student-t interval, the paper's top-1, and whether our order of each pair of variants
agrees with the paper's, or cannot be told apart (intervals overlap: within seed
noise). A cost-against-accuracy plot per experiment sets every mode run on the page
side by side, so ``--quick`` and ``--full`` of one experiment compare on one page.
"""

from __future__ import annotations

import datetime
import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from attnbench.bench.store import read_results
from attnbench.reports.controls import verdict_html
from attnbench.reports.page import Section, document, esc, table_html
from attnbench.reports.stats import conditions, cost_flags, mean_ci, overlap

MODE_ORDER = {"full": 0, "quick": 1, "smoke": 2}
MODE_SYMBOLS = {"full": "circle", "quick": "square", "smoke": "triangle-up"}
VARIANT_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def load_rows(out_dirs: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(accuracy rows, cost rows, experiment.json of every directory merged by mode)."""
    acc: list[dict[str, Any]] = []
    cost: list[dict[str, Any]] = []
    meta: dict[str, dict[str, Any]] = {}
    for d in out_dirs:
        for r in read_results(d).records:
            if r.get("kind") == "experiment" and r.get("status") == "ok":
                acc.append(r)
            elif r.get("kind") == "experiment_cost":
                cost.append(r)
        path = Path(d) / "experiment.json"
        if path.exists():
            for mode, m in json.loads(path.read_text()).items():
                meta.setdefault(m["experiment"]["name"], {})[mode] = m
    return pd.DataFrame(acc), pd.DataFrame(cost), meta


def summarise(acc: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment, mode and variant: accuracy mean, 95% interval, seeds, params, MACs."""
    rows = []
    if acc.empty:
        return pd.DataFrame()
    acc = acc.drop_duplicates("point_id", keep="last")
    for (exp, mode, variant), g in acc.groupby(["experiment", "mode", "variant"], sort=False):
        mean, lo, hi = mean_ci(g["accuracy"].astype(float))
        pub = g["published"].iloc[-1] if "published" in g else {}
        pub = pub if isinstance(pub, dict) else {}
        rows.append({
            "experiment": exp, "mode": mode, "variant": variant, "seeds": len(g), "mean": mean, "lo": lo, "hi": hi,
            "params": g["params"].iloc[-1], "macs": g["macs"].iloc[-1], "resolution": g["resolution"].iloc[-1],
            "paper_top1": pub.get("top1"), "paper_params_m": pub.get("params_m"), "paper_gmacs": pub.get("gmacs"),
            "paper_source": pub.get("source"),
        })  # fmt: skip
    return pd.DataFrame(rows)


def ranking(s: pd.DataFrame) -> dict[str, str]:
    """Per variant: how its order against every other variant with a published top-1 compares with the paper's."""
    out: dict[str, str] = {}
    pub = s[s["paper_top1"].notna()]
    # agree, disagree, within seed noise, paper tie, no interval (one seed)
    counts: dict[str, list[int]] = {v: [0, 0, 0, 0, 0] for v in s["variant"]}
    for (_, a), (_, b) in combinations(pub.iterrows(), 2):
        ours, theirs = (a["mean"], a["lo"], a["hi"]), (b["mean"], b["lo"], b["hi"])
        if a["paper_top1"] == b["paper_top1"]:
            k = 3
        elif math.isnan(a["lo"]) or math.isnan(b["lo"]):
            k = 4  # one seed: no interval, so no order can be told (and no "seed noise" measured either)
        elif overlap(ours, theirs):
            k = 2
        else:
            k = 0 if (a["mean"] > b["mean"]) == (a["paper_top1"] > b["paper_top1"]) else 1
        counts[a["variant"]][k] += 1
        counts[b["variant"]][k] += 1
    for v, (agree, disagree, noise, tie, single) in counts.items():
        if agree + disagree + noise + tie + single == 0:
            out[v] = "no published top-1 to compare" if v not in set(pub["variant"]) else "no other published variant"
            continue
        parts = [f"agrees with {agree}"] if agree else []
        parts += [f"disagrees with {disagree}"] if disagree else []
        parts += [f"within seed noise of {noise}"] if noise else []
        parts += [f"paper ties {tie}"] if tie else []
        parts += [f"not ordered against {single} (one seed: no interval)"] if single else []
        out[v] = ", ".join(parts)
    return out


def _pct(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _num(v: Any, scale: float = 1.0, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    return f"{float(v) / scale:.{digits}g}"


def _samples(acc: pd.DataFrame, exp: str, mode: str) -> dict[str, list[float]]:
    """Per variant, its per-seed accuracies in one experiment and mode."""
    if acc.empty:
        return {}
    g = acc.drop_duplicates("point_id", keep="last")
    g = g[(g["experiment"] == exp) & (g["mode"] == mode)]
    return {v: gv["accuracy"].astype(float).tolist() for v, gv in g.groupby("variant", sort=False)}


def section(
    exp: str,
    s: pd.DataFrame,
    cost: pd.DataFrame,
    meta: dict[str, Any],
    fig_html: str,
    acc: pd.DataFrame | None = None,
) -> Section:
    """One experiment: description, per mode the controls' verdict, the smallest detectable difference, the
    ranking (when the controls held) and a table, then the plot."""
    from attnbench.studies.controls import declared

    modes = sorted(s["mode"].unique(), key=lambda m: MODE_ORDER.get(m, 9))
    first: dict[str, Any] = next(iter(meta.values()), {}) if meta else {}
    raw = first.get("experiment", {})
    twins, positives = declared(raw.get("variants") or [])
    parts: list[str] = []
    verdicts = {}
    for mode in modes:
        verdicts[mode] = verdict_html(_samples(acc if acc is not None else pd.DataFrame(), exp, mode), twins, positives)
    failed = [m for m, (_, ok) in verdicts.items() if not ok and (twins or positives)]
    if failed:
        parts.append(
            f'<p class="warn"><b>Controls did not hold at {esc(", ".join(failed))}: no ranking is claimed there '
            "(see below).</b></p>"
        )
    if raw.get("paper"):
        parts.append(f'<p class="note">Paper: {esc(raw["paper"])}</p>')
    if raw.get("task"):
        parts.append(f'<p class="note"><b>Task.</b> {esc(raw["task"])}</p>')
    if raw.get("notes"):
        parts.append(f'<p class="note"><b>Notes.</b> {esc(raw["notes"])}</p>')
    for mode in modes:
        sm = s[s["mode"] == mode]
        m = meta.get(mode, {})
        verdict, held = verdicts[mode]
        ranked = held or not (twins or positives)  # a file without controls keeps the order against the paper
        rank = ranking(sm) if ranked else {}
        cm = cost[cost["mode"] == mode] if not cost.empty else cost
        rows = []
        for _, r in sm.iterrows():
            row = {
                "variant": r["variant"], "params (M)": _num(r["params"], 1e6, 4), "GMACs": _num(r["macs"], 1e9, 4),
            }  # fmt: skip
            if mode == "full":
                row["paper params (M)"] = _num(r["paper_params_m"])
                row["paper GMACs"] = _num(r["paper_gmacs"])
            for _, c in cm[cm["variant"] == r["variant"]].iterrows() if not cm.empty else []:
                res = int(c["resolution"])
                flags = cost_flags([c.to_dict()])
                row[f"latency ms @{res} (p20-p80)"] = (
                    f"{c['latency_ms_median']:.3g} ({c['latency_ms_p20']:.3g}-{c['latency_ms_p80']:.3g})"
                    + (f" {flags}" if flags else "")
                )
                row[f"peak MiB @{res} (inference / training)"] = (
                    f"{_num(c.get('peak_bytes'), 2**20)} / {_num(c.get('train_peak_bytes'), 2**20)}"
                )
            ci = "" if math.isnan(r["lo"]) else f"[{_pct(r['lo'])}, {_pct(r['hi'])}]"
            row.update({
                "accuracy % (mean)": _pct(r["mean"]), "95% interval": ci, "seeds": int(r["seeds"]),
                "paper top-1 %": _num(r["paper_top1"]),
            })  # fmt: skip
            if ranked:
                row["order vs paper"] = rank.get(r["variant"], "")
            rows.append(row)
        batch = int(cm["batch"].iloc[0]) if not cm.empty else None
        res = int(sm["resolution"].iloc[0])
        parts.append(
            f"<h3>{esc(mode)}: trained at {res} px, {int(sm['seeds'].max())} seed(s) per variant"
            f"{', data ' + esc(m.get('data')) if m.get('data') else ''}</h3>"
        )
        parts.append(verdict)
        parts.append(table_html(pd.DataFrame(rows)))
        parts.append(
            f'<p class="note">MACs per image at the training resolution (FLOPs = 2 x MACs), counted by bench.flops. '
            f"Latency: inference forward, batch {batch}, median with p20-p80; peak memory above the baseline of one "
            "inference forward and of one training forward and backward, same batch. "
            "Latency and memory by the harness (bench.measure.measure_module): rounds between calibration probes, "
            f"contended rounds taken again. {esc(conditions(cm.to_dict('records')) if not cm.empty else '')} "
            f"Accuracy: held-out, mean over seeds with a Student-t 95% interval. "
            f"{esc(_noise_sentence(sm)) if ranked else ''}</p>"
        )
    parts.append(fig_html)
    return Section(exp, str(raw.get("title") or exp), parts)


def _noise_sentence(sm: pd.DataFrame) -> str:
    """Which variants our seeds can tell apart, said plainly."""
    items = [(r["variant"], (r["mean"], r["lo"], r["hi"])) for _, r in sm.iterrows()]
    if len(items) < 2:
        return ""
    if all(math.isnan(x[1]) for _, x in items):
        return "One seed per variant: no interval can be drawn, so no ranking is claimed."
    apart = [(a, b) for (a, x), (b, y) in combinations(items, 2) if not overlap(x, y)]
    if not apart:
        return "Every pair of variants is within seed noise (95% intervals overlap): no ranking is claimed."
    shown = "; ".join(f"{a} vs {b}" for a, b in apart[:12])
    return f"Pairs whose 95% intervals do not overlap: {shown}. All other pairs are within seed noise."


def figure(exp: str, s: pd.DataFrame) -> go.Figure:
    """Accuracy (mean, 95% interval) against GMACs per image, one trace per mode."""
    fig = go.Figure()
    order = list(dict.fromkeys(s["variant"]))
    tops: list[float] = [0.0]
    for i, v in enumerate(order):  # the legend's key to the colours: one entry per variant
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", name=esc(v), legendgroup=f"variant {v}",
            marker=dict(color=VARIANT_COLORS[i % len(VARIANT_COLORS)], size=10), hoverinfo="skip",
        ))  # fmt: skip
    for mode, g in sorted(s.groupby("mode"), key=lambda t: MODE_ORDER.get(t[0], 9)):
        x = (g["macs"].astype(float) / 1e9).tolist()
        y = (100 * g["mean"]).tolist()
        up = [100 * (h - m) if not math.isnan(h) else 0 for h, m in zip(g["hi"], g["mean"], strict=True)]
        down = [100 * (m - lo) if not math.isnan(lo) else 0 for lo, m in zip(g["lo"], g["mean"], strict=True)]
        text = [esc(v) for v in g["variant"]]
        # Variants are told apart by colour and the legend, not by text on the plot: names drawn beside points
        # that sit close together (variants of one cost) fall on top of each other.
        colors = [VARIANT_COLORS[order.index(v) % len(VARIANT_COLORS)] for v in g["variant"]]
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers", name=esc(f"{mode} (ours)"), legendgroup=mode,
            marker=dict(color=colors, size=10, symbol=MODE_SYMBOLS.get(mode, "circle"), line=dict(width=1)),
            error_y=dict(type="data", array=up, arrayminus=down, visible=True),
            hovertext=[f"{t}: {v:.1f}% at {c:.4g} GMACs" for t, v, c in zip(text, y, x, strict=True)],
            hoverinfo="text",
        ))  # fmt: skip
        tops += [u + v for u, v in zip(up, y, strict=True) if math.isfinite(v)]
        pub = g[g["paper_top1"].notna() & g["paper_gmacs"].notna()]
        if mode == "full" and not pub.empty:
            fig.add_trace(go.Scatter(
                x=pub["paper_gmacs"].astype(float).tolist(), y=pub["paper_top1"].astype(float).tolist(),
                mode="markers", name="paper (full)", hoverinfo="text+x+y",
                marker=dict(symbol="diamond-open", size=12, line=dict(width=2),
                            color=[VARIANT_COLORS[order.index(v) % len(VARIANT_COLORS)] for v in pub["variant"]]),
                text=[esc(v) for v in pub["variant"]],
            ))  # fmt: skip
            tops += pub["paper_top1"].astype(float).tolist()
    fig.update_layout(
        title=esc(f"{exp}: held-out accuracy against cost"), xaxis_title="GMACs per image (training resolution)",
        yaxis_title="accuracy % (mean, 95% interval)", height=460, template="plotly_white",
        margin=dict(l=60, r=20, t=50, b=50), legend=dict(title_text="variant (colour), mode (marker)"),
    )  # fmt: skip
    top = max(tops)  # from 0, where accuracy can start, to a little above the highest point or interval end
    fig.update_yaxes(range=[0, 10 if top <= 0 else min(105.0, top * 1.1)])
    return fig


def build_page(out_dirs: list[str | Path]) -> str:
    """One self-contained HTML page of every experiment stored in ``out_dirs``."""
    acc, cost, meta = load_rows(out_dirs)
    s = summarise(acc)
    sections = []
    if s.empty:
        sections.append(
            Section(
                "none", "No experiments", ['<p class="empty">No experiment rows were found in these directories.</p>']
            )
        )
    else:
        for i, exp in enumerate(s["experiment"].unique()):
            se = s[s["experiment"] == exp]
            ce = cost[cost["experiment"] == exp] if not cost.empty else cost
            div = pio.to_html(figure(exp, se), full_html=False, include_plotlyjs=False, div_id=f"plot-{i}",
                              config={"displaylogo": False, "responsive": True})  # fmt: skip
            sections.append(section(exp, se, ce, meta.get(exp, {}), div, acc=acc))
    names = ", ".join(str(d) for d in out_dirs)
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return document("attnbench reproduce", f"{names} · generated {generated}", sections, nav=len(sections) > 1)
