"""The report's sections and figures, built from the stored fixture runs; escaping; no torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from attnbench.reports import analysis, build_report, figures, load_run, tidy
from attnbench.reports.data import knob_axes, side_axes, train_rows
from report_fixtures import ENV, FIXTURES, row


@pytest.fixture(scope="module")
def gpu():
    run = load_run(FIXTURES / "gpu_base")
    df = tidy([run])
    return run, df, analysis.references(df)


@pytest.fixture(scope="module")
def gpu_html(gpu):
    return build_report([gpu[0]])


def test_axes_are_derived_from_the_data(gpu):
    _, df, ref = gpu
    assert knob_axes(df) == {"quadtree": {"topk": [4, 8, 16]}, "swin": {"window": [8, 12]}}
    axes = side_axes(df)
    assert axes["batch"] == [1, 2, 4, 8]
    assert axes["dtype"] == ["bfloat16", "float16", "float32"]
    assert "dim" not in axes and "heads" not in axes
    # Series are named by the knobs that vary; fixed knobs (levels, variant) are not repeated.
    assert "quadtree topk=8" in set(df["series"])
    r = ref["gpu_base"]
    assert (r.height, r.side["batch"], r.side["dtype"]) == (64, 2, "float16")


def test_scaling_figures_have_a_line_per_series_and_the_exponent(gpu):
    _, df, ref = gpu
    palette = figures.colors(df)
    fig = figures.scaling(df, ref, "latency_ms_median", palette)
    ok = analysis.in_side(df[df["status"] == "ok"], ref)
    expected = ok.groupby(["series", "pass"]).ngroups
    assert len(fig.data) == expected
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    names = {t.name for t in fig.data if t.showlegend}
    full = next(n for n in names if n.startswith("full"))
    fwd = analysis.fit(*ok[(ok["series"] == "full") & (ok["pass"] == "fwd")][["tokens", "latency_ms_median"]].T.values)
    assert f"~N^{fwd.text()} / " in full
    # FLOPs are per forward pass: one panel, and the quadratic mechanism shows an exponent near 2.
    flops = figures.scaling(df, ref, "flops", palette)
    assert all(t.xaxis == "x" for t in flops.data)
    exp_full = float(
        re.search(r"~N\^([0-9.]+)", next(t.name for t in flops.data if t.name.startswith("full"))).group(1)
    )
    assert 1.7 < exp_full < 2.0
    # Every point carries its exact configuration in the hover text.
    hover = fig.data[0].customdata[0]
    assert "tokens, batch 2" in hover and "point " in hover and "p20" in hover
    # Only one resolution: no curve at all rather than an empty plot.
    assert figures.scaling(df[df["tokens"] == 4096], ref, "latency_ms_median", palette) is None


def test_speedup_knob_and_side_axis_figures(gpu):
    _, df, ref = gpu
    palette = figures.colors(df)
    sp = figures.speedup(df, ref, "full", palette)
    assert {t.name for t in sp.data} >= {"linear", "quadtree topk=4", "swin window=8"}
    assert "full" not in {t.name for t in sp.data}
    knob = figures.knob_sensitivity(df, ref, "quadtree", "topk", [4, 8, 16])
    assert list(knob.layout.xaxis.categoryarray) == ["4", "8", "16"]
    assert all(list(t.x) == ["4", "8", "16"] for t in knob.data if len(t.x) == 3)
    batch = figures.numeric_axis(df, ref, "batch", palette)
    # Only the series swept over batch (full, linear, quadtree topk=8, forward) are drawn.
    assert {t.legendgroup for t in batch.data} == {"full", "linear", "quadtree topk=8"}
    assert any("latency ~batch^" in t.name for t in batch.data)
    dtype = figures.categorical_axis(df, ref, "dtype")
    assert {t.name for t in dtype.data} == {"dtype bfloat16", "dtype float16", "dtype float32"}
    assert dtype.layout.yaxis.type != "log"  # bars start at zero
    assert figures.numeric_axis(df, ref, "dim", palette) is None


def test_roofline_on_gpu_and_its_absence_on_cpu(gpu):
    _, df, _ = gpu
    fig, why = figures.roofline(df, figures.colors(df))
    assert why == ""
    ceilings = [t.name for t in fig.data if t.name.startswith("ceiling")]
    assert "ceiling float16: 990 TFLOP/s, 3350 GB/s" in ceilings
    ridge = next(t for t in fig.data if t.name.startswith("ceiling float16"))
    assert max(ridge.y) == pytest.approx(989.5)
    cpu = tidy([load_run(FIXTURES / "cpu_small")])
    fig, why = figures.roofline(cpu, {})
    assert fig is None and "no point ran on a GPU" in why


def test_accuracy_against_cost_from_training_rows(gpu):
    run, _, _ = gpu
    train = train_rows([run])
    assert sorted(train["model"]) == ["tiny-full", "tiny-quadtree", "tiny-swin"]
    fig = figures.accuracy_cost(train)
    assert len(fig.data) == 3
    full = next(t for t in fig.data if t.name == "tiny-full")
    assert full.x[0] == pytest.approx(2 * 1.21)  # GFLOPs = 2 x GMACs
    assert figures.accuracy_cost(train_rows([load_run(FIXTURES / "cpu_small")])) is None


def test_report_sections_and_size(gpu_html):
    html = gpu_html
    for section in ("verdict", "environment", "configuration", "summary", "bound", "scaling", "crossover", "knobs"):
        assert f'<section id="{section}">' in html
    assert '<section id="accuracy">' in html and '<section id="failures">' in html
    assert '<section id="axes">' in html and '<section id="roofline">' in html
    # The verdict comes first.
    assert html.index('<section id="verdict">') < html.index('<section id="summary">')
    assert html.count("Plotly.newPlot") == 12
    # plotly.js inlined exactly once, no CDN: the page opens offline.
    assert html.count("plotly.js v") == 1
    assert "<script src=" not in html and "<link " not in html
    assert len(html.encode()) < 8 * 2**20
    # Failed points are listed with their reasons.
    assert "CUDA out of memory. Tried to allocate 2.53 GiB" in html
    assert "window 12 does not divide 16x16" in html
    assert "point exceeded 120 s" in html and "illegal memory access" in html
    assert "NVIDIA H100 80GB HBM3" in html and "550.54.15" in html


def test_empty_sections_say_why():
    html = build_report([load_run(FIXTURES / "cpu_small")])
    assert "No roofline: no point ran on a GPU" in html
    assert "no training results" in html
    assert "no mechanism&#x27;s knob took more than one value" in html
    assert "batch, dtype and the other side axes were not swept" in html
    assert html.count("Plotly.newPlot") == 6  # crossovers, bound, latency, memory, FLOPs, speed-up


def test_report_of_two_runs_tells_them_apart(gpu):
    run, _, _ = gpu
    html = build_report([run, load_run(FIXTURES / "cpu_small")])
    assert "(gpu_base)" in html and "(cpu_small)" in html
    assert 'class="diff"' in html  # differing environment rows are highlighted


def test_everything_from_the_results_is_escaped(make_run):
    evil_mech = "<script>alert(1)</script>"
    evil_knob = '<img src=x onerror="alert(2)">'
    rows = []
    for hw in (8, 16):
        rows.append(row("full", hw, 1.0 * hw))
        rows.append(row(evil_mech, hw, 0.5 * hw, knobs={"k": evil_knob}))
        rows.append(row(evil_mech, hw, 0.4 * hw, knobs={"k": "plain"}))
    rows.append(row(evil_mech, 32, None, status="error", reason="</script><b>boom</b>"))
    rows.append({**row("full", 8, None), "point_id": "t", "kind": "train", "model": evil_mech, "accuracy": 0.5})
    env = {**ENV, "gpu_name": "<i>gpu</i>"}
    html = build_report([load_run(make_run(rows, env=env, name="<b>run</b>"))])
    for raw in (evil_mech, evil_knob, "<b>boom</b>", "<i>gpu</i>", "<b>run</b>", 'onerror="alert'):
        assert raw not in html
    # Text outside the plots is HTML-escaped; inside plotly's JSON the escaped text is kept as text.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;/script&gt;&lt;b&gt;boom&lt;/b&gt;" in html
    # The only </script> tags are the page's own.
    assert html.count("</script>") == html.count("<script")


def test_reports_never_import_torch(tmp_path):
    code = (
        "import sys\nfrom attnbench import reports\n"
        f"run = reports.load_run({str(FIXTURES / 'gpu_base')!r})\n"
        "reports.build_report([run]); reports.compare(run, run)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout) == []
    # And no module of the package names torch.
    src = Path(analysis.__file__).parent
    for path in src.glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+torch", path.read_text(), flags=re.M), path


def test_runs_with_nothing_that_ran(make_run):
    empty = load_run(make_run([]))
    html = build_report([empty])
    assert "the runs hold no benchmark points" in html and "Plotly.newPlot" not in html
    failed = load_run(make_run([row("full", 8, None, status="oom", reason="out of memory")]))
    html = build_report([failed])
    assert "no point ran, so there is no reference point" in html
    assert "out of memory" in html and "Plotly.newPlot" not in html
    assert (
        analysis.format_table(analysis.summary_table(tidy([failed]), analysis.references(tidy([failed]))), "md") == ""
    )
