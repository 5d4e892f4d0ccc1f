"""What the pages say is true: ties named as ties, no nan from one seed, a colour bar per footprint panel,
axes from where the data can start, labels that cannot overlap, footnotes that fit the device, the words."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import plotly.graph_objects as go
from attnbench.reports import analysis, build_report, load_run, tidy
from attnbench.reports import matching as matching_report
from attnbench.reports.experiments import build_page, figure, ranking, summarise
from report_fixtures import row
from test_experiments_report import _store

MATCH_RUN = Path(__file__).resolve().parents[2] / "results" / "match-quick"


def _tied_rows(device: str = "cuda") -> list[dict]:
    """At 64x64: lin 18 ms (p20-p80 14.4-19.8) and swin 19.8 ms (16.2-23.8) overlap; full 40 ms is apart."""
    return [
        row("full", 64, 40.0, impl="fast", device=device, spread=0.05),
        row("lin", 64, 18.0, impl="fast", device=device, spread=0.2),
        row("swin", 64, 19.8, impl="fast", device=device, spread=0.2),
    ]


def test_overlapping_intervals_make_a_tie_in_the_verdict_and_the_summary(make_run):
    runs = [load_run(make_run(_tied_rows()))]
    df = tidy(runs)
    refs = analysis.references(df)
    v = analysis.verdict(df, refs).iloc[0]
    assert [t[0] for t in v["fastest_tied"]] == ["lin", "swin"]
    table = analysis.summary_table(df, refs)
    ranks = dict(zip(table["mechanism"], table["latency rank (ties share)"], strict=True))
    assert ranks == {"lin": "1=", "swin": "1=", "full": "3"}
    page = build_report(runs)
    verdict = page[page.index('<ul class="verdict">') :].split("</ul>")[0]
    assert "tied for fastest" in verdict and "<b>lin</b>" in verdict and "<b>swin</b>" in verdict
    assert "fastest <b>" not in verdict  # no single fastest is named


def test_a_clear_winner_is_named_alone_and_same_reads_same_as(make_run):
    rows = [row("full", 64, 40.0, impl="fast"), row("lin", 64, 10.0, impl="fast"), row("swin", 64, 20.0, impl="fast")]
    page = build_report([load_run(make_run(rows))])
    assert "fastest <b>lin</b>" in page and "tied for fastest" not in page
    same = [row("full", 64, 10.0, impl="fast", peak=1000), row("lin", 64, 10.0, impl="fast", peak=1000)]
    page = build_report([load_run(make_run(same, name="same"))])
    assert "same than" not in page and "same as full" in page


def test_the_tensor_core_footnote_only_on_a_gpu_report(make_run):
    gpu = build_report([load_run(make_run(_tied_rows("cuda")))])
    cpu = build_report([load_run(make_run(_tied_rows("cpu"), name="cpu"))])
    assert "tensor-core peak" in gpu and "tensor-core peak" not in cpu


def test_a_side_axis_is_said_in_the_singular(make_run):
    rows = [row("full", 32, 2.0, impl="fast"), row("lin", 32, 1.0, impl="fast", dtype="bfloat16")]
    page = build_report([load_run(make_run(rows))])
    assert "dtype differs only between mechanisms" in page and "dtype differ " not in page


def _one_seed_match_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(MATCH_RUN, run)
    lines = (run / "results.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("seed", 0) == 0]
    assert len(kept) < len(lines)
    (run / "results.jsonl").write_text("\n".join(kept) + "\n")
    return run


def test_one_seed_shows_no_nan_and_says_an_interval_needs_two(tmp_path):
    run = _one_seed_match_run(tmp_path)
    page = matching_report.build_report(run)
    table = matching_report.summary(matching_report.load(run)[0])
    assert (table["seeds"] == 1).all()
    shown = matching_report.display(table)
    assert not shown.astype(str).apply(lambda c: c.str.contains("nan")).any().any()
    assert "needs two seeds" in page
    text = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    assert not re.search(r"\bnan\b", text, flags=re.I)


def test_matching_accuracy_axis_starts_at_zero(tmp_path):
    table = matching_report.summary(matching_report.load(_one_seed_match_run(tmp_path))[0])
    zero = table.copy()
    for m in matching_report.METRICS:
        zero[m] = 0.0
    for t in (table, zero):
        lo, hi = matching_report.accuracy_range(t)
        assert lo == 0.0 and 0 < hi <= 1.05
    fig = matching_report.accuracy_cost(zero)
    assert fig.layout.yaxis.range[0] == 0.0
    assert all("text" not in (t.mode or "") for t in fig.data)  # no labels drawn on top of each other


def test_every_footprint_panel_has_its_own_colour_bar(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(MATCH_RUN, run)
    df, fps, _ = matching_report.load(run)
    fig = matching_report.footprint_figure(fps, matching_report.summary(df))
    assert fig is not None
    weights = [t for t in fig.data if isinstance(t, go.Heatmap) and t.colorscale[0][1] != "rgb(255,255,255)"]
    weights = [t for t in weights if t.showscale]
    images = [t for t in fig.data if isinstance(t, go.Heatmap) and not t.showscale]
    assert len(weights) == len(images) > 4  # one weight map over each image, each with a bar
    for t in weights:
        xa = fig.layout["xaxis" + (t.xaxis or "x")[1:]]
        ya = fig.layout["yaxis" + (t.yaxis or "y")[1:]]
        # The bar sits just right of its own panel, as tall as that panel, and no other panel starts before it.
        assert xa.domain[1] < t.colorbar.x < xa.domain[1] + 0.02
        assert abs(t.colorbar.len - (ya.domain[1] - ya.domain[0])) < 1e-9
        assert ya.domain[0] < t.colorbar.y < ya.domain[1]
    bars = {(round(t.colorbar.x, 6), round(t.colorbar.y, 6)) for t in weights}
    assert len(bars) == len(weights)
    page = matching_report.build_report(run)
    assert "its own scale" in page


def test_the_footprint_page_has_a_bar_per_panel(tmp_path):
    panels = [
        {"mechanism": m, "kind": "self", "keys_per_query": k, "macs": 1e6, "weights": [[w, 0.0], [0.0, w]],
         "query": [0, 0], "query_hw": [2, 2], "knobs": {}}
        for m, k, w in (("full", 4, 0.002), ("swin", 2, 0.02))
    ]  # fmt: skip
    html = matching_report.write_footprint_page(panels, tmp_path / "fp.html").read_text()
    assert html.count('"showscale":true') == 2 and "own colour scale" in html


def _page_figure(html: str) -> tuple[list[dict], dict]:
    """The data and layout of the page's one plotly figure, read back from its Plotly.newPlot call."""
    assert html.count("Plotly.newPlot(") == 1
    rest = html[html.index("Plotly.newPlot(") + len("Plotly.newPlot(") :]
    decoder, at = json.JSONDecoder(), 0
    parts = []
    for _ in range(3):  # the div id, the data, the layout
        while rest[at] in " \n,":
            at += 1
        value, at = decoder.raw_decode(rest, at)
        parts.append(value)
    return parts[1], parts[2]


