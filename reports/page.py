"""The self-contained HTML report: sections of tables and plotly figures, plotly.js inlined once.

Every string taken from the results goes through one escaping path: :func:`esc` for text and
attribute values (quotes included), :func:`slug` (then :func:`esc`) for ids and the links to them, and
:func:`reports.figures.esc` for plot labels and hover text (plotly renders its own markup; the figure's
JSON is embedded by plotly with ``<`` escaped, so no string ends its script).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import html
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.io as pio
from attnbench.bench.env import env_differences
from attnbench.reports import analysis, figures
from attnbench.reports.data import (
    MIB,
    OVERHEAD_FACTOR,
    SIDE_AXES,
    Run,
    knob_axes,
    knobs_label,
    plain,
    side_axes,
    tidy,
    train_rows,
)
from plotly.offline import get_plotlyjs

NUMERIC_SIDE_AXES = ("batch", "dim", "heads")
CATEGORICAL_SIDE_AXES = ("dtype", "compile", "cross", "device")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; line-height: 1.45; }
header { background: #1d2330; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; color: #c8cdd8; font-size: 13px; }
nav { padding: 8px 32px; background: #e8ebf0; font-size: 13px; position: sticky; top: 0; z-index: 10; }
nav a { margin-right: 14px; color: #1f4f99; text-decoration: none; white-space: nowrap; }
main { padding: 8px 32px 40px 32px; max-width: 1500px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 14px 20px; margin: 18px 0; }
h2 { font-size: 18px; margin: 4px 0 10px 0; }
h3 { font-size: 15px; margin: 14px 0 6px 0; }
p.note { color: #4a5263; font-size: 13px; margin: 6px 0; }
p.empty { color: #6a7283; font-style: italic; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 10px 0; }
th, td { border-bottom: 1px solid #e3e6ec; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f2f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.diff td { background: #fff4d6; }
.scroll { overflow-x: auto; }
.warn { color: #8a4b00; }
details { margin: 8px 0; font-size: 13px; }
summary { cursor: pointer; color: #1f4f99; }
pre { background: #f6f7f9; padding: 8px; max-height: 420px; overflow: auto; font-size: 12px; }
.good { color: #0a6b2c; }
ul.verdict { font-size: 15px; margin: 6px 0 10px 0; padding-left: 22px; }
ul.verdict li { margin: 4px 0; }
span.note { color: #4a5263; font-size: 13px; }
.bad { color: #a3161b; }
"""


@dataclasses.dataclass
class Section:
    id: str
    title: str
    body: list[str]


def esc(value: Any) -> str:
    """Any value as HTML text or as an attribute value (``&``, ``<``, ``>``, ``"`` and ``'`` escaped)."""
    return html.escape(str(value), quote=True)


_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def slug(value: Any) -> str:
    """A value made an HTML id and URL fragment: a plain id (a letter, then letters, digits, ``-``, ``_``)
    is kept as it is, any other becomes ``s-`` + its safe characters + a hash of the whole (so that two
    names that differ only in other characters get different ids)."""
    text = str(value)
    if _ID.fullmatch(text):
        return text
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:40]
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"s-{safe}-{digest}" if safe else f"s-{digest}"


