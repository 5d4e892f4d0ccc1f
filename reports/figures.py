"""Plotly figures of a report, one builder per section.

Every builder returns a figure, or None when the data hold nothing for it (the
page then says why instead of drawing an empty plot). All text taken from the
results goes through :func:`esc` before it reaches plotly, so a mechanism or
knob value such as ``<script>`` is shown as text.
"""

from __future__ import annotations

import html
import math
import zlib
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from attnbench.reports.analysis import (
    DEFAULT_IMPL,
    METRIC_SCALE,
    METRICS,
    Baseline,
    References,
    as_baseline,
    exponents,
    fit,
    in_side,
    is_gpu,
    with_baseline,
)
from attnbench.reports.data import OVERHEAD_FACTOR, resolution_text
from plotly.colors import qualitative
from plotly.subplots import make_subplots

PASS_ORDER = ["fwd", "fwd+bwd"]
PALETTE = qualitative.Plotly + qualitative.Dark24 + qualitative.Light24
# One colour per mechanism, fixed by its name so that it is the same in every report: the Okabe-Ito
# palette (distinct under the common colour-vision deficiencies), black for full attention, the usual
# baseline. Other names take a colour of Paul Tol's muted palette by a hash of the name.
MECHANISM_COLORS = {
    "full": "#000000",
    "linear": "#E69F00",
    "pvt": "#56B4E9",
    "swin": "#009E73",
    "quadtree": "#D55E00",
    "deformable": "#0072B2",
    "pooling": "#CC79A7",
    "cross": "#999999",
}
EXTRA_COLORS = ["#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499"]
# At most this many curves are drawn at first; the rest (other impls, further knob settings) wait in the legend.
MAX_SHOWN = 10
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "cross", "star", "pentagon"]
FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12}


def esc(text: Any) -> str:
    """Escape results text for plotly labels: HTML entities, newlines as <br>."""
    return html.escape(str(text), quote=False).replace("\n", "<br>")


def mechanism_color(name: str) -> str:
    """The colour of a mechanism, the same in every report."""
    return MECHANISM_COLORS.get(name) or EXTRA_COLORS[zlib.crc32(name.encode("utf-8")) % len(EXTRA_COLORS)]