def _clip_panel(mech: str, frames: int, scale: float, query: list[int]) -> dict:
    weights = [[[scale * (t + 1) * (i + j + 1) for j in range(3)] for i in range(2)] for t in range(frames)]
    return {"mechanism": mech, "kind": "self", "keys_per_query": 6 * frames, "macs": 1e6, "weights": weights,
            "query": query, "query_hw": [frames, 2, 3], "knobs": {}}  # fmt: skip


def test_the_footprint_page_of_a_clip_is_a_strip_of_frames_per_mechanism(tmp_path):
    frames = 3
    panels = [_clip_panel("pooling", frames, 0.01, [1, 0, 2]), _clip_panel("swin", frames, 0.2, [1, 0, 2])]
    html = matching_report.write_footprint_page(panels, tmp_path / "clip.html").read_text()
    data, layout = _page_figure(html)
    heats = [t for t in data if t["type"] == "heatmap"]
    assert len(heats) == 2 * frames
    rows = []
    for p in panels:
        mine = [t for t in heats if t["name"].startswith(p["mechanism"] + " ")]
        assert [t["name"] for t in mine] == [f"{p['mechanism']} t={t}" for t in range(frames)]
        assert [t["z"] for t in mine] == p["weights"]  # frame t drawn from weights[t]
        axes = [(t.get("xaxis", "x"), t.get("yaxis", "y")) for t in mine]
        xs = [layout["xaxis" + x[1:]]["domain"] for x, _ in axes]
        ys = {tuple(layout["yaxis" + y[1:]]["domain"]) for _, y in axes}
        assert len(ys) == 1 and all(a[1] < b[0] for a, b in zip(xs, xs[1:], strict=False))  # one row, left to right
        rows.append(ys.pop())
        top = max(w for f in p["weights"] for line in f for w in line)
        assert {(t["zmin"], t["zmax"]) for t in mine} == {(0.0, top)}  # one colour scale for the frames
        assert [t["showscale"] for t in mine] == [False] * (frames - 1) + [True]  # its bar once, by the last
        marks = [t for t in data if t["type"] == "scatter" and (t.get("xaxis", "x"), t.get("yaxis", "y")) in axes]
        assert [(axes.index((m.get("xaxis", "x"), m.get("yaxis", "y"))), m["x"], m["y"]) for m in marks] == [
            (1, [2], [0])
        ]  # the query (t, i, j) = (1, 0, 2), marked in frame 1 only
        label = [a["text"] for a in layout["annotations"] if a["text"].startswith(f"<b>{p['mechanism']}</b>")]
        assert len(label) == 1 and f"{frames} frames" in label[0]
    assert rows[0][0] > rows[1][1]  # a row per mechanism, in the panels' order from the top
    titles = [a["text"] for a in layout["annotations"] if a["text"].startswith("t=")]
    assert titles == [f"t={t}" for t in range(frames)] * 2
    assert "strip of its frames" in html and "query (1, 0, 2) on 3x2x3" in html


