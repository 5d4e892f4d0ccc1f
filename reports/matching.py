"""The matching report (torch-free): accuracy against the cost of cross attention, with 95% intervals
over seeds, and the footprint figure (where one query looks, at initialisation and trained).

Reads a run directory of ``attnbench match`` (results.jsonl, footprints.jsonl, env.json) and writes
``report.html`` beside them; :func:`write_footprint_page` draws ``attnbench footprint`` on its own.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from attnbench.reports.page import Section, _fig_html, document, esc, table_html
from attnbench.reports.stats import conditions, cost_flags, mean_ci
from plotly.subplots import make_subplots

METRICS = ("precision", "auc@3", "auc@5", "auc@10")
STRIDE = 8  # pixels per coarse cell of the matcher


def load(run_dir: str | Path) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, Any]]:
    """The match rows (last per point), the footprint records (last per run and state) and env.json."""
    from attnbench.bench.store import read_env, read_results

    run_dir = Path(run_dir)
    env = read_env(run_dir)
    rows = [r for r in read_results(run_dir).records if r.get("kind") == "match"]
    df = pd.DataFrame(rows).drop_duplicates("point_id", keep="last") if rows else pd.DataFrame()
    fps: dict[tuple, dict[str, Any]] = {}
    path = run_dir / "footprints.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            fps[(rec["point_id"], rec["state"])] = rec
    return df, list(fps.values()), env


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per mechanism: metrics as mean and 95% interval over seeds, and the stack's cost."""
    out = []
    for mech, g in df.groupby("mechanism", sort=False):
        row: dict[str, Any] = {"mechanism": mech, "seeds": len(g)}
        for m in METRICS:
            mean, lo, hi = mean_ci(g[m].tolist())
            row[m] = mean
            row[f"{m} lo"], row[f"{m} hi"] = lo, hi
        row["recall"] = float(g["recall"].mean())
        row["matches/pair"] = float(g["matches_per_pair"].mean())
        row["chance precision"] = float(g["chance_precision"].iloc[0])
        row["params"] = int(g["params"].iloc[0])
        row["stack MMACs"] = (g["macs"].iloc[0] or float("nan")) / 1e6
        row["attention MMACs"] = g["analytic_macs"].iloc[0] / 1e6
        row["latency ms"] = float(g["latency_ms_median"].median())
        row["cost flags"] = cost_flags(g.to_dict("records"))
        row["peak KiB"] = float(g["peak_bytes"].median()) / 1024
        kpq = g["keys_per_query"].iloc[0] or {}
        row["keys/query (cross)"] = kpq.get("cross")
        row["train s"] = float(g["train_s"].mean())
        if "stereo_epe" in g and g["stereo_epe"].notna().any():  # --data skimage: the stereo pair
            row["stereo EPE px"] = mean_ci(g["stereo_epe"].dropna().astype(float).tolist())
            row["stereo within 8 px"] = mean_ci(g["stereo_within_cell"].dropna().astype(float).tolist())
        out.append(row)
    return pd.DataFrame(out)