def colors(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """A stable style per series, shared by every figure of a report: the mechanism's colour, a dash per
    knob setting, implementation or run within it, and whether the curve is drawn at first.

    Drawn at first: the fast implementation (a mechanism's only one where it has no fast one), up to
    :data:`MAX_SHOWN` curves; the others are listed in the legend, a click away.
    """
    styles: dict[str, dict[str, Any]] = {}
    if df.empty:
        return styles
    pairs = df[["mechanism", "series", "impl"]].drop_duplicates("series")
    shown_impl = {}
    for mech, g in pairs.groupby("mechanism"):
        impls = sorted(set(g["impl"]))
        shown_impl[mech] = DEFAULT_IMPL if DEFAULT_IMPL in impls else impls[0]
    pairs = pairs.assign(_default=[shown_impl[m] == i for m, i in zip(pairs["mechanism"], pairs["impl"], strict=True)])
    pairs = pairs.sort_values(["mechanism", "_default", "series"], ascending=[True, False, True])
    n_shown = 0
    for mech, g in pairs.groupby("mechanism", sort=True):
        for i, (series, default) in enumerate(zip(g["series"], g["_default"], strict=True)):
            visible = bool(default) and n_shown < MAX_SHOWN
            n_shown += visible
            styles[str(series)] = {
                "color": mechanism_color(str(mech)),
                "dash": DASHES[i % len(DASHES)],
                "visible": True if visible else "legendonly",
            }
    return styles


def _line(palette: dict[str, dict[str, Any]], series: Any) -> dict[str, str]:
    style = palette.get(str(series), {})
    return {k: style[k] for k in ("color", "dash") if k in style}


def _visible(palette: dict[str, dict[str, Any]], series: Any) -> bool | str:
    return palette.get(str(series), {}).get("visible", True)


def _symbols(points: pd.DataFrame, flag: str = "overhead_bound", base: str = "circle") -> list[str]:
    """Open markers for flagged points (overhead-bound, launch-bound), filled otherwise."""
    return [f"{base}-open" if v else base for v in points[flag]] if flag in points.columns else [base] * len(points)


def _legend_height(n_entries: int, base: int = 460) -> int:
    """Room for the plot plus the legend below it (about three entries to a row)."""
    return base + 24 * math.ceil(n_entries / 3)


def passes(df: pd.DataFrame) -> list[str]:
    present = [str(p) for p in df["pass"].unique()]
    return [p for p in PASS_ORDER if p in present] + sorted(p for p in present if p not in PASS_ORDER)


def _tick_label(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _log_ticks(values: list[float], measured: bool) -> list[float]:
    """Tick positions for a log axis: the measured values themselves (when few), else 1-2-5 steps."""
    distinct = sorted(set(values))
    if measured and 2 <= len(distinct) <= 10:
        return distinct
    lo, hi = distinct[0], distinct[-1]
    ticks = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**k
            if lo / 1.5 <= v <= hi * 1.5:
                ticks.append(v)
    if len(ticks) < 3:  # less than a decade of data: finer steps
        ticks = [
            m * 10.0**k
            for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
            for m in (1, 1.5, 2, 3, 4, 5, 6, 8)
            if lo / 1.2 <= m * 10.0**k <= hi * 1.2
        ]
    return ticks


def _label_log_axes(fig: go.Figure, measured_x: bool = False) -> None:
    """Replace plotly's bare-digit minor labels on log axes (\"2\", \"5\") with full numbers.

    ``measured_x`` puts the x ticks at the measured values (resolutions, batch sizes) when there are few.
    """
    data: dict[str, list[float]] = {}
    for tr in fig.data:
        for axis, values in (("x", getattr(tr, "x", None)), ("y", getattr(tr, "y", None))):
            ref = getattr(tr, f"{axis}axis", None) or axis
            name = f"{axis}axis{ref[1:]}"
            for v in values if values is not None else []:
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
                    data.setdefault(name, []).append(float(v))
    for name, values in data.items():
        axis = fig.layout[name]
        if axis.type != "log" or not values:
            continue
        ticks = _log_ticks(values, measured=measured_x and name.startswith("x"))
        axis.update(tickmode="array", tickvals=ticks, ticktext=[_tick_label(t) for t in ticks])


def _layout(
    fig: go.Figure, title: str, height: int = 460, notes: tuple[str, ...] = (), split: bool = True
) -> go.Figure:
    """Common layout. The title's first parenthesis (with ``split``) and the ``notes`` go on small lines
    below it, so that a narrow window does not cut them off."""
    head, sep, rest = title.partition(" (") if split else (title, "", "")
    lines = [head] + ([f"({rest}"] if sep else []) + [n for n in notes if n]
    text = esc(lines[0]) + "".join(f"<br><sup>{esc(line)}</sup>" for line in lines[1:])
    fig.update_layout(
        title={"text": text, "x": 0.0, "xanchor": "left", "font": {"size": 15}},
        template="plotly_white",
        font=FONT,
        height=height,
        margin={"l": 60, "r": 20, "t": 60 + 16 * len(lines), "b": 50},
        # Below the plot, wrapping into rows: the panels keep the page's width on a narrow screen too.
        legend={
            "font": {"size": 11},
            "groupclick": "togglegroup",
            "orientation": "h",
            "yanchor": "top",
            "y": -0.16,
            "x": 0,
        },
        hoverlabel={"align": "left", "font": {"size": 11}},
    )
    return fig


OPEN_NOTE = f"open markers: latency within {OVERHEAD_FACTOR:g}x of the per-call overhead, left out of fits"


def _hover(points: pd.DataFrame) -> list[str]:
    return [esc(h) for h in points["hover"]]


HOVER = "%{customdata}<extra></extra>"


def _curve(
    points: pd.DataFrame,
    x: Any,
    y: Any,
    series: Any,
    palette: dict[str, dict[str, Any]],
    *,
    name: str | None = None,
    showlegend: bool = True,
    symbols: Any = "circle",
    hover: list[str] | None = None,
    template: str = HOVER,
) -> go.Scatter:
    """One series' line in its report-wide style (colour, dash, drawn or in the legend), hover per point."""
    return go.Scatter(
        x=x,
        y=y,
        mode="lines+markers",
        name=esc(series if name is None else name),
        legendgroup=esc(series),
        showlegend=showlegend,
        line=_line(palette, series),
        visible=_visible(palette, series),
        marker={"symbol": symbols, "size": 7},
        customdata=_hover(points) if hover is None else hover,
        hovertemplate=template,
    )


def scaling(
    df: pd.DataFrame, side: dict[str, Any] | References, metric: str, palette: dict[str, dict[str, str]]
) -> go.Figure | None:
    """``metric`` against tokens, log-log, one line per series, one panel per pass, exponents in the legend."""
    ok = in_side(df[df["status"] == "ok"], side).dropna(subset=[metric])
    ok = ok[ok[metric] > 0]
    if ok.empty or ok["tokens"].nunique() < 2:
        return None
    pss = passes(ok)
    if metric == "flops":
        # FLOPs are counted for the forward pass whatever the timed pass: one panel.
        ok = ok.drop_duplicates(["series", "tokens"]).assign(**{"pass": "forward"})
        pss = ["forward"]
    fig = make_subplots(rows=1, cols=len(pss), subplot_titles=[esc(p) for p in pss], horizontal_spacing=0.08)
    scale = METRIC_SCALE[metric]
    fits = exponents(ok, metric)
    for series, g in ok.groupby("series", sort=True):
        present = [p for p in pss if (g["pass"] == p).any()]
        name = f"{series}  ~N^" + " / ".join(fits[(str(series), p)].text() for p in present)
        for col, p in enumerate(pss, 1):
            gp = g[g["pass"] == p].sort_values("tokens")
            if gp.empty:
                continue
            symbols = _symbols(gp) if metric == "latency_ms_median" else "circle"
            shown = col == 1 or not (g["pass"] == pss[0]).any()
            fig.add_trace(
                _curve(
                    gp, gp["tokens"], gp[metric] * scale, series, palette, name=name, showlegend=shown, symbols=symbols
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(type="log", title_text="tokens N = H x W")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text=METRICS[metric], row=1, col=1)
    legend_note = "exponent per pass: " + " / ".join(pss)
    _label_log_axes(fig, measured_x=True)
    n = ok["series"].nunique()
    bound = metric == "latency_ms_median" and ok["overhead_bound"].any()
    notes = (f"log-log; legend: fitted N^exponent, {legend_note}", OPEN_NOTE if bound else "")
    _layout(fig, f"{METRICS[metric]} against tokens", _legend_height(n), notes, split=False)
    return fig


def speedup(
    df: pd.DataFrame,
    side: dict[str, Any] | References,
    baseline: str | Baseline,
    palette: dict[str, dict[str, Any]],
) -> go.Figure | None:
    """Speed-up and memory ratio against the declared baseline over tokens; above 1 means better than it."""
    baseline = as_baseline(baseline, df)
    ctx = with_baseline(in_side(df, side), baseline)
    ctx = ctx[~baseline.mask(ctx) & (ctx["status"] == "ok") & (ctx["base_status"] == "ok")]
    if ctx.empty:
        return None
    pss = passes(ctx)
    titles = [esc(f"{what}, {p}") for what in ("speed-up", "memory ratio") for p in pss]
    fig = make_subplots(rows=2, cols=len(pss), subplot_titles=titles, vertical_spacing=0.14, horizontal_spacing=0.08)
    ctx = ctx.assign(bound=ctx["overhead_bound"] | ctx["base_overhead_bound"])
    for series, g in ctx.groupby("series", sort=True):
        first = True
        for row, col_name, what in ((1, "speedup", "faster"), (2, "mem_ratio", "smaller")):
            for col, p in enumerate(pss, 1):
                gp = g[g["pass"] == p].dropna(subset=[col_name]).sort_values("tokens")
                if gp.empty:
                    continue
                template = f"%{{y:.3g}}x {what} than {esc(baseline.label)} (below 1: 1/y x the other way)<br>" + HOVER
                symbols = _symbols(gp, "bound") if row == 1 else "circle"
                fig.add_trace(
                    _curve(
                        gp,
                        gp["tokens"],
                        gp[col_name],
                        series,
                        palette,
                        showlegend=first,
                        symbols=symbols,
                        template=template,
                    ),
                    row=row,
                    col=col,
                )
                first = False
    for row in (1, 2):
        for col in range(1, len(pss) + 1):
            fig.add_hline(y=1.0, line={"color": "#555", "width": 1, "dash": "dot"}, row=row, col=col)
    fig.update_xaxes(type="log", title_text="tokens N = H x W", row=2)
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text=esc(f"x faster than {baseline.label}"), row=1, col=1)
    fig.update_yaxes(title_text=esc(f"x smaller than {baseline.label}"), row=2, col=1)
    _label_log_axes(fig, measured_x=True)
    title = f"against {baseline.label} (above the dotted line: faster, top, or smaller, bottom)"
    _layout(fig, title, _legend_height(ctx["series"].nunique(), 700), (OPEN_NOTE if ctx["bound"].any() else "",))
    return fig


def bound(
    df: pd.DataFrame,
    side: dict[str, Any] | References,
    baseline: str | Baseline,
    palette: dict[str, dict[str, Any]],
) -> go.Figure | None:
    """Share of the MAC promise realised against tokens: measured speed-up over the baseline divided by the
    speed-up its MACs promise (baseline MACs / its MACs), where it promises one; 100% is the bound."""
    baseline = as_baseline(baseline, df)
    ctx = with_baseline(in_side(df, side), baseline)
    ctx = ctx[~baseline.mask(ctx) & (ctx["status"] == "ok")].dropna(subset=["realised"])
    if ctx.empty:
        return None
    pss = passes(ctx)
    fig = make_subplots(rows=1, cols=len(pss), subplot_titles=[esc(p) for p in pss], horizontal_spacing=0.08)
    for series, g in ctx.groupby("series", sort=True):
        first = True
        for col, p in enumerate(pss, 1):
            gp = g[g["pass"] == p].sort_values("tokens")
            if gp.empty:
                continue
            text = [
                esc(f"{r['speedup']:.3g}x measured of {r['promised']:.3g}x promised = {100 * r['realised']:.3g}%")
                for r in gp.to_dict("records")
            ]
            hover = [f"{t}<br>{h}" for t, h in zip(text, _hover(gp), strict=True)]
            fig.add_trace(
                _curve(
                    gp,
                    gp["tokens"],
                    100 * gp["realised"],
                    series,
                    palette,
                    showlegend=first,
                    symbols=_symbols(gp),
                    hover=hover,
                ),
                row=1,
                col=col,
            )
            first = False
        for col in range(1, len(pss) + 1):
            fig.add_hline(y=100.0, line={"color": "#555", "width": 1, "dash": "dot"}, row=1, col=col)
    fig.update_xaxes(type="log", title_text="tokens N = H x W")
    fig.update_yaxes(type="log", title_text=esc(f"% of the speed-up over {baseline.label} its MACs promise"), col=1)
    fig.update_yaxes(type="log")
    _label_log_axes(fig, measured_x=True)
    title = f"how close to its bound (measured / MAC-promised speed-up over {baseline.label}; dotted: 100%)"
    _layout(fig, title, _legend_height(ctx["series"].nunique()))
    return fig


def crossover_chart(
    table: pd.DataFrame, baseline: str | Baseline, palette: dict[str, dict[str, Any]]
) -> go.Figure | None:
    """Each series' crossover map against the baseline, faster from (circle) and smaller from (square), a
    panel per pass. Outside the measured maps, slots on the axis say "never" (not in range), "always"
    (already at the smallest map) and "too few" (too few points to tell)."""
    if table.empty:
        return None
    table = table[table["faster_kind"] != "none"]
    shown = table[[_visible(palette, s) is True for s in table["series"]]]
    table = shown if not shown.empty else table
    ranges = [r for col in ("faster_range", "smaller_range") for r in table[col] if isinstance(r, tuple)]
    if not ranges:
        return None
    label = str(baseline.label if isinstance(baseline, Baseline) else baseline)
    lo, hi = math.sqrt(min(r[0] for r in ranges)), math.sqrt(max(r[1] for r in ranges))
    kinds = set(table["faster_kind"]) | set(table["smaller_kind"])
    left_slots = [k for k in ("always", "few") if k in kinds]  # only the slots in use, "always" nearest the maps
    slots = {"never": hi * 1.6, **{k: lo / 1.6 ** (i + 1) for i, k in enumerate(left_slots)}}
    slot_text = {"never": "never", "always": "always", "few": "too few"}
    pss = passes(table)
    order = sorted(table["series"].unique(), reverse=True)
    fig = make_subplots(rows=1, cols=len(pss), subplot_titles=[esc(p) for p in pss], shared_yaxes=True)
    used = set()
    for col, p in enumerate(pss, 1):
        for what, kind_col, tok_col, text_col, symbol, offset in (
            ("faster", "faster_kind", "faster_tokens", "faster_than_baseline", "circle", 0.2),
            ("smaller", "smaller_kind", "smaller_tokens", "smaller_than_baseline", "square", -0.2),
        ):
            xs, ys, colors_, symbols, hovers = [], [], [], [], []
            for r in table[table["pass"] == p].to_dict("records"):
                kind = r[kind_col]
                if kind in ("from", "mixed", "until"):
                    x = math.sqrt(r[tok_col])
                elif kind in slots:
                    x = slots[kind]
                    used.add(kind)
                else:
                    continue
                xs.append(x)
                ys.append(order.index(r["series"]) + offset)
                colors_.append(palette.get(str(r["series"]), {}).get("color", "#444"))
                symbols.append(symbol if kind in ("from", "mixed", "always") else f"{symbol}-open")
                hovers.append(esc(f"{r['series']}, {p}: {what} than {label} {r[text_col]}"))
            if not xs:
                continue
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="markers",
                    name=esc(f"{what} from"),
                    legendgroup=what,
                    showlegend=col == 1,
                    marker={"color": colors_, "symbol": symbols, "size": 10, "line": {"width": 2, "color": colors_}},
                    customdata=hovers,
                    hovertemplate=HOVER,
                ),
                row=1,
                col=col,
            )
    if not fig.data:
        return None
    inside = [t for t in _log_ticks([lo, hi], measured=False) if lo / 1.05 <= t <= hi * 1.05]
    inside = sorted({t for t in inside if lo * 1.15 <= t <= hi / 1.15} | {lo, hi})
    ticks = [(slots[k], slot_text[k]) for k in ("few", "always") if k in used and k in slots]
    ticks += [(t, f"{t:.0f}") for t in inside] + ([(slots["never"], "never")] if "never" in used else [])
    left = min(x for x, _ in ticks) / 1.25
    fig.update_xaxes(
        type="log",
        title_text="map side H = W",
        tickmode="array",
        tickvals=[x for x, _ in ticks],
        ticktext=[t for _, t in ticks],
        range=[math.log10(left), math.log10(max(slots["never"], hi) * 1.25)],
        tickangle=0,
    )
    for x0, x1 in ((left, lo / 1.25), (hi * 1.25, slots["never"] * 1.25)):
        fig.add_vrect(x0=x0, x1=x1, fillcolor="#eef0f4", line_width=0, layer="below", row=1, col="all")
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(order))), ticktext=[esc(s) for s in order])
    fig.update_yaxes(range=[-0.6, len(order) - 0.4])
    title = f"crossover maps against {label} (circle: faster from, square: smaller from)"
    _layout(fig, title, max(280, 120 + 38 * len(order)))
    fig.update_layout(showlegend=False)  # the title says which marker is which
    return fig