def test_the_footprint_page_of_an_image_keeps_a_panel_and_a_scale_per_mechanism(tmp_path):
    panels = [
        {"mechanism": m, "kind": "self", "keys_per_query": 4, "macs": 1e6, "weights": [[w, 0.0], [0.0, w]],
         "query": [0, 1], "query_hw": [2, 2], "knobs": {}}
        for m, w in (("full", 0.002), ("swin", 0.02))
    ]  # fmt: skip
    data, layout = _page_figure(matching_report.write_footprint_page(panels, tmp_path / "fp.html").read_text())
    heats = [t for t in data if t["type"] == "heatmap"]
    assert [t["name"] for t in heats] == ["full", "swin"] and all(t["showscale"] for t in heats)
    assert all("zmax" not in t for t in heats)  # each panel scaled on its own weights
    assert len({t.get("xaxis", "x") for t in heats}) == 2
    assert not any(a["text"].startswith("t=") for a in layout["annotations"])
    assert [(m["x"], m["y"]) for m in data if m["type"] == "scatter"] == [([1], [0])] * 2


def test_one_seed_is_not_within_seed_noise(tmp_path):
    pub = {"a": {"top1": 80.0}, "b": {"top1": 70.0}}
    out = _store(tmp_path, "one", "quick", {"a": [0.5], "b": [0.6]}, published=pub)
    from attnbench.reports.experiments import load_rows

    s = summarise(load_rows([out])[0])
    words = ranking(s)
    assert all("seed noise" not in w for w in words.values())
    assert "one seed" in words["a"]
    page = build_page([out])
    assert "within seed noise" not in page
    assert not re.search(r"\bnan\b", re.sub(r"<script.*?</script>", "", page, flags=re.S), flags=re.I)


def test_reproduce_plot_draws_no_text_labels_and_starts_at_zero(tmp_path):
    out = _store(tmp_path, "many", "quick", {"a": [0.0, 0.0], "b": [0.0, 0.0], "c": [0.01, 0.0]})
    from attnbench.reports.experiments import load_rows

    fig = figure("e", summarise(load_rows([out])[0]))
    assert all("text" not in (t.mode or "") for t in fig.data)  # names live in the legend: they cannot overlap
    assert {t.name for t in fig.data} >= {"a", "b", "c"}
    assert fig.layout.yaxis.range[0] == 0