def _interval(mean: float, lo: float, hi: float, pct: bool = True) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3g}")
    if math.isnan(lo) or math.isnan(hi):
        return f(mean)  # one seed: no interval (the page says an interval needs two seeds)
    if pct:  # a fraction: the interval is cut to [0, 1], where the metric lives
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return f"{f(mean)} [{f(lo)}, {f(hi)}]" if lo != hi else f(mean)


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The summary as shown: metrics in % with their 95% intervals."""
    shown = pd.DataFrame({"mechanism": table["mechanism"], "seeds": table["seeds"]})
    for m in METRICS:
        shown[f"{m} %"] = [_interval(r[m], r[f"{m} lo"], r[f"{m} hi"]) for _, r in table.iterrows()]
    for c in ("keys/query (cross)", "stack MMACs", "attention MMACs", "latency ms", "peak KiB", "params", "train s"):
        shown[c] = table[c].round(3) if table[c].dtype.kind == "f" else table[c]
    if "stereo EPE px" in table:
        shown["stereo EPE px"] = [
            _interval(*v, pct=False) if isinstance(v, tuple) else "-" for v in table["stereo EPE px"]
        ]
        shown["stereo within 8 px %"] = [
            _interval(*v) if isinstance(v, tuple) else "-" for v in table["stereo within 8 px"]
        ]
    if "cost flags" in table:
        flags = table["cost flags"].fillna("")
        shown["latency ms"] = [f"{v} ({f})" if f else v for v, f in zip(shown["latency ms"], flags, strict=True)]
    return shown


def markdown(table: pd.DataFrame) -> str:
    shown = display(table)
    head = "| " + " | ".join(shown.columns) + " |\n| " + " | ".join("---" for _ in shown.columns) + " |\n"
    return head + "".join("| " + " | ".join(str(v) for v in r) + " |\n" for r in shown.itertuples(index=False))


def accuracy_cost(table: pd.DataFrame) -> go.Figure:
    """AUC@10 and precision against the attention stack's MACs and latency, bars the 95% intervals."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("against multiply-adds", "against CPU latency"))
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, (_, r) in enumerate(table.iterrows()):
        color = palette[i % len(palette)]
        for metric, symbol in (("auc@10", "circle"), ("precision", "diamond")):
            if math.isnan(r[f"{metric} lo"]):  # one seed: no interval to draw
                err = dict(visible=False)
            else:
                lo, hi = max(r[f"{metric} lo"], 0.0), min(r[f"{metric} hi"], 1.0)  # the metric's range
                err = dict(type="data", symmetric=False, array=[hi - r[metric]], arrayminus=[r[metric] - lo])
            for col, x in ((1, r["stack MMACs"]), (2, r["latency ms"])):
                fig.add_trace(
                    go.Scatter(
                        x=[x],
                        y=[r[metric]],
                        error_y=err,
                        mode="markers",  # names in the legend: labels of close points would overlap
                        text=[esc(r["mechanism"])],
                        hoverinfo="text+x+y",
                        marker=dict(color=color, symbol=symbol, size=11),
                        name=f"{esc(r['mechanism'])} {metric}",
                        legendgroup=str(r["mechanism"]),
                        showlegend=col == 1,
                    ),  # fmt: skip
                    row=1,
                    col=col,
                )
    fig.update_xaxes(title_text="MMACs of the attention stack per pair (FLOPs = 2 x MACs)", row=1, col=1)
    fig.update_xaxes(title_text="latency of the attention stack, ms (median)", row=1, col=2)
    fig.update_yaxes(
        title_text="held-out AUC@10 px (circles), precision (diamonds)", tickformat=".0%", range=accuracy_range(table)
    )
    fig.update_layout(template="plotly_white", height=460, margin=dict(l=60, r=20, t=60, b=50))
    return fig


def accuracy_range(table: pd.DataFrame) -> list[float]:
    """The accuracy axis from 0 (no metric is below it) to a little above the highest value or interval end."""
    tops = [0.0]
    for metric in ("auc@10", "precision"):
        for col in (metric, f"{metric} hi"):
            tops += [min(float(v), 1.0) for v in table[col] if not math.isnan(float(v))]
    top = max(tops)
    return [0.0, 0.1 if top <= 0 else min(1.05, top * 1.15)]


def _heat(weights: list[list[float]], scale: float, name: str) -> go.Heatmap:
    """One panel's weights on its own colour scale; :func:`panel_colorbars` gives it its own bar."""
    return go.Heatmap(
        z=weights, x0=(scale - 1) / 2, dx=scale, y0=(scale - 1) / 2, dy=scale, colorscale="Viridis",
        opacity=0.72 if scale > 1 else 1.0, showscale=True, name=name,
        hovertemplate="key (%{y:.0f}, %{x:.0f}) px: weight %{z:.4f}<extra></extra>",
    )  # fmt: skip