def table_html(df: pd.DataFrame, row_class: Sequence[str] = ()) -> str:
    """An HTML table with every cell escaped; numbers right-aligned to 3 significant digits."""
    if df.empty:
        return '<p class="empty">no rows</p>'
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    body = []
    for i, (_, r) in enumerate(df.iterrows()):
        cells = []
        for c in df.columns:
            v = r[c]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{esc(analysis.fmt_number(v))}</td>')
            else:
                cells.append(f"<td>{esc(v)}</td>")
        rc = f' class="{esc(row_class[i])}"' if i < len(row_class) and row_class[i] else ""
        body.append(f"<tr{rc}>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _fig_html(fig: Any, div_id: str) -> str:
    return pio.to_html(
        fig,
        full_html=False,
        include_plotlyjs=False,
        div_id=slug(div_id),
        config={"displaylogo": False, "responsive": True},
    )


def _empty(text: str) -> str:
    return f'<p class="empty">{esc(text)}</p>'


def build_report(runs: list[Run], baseline: str | analysis.Baseline = analysis.DEFAULT_BASELINE) -> str:
    """The whole report page for ``runs`` as one HTML string; ``baseline`` is ``NAME[:IMPL]`` or a
    :class:`~reports.analysis.Baseline` (see :func:`~reports.analysis.resolve_baseline`)."""
    df = tidy(runs)
    baseline = analysis.as_baseline(baseline, df)
    train = train_rows(runs)
    figs: list[tuple[str, Any]] = []

    def fig(f: Any) -> str:
        div_id = f"plot-{len(figs)}"
        figs.append((div_id, f))
        return _fig_html(f, div_id)

    ref = analysis.references(df, baseline)
    palette = figures.colors(df)
    crossings = analysis.crossovers(df, ref, baseline) if baseline.mask(df).any() else pd.DataFrame()
    sections = [
        _verdict(df, ref, baseline, crossings, palette, fig),
        _summary(df, ref, baseline),
        _bound(df, ref, baseline, palette, fig),
        _scaling(df, ref, palette, fig),
        _crossover(df, ref, baseline, crossings, palette, fig),
        _knobs(df, ref, fig),
        _side_axes(df, ref, palette, fig),
        _roofline(df, palette, fig),
        _accuracy(train, fig),
        _failures(df),
        _configuration(runs, df, ref, baseline),
        _environment(runs),
    ]
    names = ", ".join(r.name for r in runs)
    warnings = [w for r in runs for w in r.warnings]
    warn_html = "".join(f'<p class="warn">{esc(w)}</p>' for w in warnings)
    counts = df["status"].value_counts().to_dict() if not df.empty else {}
    status_text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no points"
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"{names} · {status_text} · generated {generated}"
    return document("attnbench report", subtitle, sections, preamble=warn_html)


def _environment(runs: list[Run]) -> Section:
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.env if k not in keys]
    if not keys:
        return Section("environment", "Environment", [_empty("no env.json in the run directories.")])
    rows = []
    diff = []
    differing = {k for r in runs[1:] for k in env_differences(runs[0].env, r.env)}
    for k in keys:
        values = [_env_value(r.env.get(k)) for r in runs]
        rows.append({"field": k, **{r.name: v for r, v in zip(runs, values, strict=True)}})
        diff.append("diff" if k in differing else "")
    body = [table_html(pd.DataFrame(rows), row_class=diff)]
    if len(runs) > 1 and any(diff):
        body.append('<p class="note">Highlighted rows differ between the runs: their numbers are not comparable.</p>')
    return Section("environment", "Environment", body)