def knob_sensitivity(
    df: pd.DataFrame, side: dict[str, Any] | References, mechanism: str, knob: str, values: list[Any]
) -> go.Figure | None:
    """Latency, FLOPs and memory of one mechanism against one of its knobs, a line per resolution and pass.

    The mechanism's other knobs are held at their most common setting.
    """
    from attnbench.reports.data import knob_value_label, knobs_label

    ok = in_side(df[(df["status"] == "ok") & (df["mechanism"] == mechanism)], side)
    if ok.empty:
        return None
    others = [{k: v for k, v in kn.items() if k != knob} for kn in ok["knobs"] if knob in kn]
    if not others:
        return None
    keyed = pd.Series([knobs_label(o) for o in others])
    held = keyed.mode().iloc[0]
    ok = ok[[knob in kn and knobs_label({k: v for k, v in kn.items() if k != knob}) == held for kn in ok["knobs"]]]
    ok = ok.assign(knob_value=[knob_value_label(kn[knob]) for kn in ok["knobs"]])
    order = [knob_value_label(v) for v in values]
    if ok["knob_value"].nunique() < 2:
        return None
    metrics = ["latency_ms_median", "flops", "peak_bytes"]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[esc(METRICS[m]) for m in metrics], horizontal_spacing=0.07)
    resolutions = ok.sort_values("tokens")["resolution"].unique().tolist()
    res_color = {r: PALETTE[i % len(PALETTE)] for i, r in enumerate(resolutions)}
    for (res, p), g in ok.groupby(["resolution", "pass"], sort=False):
        if g["knob_value"].nunique() < 2:
            continue
        g = g.assign(rank=[order.index(v) if v in order else len(order) for v in g["knob_value"]]).sort_values("rank")
        for col, m in enumerate(metrics, 1):
            fig.add_trace(
                go.Scatter(
                    x=g["knob_value"],
                    y=g[m] * METRIC_SCALE[m],
                    mode="lines+markers",
                    name=esc(f"{res}, {p}"),
                    legendgroup=esc(f"{res}, {p}"),
                    showlegend=col == 1,
                    line={"color": res_color[res], "dash": DASHES[passes(ok).index(p) % len(DASHES)]},
                    customdata=_hover(g),
                    hovertemplate=HOVER,
                ),
                row=1,
                col=col,
            )
    if not fig.data:
        return None
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=order, title_text=esc(knob))
    fig.update_yaxes(type="log")
    _label_log_axes(fig)
    held_text = held if held != "-" else "none"
    _layout(fig, f"{mechanism}: cost against {knob} (other knobs held at {held_text}; line per resolution, pass)")
    return fig