def panel_colorbars(fig: go.Figure) -> None:
    """A colour bar beside every heat map of weights, as tall as its panel: each panel is scaled on its own
    (Swin's in-window weights are ten times full attention's), so one bar for all would misread most of them."""
    for trace in fig.data:
        if not isinstance(trace, go.Heatmap) or not trace.showscale:
            continue
        xa = fig.layout["xaxis" + (trace.xaxis or "x")[1:]]
        ya = fig.layout["yaxis" + (trace.yaxis or "y")[1:]]
        x1, (y0, y1) = xa.domain[1], ya.domain
        trace.colorbar = dict(
            x=x1 + 0.004, xanchor="left", y=(y0 + y1) / 2, yanchor="middle", len=y1 - y0, thickness=8,
            tickfont=dict(size=8), nticks=4, exponentformat="e",
        )  # fmt: skip


def _image(img: list[list[float]]) -> go.Heatmap:
    return go.Heatmap(z=img, colorscale="Greys", reversescale=True, showscale=False, hoverinfo="skip")


def footprint_figure(fps: list[dict[str, Any]], table: pd.DataFrame) -> go.Figure | None:
    """Rows: mechanisms (seed 0); columns: the last self and last cross block, at initialisation and trained.

    Self attention over image 0 (the query marked), cross attention over image 1 (the true match marked)."""
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in fps:
        if rec["seed"] == 0:
            chosen[(rec["mechanism"], rec["state"])] = rec
    mechs = [m for m in table["mechanism"] if (m, "trained") in chosen]
    if not mechs:
        return None
    cols = [("self", "init"), ("self", "trained"), ("cross", "init"), ("cross", "trained")]
    kpq = dict(zip(table["mechanism"], table["keys/query (cross)"], strict=True))
    macs = dict(zip(table["mechanism"], table["attention MMACs"], strict=True))
    titles = []
    for m in mechs:
        for kind, state in cols:
            blocks = [b for b in chosen[(m, state)]["blocks"] if b["kind"] == kind] if (m, state) in chosen else []
            keys = blocks[-1]["keys_per_query"] if blocks else "-"
            titles.append(f"{esc(m)} {kind}, {'at init' if state == 'init' else 'trained'}: {keys} keys/query")
    fig = make_subplots(rows=len(mechs), cols=4, subplot_titles=titles, horizontal_spacing=0.07, vertical_spacing=0.06)
    for r, m in enumerate(mechs, start=1):
        for c, (kind, state) in enumerate(cols, start=1):
            if (m, state) not in chosen:
                continue
            rec = chosen[(m, state)]
            blocks = [b for b in rec["blocks"] if b["kind"] == kind]
            if not blocks:
                continue
            b = blocks[-1]
            img = rec["image0"] if kind == "self" else rec["image1"]
            fig.add_trace(_image(img), row=r, col=c)
            fig.add_trace(_heat(b["weights"], STRIDE, f"{m} {kind} {state}"), row=r, col=c)
            qi, qj = b["query"]
            if kind == "self":
                px, py, label = qj * STRIDE + 3.5, qi * STRIDE + 3.5, "query"
            elif rec["gt"] >= 0:
                w = rec["coarse_hw"][1]
                px, py, label = (rec["gt"] % w) * STRIDE + 3.5, (rec["gt"] // w) * STRIDE + 3.5, "true match"
            else:
                continue
            fig.add_trace(
                go.Scatter(x=[px], y=[py], mode="markers", marker=dict(symbol="x", size=10, color="red"),
                           name=label, showlegend=False, hovertemplate=label + "<extra></extra>"),
                row=r, col=c,
            )  # fmt: skip
        keys = "" if pd.isna(kpq[m]) else f", {kpq[m]} keys (cross)"  # an isolated stack has no cross block
        fig.layout.annotations[(r - 1) * 4].text += f"<br>attention {macs[m]:.2f} MMACs per pair{keys}"
    fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor=None)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(template="plotly_white", height=270 * len(mechs) + 80, margin=dict(l=20, r=50, t=60, b=20))
    panel_colorbars(fig)
    fig.update_annotations(font_size=11)
    return fig