def _env_value(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "-" if v is None else str(v)


def _configuration(runs: list[Run], df: pd.DataFrame, ref: analysis.References, baseline: analysis.Baseline) -> Section:
    body = []
    if df.empty:
        return Section("configuration", "Sweep configuration", [_empty("the runs hold no benchmark points.")])
    mech_rows = []
    for mech, g in df.groupby("mechanism", sort=True):
        knob_sets = sorted(g["knobs_label"].unique())
        mech_rows.append(
            {
                "mechanism": mech,
                "knob settings": "; ".join(knob_sets),
                "impl": ", ".join(sorted(g["impl"].unique())),
                "resolutions": ", ".join(g.sort_values("tokens")["resolution"].unique()),
                "points": len(g),
                "ok": int((g["status"] == "ok").sum()),
                "not run": int((g["status"] != "ok").sum()),
            }
        )
    body.append("<h3>What was swept</h3>" + table_html(pd.DataFrame(mech_rows)))
    axes = side_axes(df)
    knobs = knob_axes(df)
    lines = [f"pass: {', '.join(figures.passes(df))}"]
    lines += [f"{k}: {', '.join(map(str, v))}" for k, v in axes.items()]
    for mech, kv in knobs.items():
        lines += [
            f"{mech} {k}: {', '.join(knobs_label({k: x}).split('=', 1)[1] for x in vals)}" for k, vals in kv.items()
        ]
    body.append("<h3>Axes that vary</h3><ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>")
    fixed = {k: df[k].iloc[0] for k in SIDE_AXES if df[k].nunique() == 1}
    if fixed:
        body.append(
            '<p class="note">Fixed for every point: '
            + esc(", ".join(f"{k} {plain(v)}" for k, v in fixed.items()))
            + "</p>"
        )
    body.append(
        '<p class="note">Reference point for the summary and the curves (side axes at their most common values; '
        f"the largest resolution at which {esc(baseline.label)} ran in every pass): {esc(ref.describe())}</p>"
    )
    for r in runs:
        if r.sweep:
            body.append(
                f"<details><summary>the stored sweep request of {esc(r.name)} (sweep.json)</summary>"
                f"<pre>{esc(json.dumps(r.sweep, indent=2, sort_keys=True))}</pre></details>"
            )
    return Section("configuration", "Sweep configuration", body)


def _baseline_note(df: pd.DataFrame, baseline: analysis.Baseline) -> str:
    """Which baseline every ratio is set against, or that there is none."""
    if not baseline.mask(df).any():
        return f"No {baseline.label} points in these runs, so no ratio to a baseline (choose one with --baseline). "
    text = f"Every ratio is set against the declared baseline {baseline.label} at the same point"
    return text + (f" ({baseline.note})" if baseline.note else "") + ". "


def _overhead_note(df: pd.DataFrame) -> str:
    """What the fits leave out, or that they could not tell."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return ""
    if ok["overhead_ms"].isna().all():
        return (
            "The per-call overhead was not measured in these results (no overhead_ms), so it is unknown how much "
            "of the smallest latencies is the call itself; no point is left out of the fits. "
        )
    n = int(ok["overhead_bound"].sum())
    text = (
        f"Per-call overhead (an empty module's call, same timer) {analysis.fmt_number(ok['overhead_ms'].median())} "
        f"ms: {n} of {len(ok)} ok points time within {OVERHEAD_FACTOR:g}x of it"
    )
    return text + (", are marked (open markers) and left out of latency fits and crossovers. " if n else ". ")


def _fit_rules() -> str:
    return (
        f"An exponent or crossover is given only over {analysis.MIN_FIT_POINTS} points or more (else "
        f'"n/a (N pts)" / "too few points") and an exponent only with R\u00b2 at least {analysis.MIN_R2:g} '
        '(else "poor fit"). '
    )


def _than(ratio_text: str) -> str:
    """ "3x faster than full", but "same as full"."""
    return " as " if ratio_text == "same" else " than "


def _fastest_words(r: dict[str, Any], baseline: analysis.Baseline) -> str:
    """The fastest series of one verdict row, or the series tied for fastest when their p20-p80 overlap."""
    ratio = (_than(r["fastest_text"]) + esc(baseline.label)) if math.isfinite(r["fastest_ratio"]) else ""
    bound = ", but within the per-call overhead" if r.get("fastest_bound") else ""
    tied = r.get("fastest_tied") or []
    if len(tied) > 1:
        each = ", ".join(
            f"<b>{esc(s)}</b> {esc(analysis.fmt_number(m))} ms (p20-p80 {esc(analysis.fmt_number(lo))}-"
            f"{esc(analysis.fmt_number(hi))})"
            for s, m, lo, hi in tied
        )
        return (
            f"tied for fastest: {each}; their p20-p80 intervals overlap, so none is faster than the other "
            f"(lowest median {esc(r['fastest_text'])}{ratio}{bound})"
        )
    value = esc(analysis.fmt_number(r["fastest_value"]))
    return f"fastest <b>{esc(r['fastest'])}</b> ({value} ms, {esc(r['fastest_text'])}{ratio}{bound})"


def _verdict(
    df: pd.DataFrame,
    ref: analysis.References,
    baseline: analysis.Baseline,
    crossings: pd.DataFrame,
    palette: dict[str, dict[str, Any]],
    fig: Any,
) -> Section:
    title = "Verdict"
    table = analysis.verdict(df, ref, baseline)
    if table.empty:
        return Section("verdict", title, [_empty("no point ran, so there is no verdict.")])
    items = []
    for r in table.to_dict("records"):
        where = f"{r['pass']} at {r['resolution']}" + (f" ({r['run']})" if table["run"].nunique() > 1 else "")
        fastest = _fastest_words(r, baseline)
        smallest = (
            f"smallest <b>{esc(r['smallest'])}</b> ({esc(analysis.fmt_number(r['smallest_value'] / MIB))} MiB, "
            f"{esc(r['smallest_text'])}"
            + (_than(r["smallest_text"]) + esc(baseline.label) if math.isfinite(r["smallest_ratio"]) else "")
            + ")"
        )
        line = f"<li><b>{esc(where)}</b>: {fastest}; {smallest}"
        if r["unranked"]:
            line += (
                f' <span class="note">({esc(", ".join(r["unranked"]))}: not ranked, no baseline in its context)</span>'
            )
        items.append(line + "</li>")
    body = [f'<ul class="verdict">{"".join(items)}</ul>']
    body.append(
        f'<p class="note">{esc(_baseline_note(df, baseline))}Lower latency is faster; peak memory is '
        "above the inputs and weights.</p>"
    )
    f = figures.crossover_chart(crossings, baseline, palette)
    if f is not None:
        body.append(fig(f))
        body.append(
            '<p class="note">The grey slots left and right of the measured maps hold the mechanisms that are '
            "already faster / smaller at the smallest map (always), never in the measured range (never), or have "
            "too few points above the per-call overhead to tell (too few). Open markers: never, too few, or "
            'faster only below the map shown. The <a href="#crossover">crossover table</a> gives each in words.</p>'
        )
    return Section("verdict", title, body)


def _summary(df: pd.DataFrame, ref: analysis.References, baseline: analysis.Baseline) -> Section:
    title = "Summary at the reference point"
    table = analysis.summary_table(df, ref, baseline)
    if table.empty:
        return Section("summary", title, [_empty("no point ran, so there is no reference point.")])
    lead = f'<p class="note">At {esc(ref.describe())}, fastest first. {esc(_baseline_note(df, baseline))}'
    lead += esc(
        "Speed-up = baseline latency / latency; memory = baseline peak / peak; MACs = baseline MACs / MACs of the "
        "timed pass (the speed-up the FLOPs promise); share realised = speed-up / that promise, where one is "
        "promised. Latency is the median; peak memory is above the inputs and weights. "
    )
    lead += esc(_overhead_note(df)) + "</p>"
    return Section(
        "summary",
        title,
        [
            lead,
            table_html(analysis.display_table(table)),
            f'<p class="note">{esc(analysis.flops_note(df["device"]))}</p>',
        ],
    )


def _bound(
    df: pd.DataFrame, ref: analysis.References, baseline: analysis.Baseline, palette: dict[str, Any], fig: Any
) -> Section:
    title = "How close to its bound"
    f = figures.bound(df, ref, baseline, palette)
    if f is None:
        why = (
            f"no mechanism ran with fewer MACs than {baseline.label} at a point where it ran, so none was promised "
            "a saving."
            if baseline.mask(df).any()
            else f"no {baseline.label} point, so there is no promise to measure against."
        )
        return Section("bound", title, [_empty(why)])
    note = (
        '<p class="note">'
        + esc(
            f"Each efficient mechanism's measured speed-up over {baseline.label} divided by the speed-up its MACs "
            f"promise ({baseline.name} MACs / its MACs, same pass): 100% means the implementation realises all the "
            "saving its FLOPs promise; below, time goes elsewhere (memory traffic, launches, the per-call overhead). "
            "Only points with a promised saving are drawn. "
        )
        + "</p>"
    )
    return Section("bound", title, [note, fig(f)])


def _scaling(df: pd.DataFrame, ref: analysis.References, palette: dict[str, dict[str, Any]], fig: Any) -> Section:
    body = []
    for metric in analysis.METRICS:
        f = figures.scaling(df, ref, metric, palette)
        if f is not None:
            body.append(fig(f))
    if not body:
        body = [_empty("fewer than two resolutions ran, so there is no curve to draw.")]
    else:
        body.insert(
            0,
            '<p class="note">One line per mechanism and knob setting, with the other axes at the reference ('
            + esc(ref.describe())
            + "). Each mechanism keeps its colour in every report; the fast implementation is drawn, others "
            "(and curves beyond ten) are listed in the legend: click one to draw it. The legend gives the "
            "least-squares exponent of each curve in N (tokens); 2 is quadratic. "
            + esc(_fit_rules() + _overhead_note(df))
            + "</p>",
        )
    return Section("scaling", "Scaling with resolution", body)


def _crossover(
    df: pd.DataFrame,
    ref: analysis.References,
    baseline: analysis.Baseline,
    table: pd.DataFrame,
    palette: dict[str, dict[str, Any]],
    fig: Any,
) -> Section:
    title = f"Where each mechanism beats {baseline.label}"
    if not (baseline.mask(df) & (df["status"] == "ok")).any():
        return Section(
            "crossover", title, [_empty(f"no {baseline.label} point ran, so there is nothing to compare with.")]
        )
    if table.empty:
        return Section("crossover", title, [_empty(f"no other mechanism ran at a point where {baseline.label} ran.")])
    unmatched = sorted(table[table["faster_kind"] == "none"]["series"].unique())
    table = table[table["faster_kind"] != "none"]
    shown = table[["series", "pass", "faster_than_baseline", "smaller_than_baseline", "note"]].rename(
        columns={
            "faster_than_baseline": f"faster than {baseline.label}",
            "smaller_than_baseline": f"smaller than {baseline.label}",
        }
    )
    if (shown["note"] == "").all():
        shown = shown.drop(columns=["note"])
    body = [
        '<p class="note">Each point is set against '
        + esc(baseline.label)
        + " at the same resolution, batch, dtype and pass. The crossover resolution is interpolated "
        "log-log between the two measured resolutions that bracket it (shown as the equivalent square map); the first "
        "measured resolution past it is given too. " + esc(_fit_rules() + _overhead_note(df)) + "</p>",
        table_html(shown),
    ]
    if unmatched:
        body.append(
            f'<p class="note">Not compared, no {esc(baseline.label)} point in the same context (e.g. cross attention): '
            + esc(", ".join(unmatched))
            + ".</p>"
        )
    f = figures.speedup(df, ref, baseline, palette)
    if f is not None:
        body.append(fig(f))
    return Section("crossover", title, body)


def _knobs(df: pd.DataFrame, ref: analysis.References, fig: Any) -> Section:
    title = "Cost-knob sensitivity"
    body = []
    for mech, kv in knob_axes(df).items():
        for knob, values in kv.items():
            f = figures.knob_sensitivity(df, ref, mech, knob, values)
            if f is not None:
                body.append(fig(f))
    if not body:
        body = [_empty("no mechanism's knob took more than one value at the reference setting, so there is no curve.")]
    return Section("knobs", title, body)


def _side_axes(df: pd.DataFrame, ref: analysis.References, palette: dict[str, dict[str, str]], fig: Any) -> Section:
    title = "Batch, dtype and other axes"
    body = []
    axes = side_axes(df)
    for axis in NUMERIC_SIDE_AXES:
        if axis in axes:
            f = figures.numeric_axis(df, ref, axis, palette)
            if f is not None:
                body.append(fig(f))
    for axis in CATEGORICAL_SIDE_AXES:
        if axis in axes:
            f = figures.categorical_axis(df, ref, axis)
            if f is not None:
                body.append(fig(f))
    if not body:
        varied = [a for a in axes if a != "impl"]
        if varied:
            verb = "differs" if len(varied) == 1 else "differ"
            why = (
                f"{', '.join(varied)} {verb} only between mechanisms (no mechanism was measured at two values at "
                "one resolution), so there is nothing to compare."
            )
        else:
            why = "batch, dtype and the other side axes were not swept, so there is nothing to compare."
        body = [_empty(why)]
    return Section("axes", title, body)


def _roofline(df: pd.DataFrame, palette: dict[str, dict[str, str]], fig: Any) -> Section:
    f, why = figures.roofline(df, palette)
    if f is None:
        return Section("roofline", "Roofline", [_empty(f"No roofline: {why}")])
    note = (
        '<p class="note">Bytes moved are not measured: intensity = FLOPs executed / (peak memory above baseline + '
        "baseline), each byte touched at least once, so intensity is an upper bound and points sit at or right of "
        "their true place.</p>"
    )
    return Section("roofline", "Roofline", [note, fig(f)])


def _accuracy(train: pd.DataFrame, fig: Any) -> Section:
    title = "Accuracy against cost"
    f = figures.accuracy_cost(train)
    if f is None:
        why = "no training results (rows with kind = train) in these runs." if train.empty else "no trained model "
        if not train.empty:
            why += "recorded both accuracy and MACs."
        return Section("accuracy", title, [_empty(why)])
    cols = [c for c in ("model", "accuracy", "flops", "params", "run") if c in train.columns]
    table = train[cols].rename(columns={"flops": "FLOPs (2 x MACs)"})
    return Section("accuracy", title, [fig(f), table_html(table)])


def _failures(df: pd.DataFrame) -> Section:
    title = "Points that did not run"
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return Section("failures", title, ['<p class="good">Every point ran.</p>'])
    counts = bad.groupby(["status", "mechanism"]).size().reset_index(name="points")
    cols = ["status", "mechanism", "knobs_label", "resolution", "batch", "dtype", "pass", "impl", "reason", "run"]
    listing = bad.sort_values(["status", "mechanism", "tokens"])[cols].rename(columns={"knobs_label": "knobs"})
    if listing["run"].nunique() == 1:
        listing = listing.drop(columns=["run"])
    return Section("failures", title, [table_html(counts), table_html(listing)])


def build_compare_page(cmp: Any, base: Run, new: Run) -> str:
    """The comparison of two runs as one self-contained HTML page: summary, plot of changes, full table."""
    from attnbench.reports.compare import display_table, missing_line, summary_line

    table = display_table(cmp)
    n_reg = int(t["regression"].sum()) if not (t := cmp.table).empty else 0
    verdict = (
        f'<p class="bad"><b>{n_reg} point(s) regressed beyond {100 * cmp.fail_above:g}%</b></p>'
        if n_reg
        else f'<p class="good"><b>No regression beyond {100 * cmp.fail_above:g}%</b></p>'
    )
    body = [verdict, f'<p class="note">{esc(summary_line(cmp))}</p>']
    missing = missing_line(cmp)
    if missing:
        body.insert(1, f'<p class="bad"><b>{esc(missing)}</b></p>')
    if cmp.differences:
        body.append(
            '<p class="warn">Compared despite different environments (forced):</p><ul>'
            + "".join(f"<li>{esc(d)}</li>" for d in cmp.differences)
            + "</ul>"
        )
    figure_html = ""
    ok = t[t["latency_change"].notna()] if not t.empty else t
    if not ok.empty:
        f = figures.change_figure(ok, cmp.fail_above)
        figure_html = _fig_html(f, "plot-0")
    row_class = ["diff" if r else "" for r in (t["regression"] if not t.empty else [])]
    sections = [
        Section("summary", "Summary", body),
        Section("changes", "Latency change per point", [figure_html or _empty("no point ran in both runs.")]),
        Section("points", "Matched points", [table_html(table, row_class=row_class)]),
    ]
    if len(cmp.only_base) or len(cmp.only_new):
        unmatched = pd.concat(
            [cmp.only_base.assign(only_in=base.name), cmp.only_new.assign(only_in=new.name)], ignore_index=True
        )
        sections.append(Section("unmatched", "Points in one run only", [table_html(unmatched)]))
    title = f"attnbench comparison: {base.name} -> {new.name}"
    return document(title, f"regression threshold {100 * cmp.fail_above:g}%", sections, nav=False)


def document(title: str, subtitle: str, sections: list[Section], nav: bool = True, preamble: str = "") -> str:
    """A self-contained page: the sections under a header (plain text, escaped here), plotly.js inlined once;
    ``preamble`` is HTML (already escaped) shown above the first section."""
    links = "".join(f'<a href="#{esc(slug(s.id))}">{esc(s.title)}</a>' for s in sections)
    main = "".join(
        f'<section id="{esc(slug(s.id))}"><h2>{esc(s.title)}</h2>{"".join(s.body)}</section>' for s in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>
{f"<nav>{links}</nav>" if nav else ""}
<main>{preamble}{main}</main>
</body></html>
"""