def numeric_axis(
    df: pd.DataFrame, side: dict[str, Any] | References, axis: str, palette: dict[str, dict[str, str]]
) -> go.Figure | None:
    """Latency and memory against a numeric side axis (batch, dim, heads), log-log with exponents."""
    ctx = in_side(df[df["status"] == "ok"], side, skip=[axis])
    if ctx.empty:
        return None
    # The resolution at which this axis was swept most widely (ties: the reference, then the largest).
    ctx, tokens = _at_swept_resolution(ctx, axis, side)
    if ctx.empty:
        return None
    pss = passes(ctx)
    metrics = ["latency_ms_median", "peak_bytes"]
    titles = [esc(f"{METRICS[m]}, {p}") for m in metrics for p in pss]
    fig = make_subplots(rows=2, cols=len(pss), subplot_titles=titles, vertical_spacing=0.14)
    for series, g in ctx.groupby("series", sort=True):
        exps = {p: fit(gp[axis], gp["latency_ms_median"], gp["overhead_bound"]) for p, gp in g.groupby("pass")}
        name = f"{series}  latency ~{axis}^" + " / ".join(exps[p].text() for p in pss if p in exps)
        first = True
        for row, m in enumerate(metrics, 1):
            for col, p in enumerate(pss, 1):
                gp = g[g["pass"] == p].sort_values(axis)
                if gp.empty:
                    continue
                fig.add_trace(
                    _curve(gp, gp[axis], gp[m] * METRIC_SCALE[m], series, palette, name=name, showlegend=first),
                    row=row,
                    col=col,
                )
                first = False
    fig.update_xaxes(type="log", title_text=esc(axis), row=2)
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    _label_log_axes(fig, measured_x=True)
    title = f"{axis} scaling at {tokens} (log-log; legend: fitted latency exponent per pass)"
    _layout(fig, title, _legend_height(ctx["series"].nunique(), 700))
    return fig