def _page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [Section(sid, t, [html]) for sid, t, html in sections]
    return document(title, f"{subtitle} · generated {generated}", parts)


def build_report(run_dir: str | Path) -> str:
    df, fps, env = load(run_dir)
    if df.empty:
        sections = [("none", "matching", '<p class="empty">no finished runs in this directory yet</p>')]
        return _page("attnbench matching", str(run_dir), sections)
    table = summary(df)
    first = df.iloc[0]
    # Rows with a stem field come from the version that evaluates every run on one held-out set; older rows
    # drew their held-out pairs per seed
    newer = "stem" in df and isinstance(first.get("stem"), str)
    held_out = "(the same for every run)" if newer else "per seed"
    stem = f", stem {esc(first['stem'])}" if newer else ""
    setup = (
        f"{int(first['image_height'])} px image pairs ({esc(first['data'])}), coarse map {int(first['height'])}x"
        f"{int(first['width'])} (stride {STRIDE}), width {int(first['dim'])}, {int(first['heads'])} heads, layers "
        f"{esc(' / '.join(first['layers']))}; {int(first['epochs'])} epochs on {int(first['train_pairs'])} pairs, "
        f"held out {int(first['val_pairs'])} pairs {held_out}; preset {esc(first['preset'])}{stem}."
    )
    cpu = esc(env.get("cpu_model", "?"))
    notes = (
        f'<p class="note">{setup} Precision: matches (mutual nearest neighbours of the dual softmax) whose cell '
        "of image 1 holds the true projection of their cell's centre; chance is one cell in "
        f"{int(first['tokens'])}. AUC: area under the curve of the mean corner error of kornia's RANSAC "
        "homography from the matched cell centres, up to 3, 5 and 10 px. Brackets: 95% Student t intervals "
        f"over seeds, cut to [0, 100]%; an interval needs two seeds or more, so a mechanism run with one seed shows "
        f"its value alone. Cost: the attention stack on one pair, batch 1, float32, CPU ({cpu}, "
        f"{esc(first['threads'])} thread(s)), forward only; stack MMACs counted by bench.flops (projections, MLPs "
        "and norms too), attention MMACs the mechanisms' analytic counts; latency and peak memory as bench "
        f"measures a CPU point (bench.measure.measure_module). {esc(conditions(df.to_dict('records')))}</p>"
    )
    fp_fig = footprint_figure(fps, table)
    fp_html = (
        _fig_html(fp_fig, "footprint-figure")
        + '<p class="note">Head-mean weights of the centre query of image 0 in the first held-out pair (seed 0), '
        "at the last self block (over image 0, the query marked) and the last cross block (over image 1, its true "
        "match marked), before and after training. Each panel is coloured on its own scale, read on the colour bar "
        "beside it (weights differ tenfold between mechanisms). Pooled, reduced or sampled keys "
        "are spread over the pixels they are made from (attentions/footprint.py).</p>"
        if fp_fig is not None
        else '<p class="empty">no footprints recorded</p>'
    )
    sections = [
        ("controls", "controls, power and ranking", controls_html(df)),
        ("accuracy", "accuracy against the cost of cross attention", notes + table_html(display(table))),
        ("figure", "accuracy and cost", _fig_html(accuracy_cost(table), "accuracy-cost-figure")),
        ("footprints", "where one query looks", fp_html),
    ]
    return _page("attnbench matching", f"{run_dir} · {len(df)} runs", sections)


def controls_html(df: pd.DataFrame) -> str:
    """The controls' verdict, the smallest detectable difference and the ranking with ties (reports.controls)
    on AUC@10. Controls are runs named MECHANISM.twin (negative), MECHANISM.isolated or MECHANISM.self-only
    (positive), set against MECHANISM. Precision is shown, not judged: it counts only the confident mutual
    matches, so a matcher that finds fewer of them can be as precise as a better one."""
    from attnbench.reports.controls import verdict_html
    from attnbench.studies.controls import POSITIVE_CONTROLS

    mechs = list(dict.fromkeys(df["mechanism"]))
    twins = {m: m.split(".")[0] for m in mechs if m.endswith(".twin")}
    positives = {m: m.split(".")[0] for m in mechs if m.partition(".")[2] in POSITIVE_CONTROLS}
    samples = {m: g["auc@10"].astype(float).tolist() for m, g in df.groupby("mechanism", sort=False)}
    html, _ = verdict_html(samples, twins, positives, unit="AUC@10 points", what="AUC@10")
    per_pair = df.groupby("mechanism", sort=False)["matches_per_pair"].mean()
    fewest, most = per_pair.idxmin(), per_pair.idxmax()
    note = (
        "The verdict and the ranking are on AUC@10: the homography from all of a pair's matches, so it rewards "
        "matches that are both many and right. Coarse precision (in the table) is not judged: it counts only "
        "the mutual matches above the confidence threshold, so a matcher that dares fewer of them can be as "
        f"precise as a better one (here {fewest} makes {per_pair[fewest]:.1f} matches per pair, {most} "
        f"{per_pair[most]:.1f})."
    )
    return f'<h3>AUC@10</h3>{html}<p class="note">{esc(note)}</p>'


def write_report(run_dir: str | Path) -> Path:
    from attnbench.bench.store import write_atomic

    path = Path(run_dir) / "report.html"
    write_atomic(path, build_report(run_dir))
    return path


def _image_footprints(panels: list[dict[str, Any]]) -> go.Figure:
    """(H, W) maps: one heat map per mechanism, four to a row, each on its own colour scale."""
    n = len(panels)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    titles = [
        f"{esc(p['mechanism'])} ({p['kind']}): {p['keys_per_query']} keys/query, {p['macs'] / 1e6:.2f} MMACs"
        for p in panels
    ]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08, vertical_spacing=0.1)
    for k, p in enumerate(panels):
        r, c = k // cols + 1, k % cols + 1
        fig.add_trace(_heat(p["weights"], 1, p["mechanism"]), row=r, col=c)
        if p["kind"] == "self":
            qi, qj = p["query"]
            fig.add_trace(
                go.Scatter(x=[qj], y=[qi], mode="markers", marker=dict(symbol="x", size=10, color="red"),
                           showlegend=False, hovertemplate="query<extra></extra>"),
                row=r, col=c,
            )  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(template="plotly_white", height=330 * rows + 60, margin=dict(l=30, r=50, t=60, b=30))
    panel_colorbars(fig)
    fig.update_annotations(font_size=11)
    return fig


STRIP_WIDTH = 1300  # px the page gives a figure (its main column is at most 1500 px): sizes a strip's rows