def _at_swept_resolution(ctx: pd.DataFrame, axis: str, side: Any) -> tuple[pd.DataFrame, str]:
    """Per run, the rows at the resolution where ``axis`` took the most values (ties: the reference, then the
    largest), keeping only the curves that take two values or more; and that resolution as text."""
    parts, where = [], []
    for run, g in ctx.groupby("run", sort=True):
        spread = g.groupby("tokens")[axis].nunique()
        if spread.empty or spread.max() < 2:
            continue
        best = spread[spread == spread.max()].index.tolist()
        ref = side.get(run) if isinstance(side, References) else None
        tokens = ref.tokens if ref is not None and ref.tokens in best else max(best)
        parts.append(g[g["tokens"] == tokens])
        where.append(f"{tokens:.0f} tokens" + (f" ({run})" if isinstance(side, References) and len(side) > 1 else ""))
    if not parts:
        return ctx.iloc[0:0], ""
    return _swept(pd.concat(parts), axis), ", ".join(where)


def _swept(ctx: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Only the (series, pass) curves that take at least two values of ``axis``."""
    n = ctx.groupby(["series", "pass"])[axis].transform("nunique")
    return ctx[n >= 2]


def categorical_axis(df: pd.DataFrame, side: dict[str, Any] | References, axis: str) -> go.Figure | None:
    """Grouped bars of latency and memory per series, one bar per value of a categorical axis (dtype, ...)."""
    ctx = in_side(df[df["status"] == "ok"], side, skip=[axis])
    if ctx.empty:
        return None
    ctx, tokens = _at_swept_resolution(ctx, axis, side)
    if ctx.empty:
        return None
    pss = passes(ctx)
    metrics = ["latency_ms_median", "peak_bytes"]
    titles = [esc(f"{METRICS[m]}, {p}") for m in metrics for p in pss]
    fig = make_subplots(rows=2, cols=len(pss), subplot_titles=titles, vertical_spacing=0.22)
    values = sorted(ctx[axis].astype(str).unique())
    for i, value in enumerate(values):
        g_all = ctx[ctx[axis].astype(str) == value]
        first = True
        for row, m in enumerate(metrics, 1):
            for col, p in enumerate(pss, 1):
                g = g_all[g_all["pass"] == p].sort_values("series")
                if g.empty:
                    continue
                fig.add_trace(
                    go.Bar(
                        x=[esc(s) for s in g["series"]],
                        y=g[m] * METRIC_SCALE[m],
                        name=esc(f"{axis} {value}"),
                        legendgroup=esc(value),
                        showlegend=first,
                        marker={"color": PALETTE[i % len(PALETTE)]},
                        customdata=_hover(g),
                        hovertemplate=HOVER,
                    ),
                    row=row,
                    col=col,
                )
                first = False
    fig.update_layout(barmode="group")
    fig.update_yaxes(rangemode="tozero")
    _layout(fig, f"{axis} comparison at {tokens}", 760)
    return fig


def roofline(df: pd.DataFrame, palette: dict[str, dict[str, str]]) -> tuple[go.Figure | None, str]:
    """Achieved FLOP/s against arithmetic intensity with the device's compute and bandwidth ceilings.

    Bytes moved are not measured; the intensity divides the FLOPs executed by
    the bytes the point allocated (peak above baseline) plus its baseline
    (inputs and weights), each touched at least once, so it is an upper bound:
    a point sits at or right of its true place. Returns the figure, or None and
    a sentence saying why there is none.
    """
    on_gpu = df[df["device"].map(is_gpu)]
    if on_gpu.empty:
        return None, "no point ran on a GPU, so there is no device roofline to draw."
    gpu = on_gpu[(on_gpu["status"] == "ok") & (on_gpu["tflops"] > 0)]
    if gpu.empty:
        return None, "no GPU point ran successfully with a FLOP count."
    gpu = gpu[(gpu["peak_tflops"] > 0) & (gpu["bandwidth_gbs"] > 0)]
    if gpu.empty:
        names = ", ".join(sorted(on_gpu["device_name"].unique()))
        return None, f"the peak FLOP/s and bandwidth of {names} are not in bench/hardware.py, so no ceilings are known."
    # FLOPs executed per call, from the achieved rate (which counts fwd+bwd as 3 x forward).
    executed = gpu["tflops"] * 1e12 * gpu["latency_ms_median"] * 1e-3
    allocated = gpu["peak_bytes"].fillna(0) + gpu["baseline_bytes"].fillna(0)
    gpu = gpu.assign(intensity=executed / allocated)
    gpu = gpu[(allocated > 0)]
    if gpu.empty:
        return None, "no GPU point recorded its memory, so its intensity is unknown."
    fig = go.Figure()
    pss = passes(gpu)
    for (series, p), g in gpu.groupby(["series", "pass"], sort=True):
        fig.add_trace(
            go.Scatter(
                x=g["intensity"],
                y=g["tflops"],
                mode="markers",
                name=esc(f"{series}, {p}"),
                legendgroup=esc(series),
                visible=_visible(palette, series),
                marker={
                    "color": palette.get(str(series), {}).get("color"),
                    "symbol": _symbols(g, "launch_bound", SYMBOLS[pss.index(p) % len(SYMBOLS)]),
                    "size": 8,
                },
                customdata=_hover(g),
                hovertemplate="intensity %{x:.3g} FLOP/B, %{y:.3g} TFLOP/s<br>" + HOVER,
            )
        )
    lo, hi = gpu["intensity"].min() / 4, gpu["intensity"].max() * 4
    ceilings = gpu.groupby(["device_name", "dtype"])[["peak_tflops", "bandwidth_gbs"]].first().reset_index()
    many = ceilings["device_name"].nunique() > 1
    for _, c in ceilings.iterrows():
        peak, bw = c["peak_tflops"] * 1e12, c["bandwidth_gbs"] * 1e9
        ridge = peak / bw
        xs = [min(lo, ridge / 4), ridge, max(hi, ridge * 4)]
        ys = [min(x * bw, peak) / 1e12 for x in xs]
        label = f"ceiling {c['dtype']}: {c['peak_tflops']:.0f} TFLOP/s, {c['bandwidth_gbs']:.0f} GB/s"
        if many:
            label += f" ({c['device_name']})"
        fig.add_trace(
            go.Scatter(x=xs, y=ys, mode="lines", name=esc(label), line={"color": "#333", "dash": "dot", "width": 1.5})
        )
    fig.update_xaxes(type="log", title_text="arithmetic intensity (FLOP per byte allocated; an upper bound)")
    fig.update_yaxes(type="log", title_text="achieved TFLOP/s (FLOPs = 2 x MACs)")
    _label_log_axes(fig)
    title = "roofline (achieved FLOP/s against arithmetic intensity, with the device's ceilings)"
    note = "open markers: the measured host launch time bounds the point" if gpu["launch_bound"].any() else ""
    _layout(fig, title, _legend_height(len(fig.data), 560), (note,))
    return fig, ""


def accuracy_cost(train: pd.DataFrame) -> go.Figure | None:
    """Accuracy against FLOPs (2 x MACs) of trained models, one marker per model, parameters in the hover."""
    if train.empty:
        return None
    pts = train.dropna(subset=["accuracy", "flops"])
    pts = pts[pts["flops"] > 0]
    if pts.empty:
        return None
    fig = go.Figure()
    for i, (model, g) in enumerate(pts.groupby("model", sort=True)):
        hover = [
            esc("\n".join(f"{k}: {v}" for k, v in r.items() if not _blank(v) and k not in ("kind",)))
            for r in g.drop(columns=["flops"]).to_dict("records")
        ]
        fig.add_trace(
            go.Scatter(
                x=g["flops"] * 1e-9,
                y=g["accuracy"],
                mode="markers",
                name=esc(model),
                marker={"color": PALETTE[i % len(PALETTE)], "size": 10},
                customdata=hover,
                hovertemplate=HOVER,
            )
        )
    fig.update_xaxes(type="log", title_text="GFLOPs per image (= 2 x MACs)")
    fig.update_yaxes(title_text="accuracy")
    _label_log_axes(fig)
    _layout(fig, "accuracy against cost of trained models", 460)
    return fig


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def change_figure(t: pd.DataFrame, fail_above: float) -> go.Figure:
    """Latency change (%) of each matched point against tokens, coloured by verdict, threshold dotted."""
    verdict_color = {"faster": "#1a9641", "slower": "#d7191c", "within noise": "#7f7f7f"}
    fig = go.Figure()
    for verdict, g in t.groupby(t["verdict"].str.split(",").str[0], sort=True):
        hover = [
            esc(
                f"{r['mechanism']} {r['knobs_varied']} [{r['impl']}]\n{resolution_text(r['height'], r['width'])}, "
                f"batch {r['batch']:g}, {r['dtype']}, {r['pass']}\n"
                f"{r['latency_ms_base']:.4g} -> {r['latency_ms_new']:.4g} ms ({100 * r['latency_change']:+.1f}%)\n"
                f"verdict: {r['verdict']}" + (" (REGRESSION)" if r["regression"] else "")
            )
            for r in g.to_dict("records")
        ]
        fig.add_trace(
            go.Scatter(
                x=g["tokens"],
                y=100 * g["latency_change"],
                mode="markers",
                name=esc(verdict),
                marker={"color": verdict_color.get(str(verdict), "#444"), "size": 8},
                customdata=hover,
                hovertemplate=HOVER,
            )
        )
    fig.add_hline(y=100 * fail_above, line={"color": "#d7191c", "dash": "dot", "width": 1})
    fig.add_hline(y=0, line={"color": "#555", "width": 1})
    fig.update_xaxes(type="log", title_text="tokens N = H x W")
    fig.update_yaxes(title_text="latency change, new vs base (%)")
    _label_log_axes(fig, measured_x=True)
    _layout(fig, f"latency change per matched point (dotted: the {100 * fail_above:g}% regression threshold)", 440)
    return fig