def clip_footprints(panels: list[dict[str, Any]]) -> go.Figure:
    """(T, H, W) clips as strips of frames: a row per mechanism, one heat map per frame t = 0 .. T-1 side by
    side, all frames of a row on one colour scale (from 0 to the row's largest weight, its bar beside the last
    frame), the query marked in its own frame."""
    frames, height, width = panels[0]["query_hw"]
    gap = 0.1 / frames  # between frames, a tenth of the row in all
    side = STRIP_WIDTH * (1 - 0.1) / frames  # px of one frame's panel
    row_px = min(360.0, max(90.0, side * height / width))  # pixels about square, rows neither tiny nor huge
    head_px = 54  # above every row: the mechanism's line and the frames' t = labels
    total = len(panels) * (row_px + head_px) + 40
    titles = [f"t={t}" for _ in panels for t in range(frames)]
    fig = make_subplots(
        rows=len(panels), cols=frames, subplot_titles=titles, horizontal_spacing=gap,
        vertical_spacing=head_px / total if len(panels) > 1 else 0.0,
    )  # fmt: skip
    for r, p in enumerate(panels, start=1):
        top = max((w for frame in p["weights"] for line in frame for w in line), default=0.0) or 1.0
        for t, frame in enumerate(p["weights"]):
            heat = _heat(frame, 1, f"{p['mechanism']} t={t}")
            hover = f"t={t}, key (%{{y:.0f}}, %{{x:.0f}}): weight %{{z:.4f}}<extra></extra>"
            heat.update(zmin=0.0, zmax=top, showscale=t == frames - 1, hovertemplate=hover)
            fig.add_trace(heat, row=r, col=t + 1)
        if p["kind"] == "self":
            qt, qi, qj = p["query"]
            fig.add_trace(
                go.Scatter(x=[qj], y=[qi], mode="markers", marker=dict(symbol="x", size=10, color="red"),
                           showlegend=False, hovertemplate=f"query, t={qt}<extra></extra>"),
                row=r, col=qt + 1,
            )  # fmt: skip
    fig.update_annotations(font_size=11)  # the frames' t = labels; the rows' lines below are larger
    for r, p in enumerate(panels, start=1):
        y_top = fig.layout["yaxis" + ("" if r == 1 else str((r - 1) * frames + 1))].domain[1]
        fig.add_annotation(
            text=f"<b>{esc(p['mechanism'])}</b> ({p['kind']}): {p['keys_per_query']} keys/query, "
            f"{p['macs'] / 1e6:.2f} MMACs; one colour scale for its {frames} frames",
            xref="paper", yref="paper", x=0.0, y=y_top, xanchor="left", yanchor="bottom", yshift=20,
            showarrow=False, font_size=13,
        )  # fmt: skip
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(template="plotly_white", height=total, margin=dict(l=20, r=60, t=head_px, b=20))
    panel_colorbars(fig)
    return fig


def write_footprint_page(panels: list[dict[str, Any]], out: str | Path) -> Path:
    """``attnbench footprint``: one heat map per mechanism (a strip of frames on a clip), keys read per query and
    MACs beside it."""
    clip = bool(panels) and len(panels[0]["query_hw"]) == 3
    fig = clip_footprints(panels) if clip else _image_footprints(panels)
    q = ", ".join(map(str, panels[0]["query"])) if panels else "?, ?"
    hw = "x".join(map(str, panels[0]["query_hw"])) if panels else "?x?"
    rows_html = pd.DataFrame(
        [{"mechanism": p["mechanism"], "kind": p["kind"], "keys/query": p["keys_per_query"],
          "MMACs": round(p["macs"] / 1e6, 3), "knobs": json.dumps(p["knobs"])} for p in panels]
    )  # fmt: skip
    if clip:
        note = (
            f'<p class="note">Query pixel (t, i, j) = ({q}) of a {hw} (T x H x W) clip of tokens; each row is one '
            "mechanism's head-mean weight every key pixel receives, drawn as a strip of its frames t = 0, 1, ..., "
            "freshly initialised weights on random tokens; the query is marked in its own frame. The frames of a "
            "row share one colour scale, from 0 to the row's largest weight (its bar beside the last frame), so the "
            "frames can be compared; the rows have their own. MACs: the analytic count of one forward call "
            "(FLOPs = 2 x MACs).</p>"
        )
    else:
        note = (
            f'<p class="note">Query pixel ({q}) of a {hw} token map; each map is the head-mean '
            "weight every key pixel receives, freshly initialised weights on random tokens. Each panel has its own "
            "colour scale, read on the bar beside it. MACs: the analytic count "
            "of one forward call (FLOPs = 2 x MACs).</p>"
        )
    html = _page(
        "attnbench footprints",
        f"query ({q}) on {hw}",
        [("fp", "footprints", note + _fig_html(fig, "footprint-figure") + table_html(rows_html))],
    )
    from attnbench.bench.store import write_atomic

    path = Path(out)
    write_atomic(path, html)
    return path
