"""Hostile names create nothing in any page: every page builder is fed mechanism names, knobs, experiment
and variant names, image folder and file names and run-directory names that try to open elements or
attributes, and the page, parsed with html.parser, must hold the same elements and attributes as the
same page built with benign names (the names may only ever be text, attribute values or plot data)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

from attnbench.bench.store import ResultsStore
from attnbench.reports import build_compare_page, build_report, compare, load_run, matching
from attnbench.reports import experiments as exp_page
from attnbench.reports.page import slug
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from report_fixtures import ENV, row, write_run

PAYLOADS = [
    'q"><img src=x onerror=alert(5)>',
    "</script><script>alert(1)</script>",
    "' onmouseover='alert(2)",
    "<!-- <svg onload=alert(3)>",
    "</section><iframe src=javascript:alert(4)>",
    "]]><![CDATA[<b>x</b>",
    "&lt;i&gt;already escaped&lt;/i&gt;",
    "a\nb\u2028c<br>",
    "[red]x[/] {{x}} ${x}",
    "#top",
]
# Text with the characters that matter to HTML, and any other character, around the payloads.
hostile_text = st.one_of(
    st.sampled_from(PAYLOADS),
    st.text(st.sampled_from("<>\"'&=/ !-#;:x[]\n"), min_size=1, max_size=16),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12),
)


def _safe_file_name(name: str) -> str:
    """A hostile string as one path component (no '/' or NUL, not '.' or '..', under 255 bytes)."""
    name = name.replace("/", "\u2215").replace("\0", "")[:60]
    return name if name not in ("", ".", "..") else f"{name}_"


def names(n: int) -> st.SearchStrategy[list[str]]:
    """``n`` distinct hostile names; a prefix keeps them apart from every real name (full, linear, ...)."""
    return st.lists(hostile_text, min_size=n, max_size=n, unique_by=lambda s: s).map(lambda xs: [f"m{x}" for x in xs])


def worst(n: int) -> list[str]:
    """The first ``n`` payloads as names: every test tries them first (hypothesis' explicit example)."""
    return [f"m{p}" for p in PAYLOADS[:n]]


def benign(n: int) -> list[str]:
    return [f"m{chr(97 + i)}" for i in range(n)]


class Elements(HTMLParser):
    """Every element of a page as (tag, its attribute names)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: set[tuple[str, tuple[str, ...]]] = set()
        self.ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.add((tag, tuple(sorted(a for a, _ in attrs))))
        self.ids += [v or "" for a, v in attrs if a == "id"]

    handle_startendtag = handle_starttag


def elements(page: str) -> Elements:
    parser = Elements()
    parser.feed(page)
    parser.close()
    return parser


def same_elements(build: Callable[[list[str], str, Path], str], hostile: list[str], folder: str) -> None:
    """The page of ``hostile`` names (in a run directory named ``folder``) against the page of benign ones."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = elements(build(benign(len(hostile)), "run", Path(tmp) / "benign"))
        bad = elements(build(hostile, _safe_file_name(folder), Path(tmp) / "hostile"))
    assert bad.found == plain.found, sorted(bad.found ^ plain.found)
    assert all(i == slug(i) for i in bad.ids), bad.ids  # every id is a plain one


PHASES = (Phase.explicit, Phase.reuse, Phase.generate)  # no shrinking: a failure shows its example at once
EXAMPLES = int(os.environ.get("ATTNBENCH_PROPERTY_EXAMPLES", "4"))
FAST = settings(max_examples=EXAMPLES, deadline=None, phases=PHASES, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------- the sweep report and the compare page
def _sweep_rows(mechs: list[str], latency: float) -> list[dict]:
    rows = [row("full", hw, latency, device="cpu") for hw in (8, 16)]
    for i, m in enumerate(mechs):
        knobs = {m: mechs[-1 - i], "topk": m}
        rows += [row(m, hw, latency * (1 + i) / 2, device="cpu", knobs=knobs, impl=m) for hw in (8, 16)]
        rows.append(row(m, 32, None, device="cpu", knobs=knobs, impl=m, status="error", reason=m))
    return rows


def _sweep_report(mechs: list[str], folder: str, root: Path) -> str:
    run = load_run(write_run(root / folder, _sweep_rows(mechs, 1.0), {**ENV, "cpu_model": mechs[0]}))
    return build_report([run])


def _compare_page(mechs: list[str], folder: str, root: Path) -> str:
    base = load_run(write_run(root / folder, _sweep_rows(mechs, 1.0), ENV))
    new = load_run(write_run(root / f"{folder}-new", _sweep_rows(mechs, 1.5)[:-1], ENV))
    return build_compare_page(compare(base, new, force=True), base, new)


@FAST
@given(names(3), hostile_text)
@example(worst(3), PAYLOADS[0])
def test_sweep_report(mechs, folder):
    same_elements(_sweep_report, mechs, folder)


@FAST
@given(names(3), hostile_text)
@example(worst(3), PAYLOADS[0])
def test_compare_page(mechs, folder):
    same_elements(_compare_page, mechs, folder)


# ---------------------------------------------------------------------- the reproduce page
def _experiment_page(strings: list[str], folder: str, root: Path) -> str:
    experiment, a, b, text, data = strings
    out = root / folder
    store = ResultsStore(out)
    store.open({"cpu_model": text})
    for variant, accs in ((a, [0.9, 0.8, 0.85]), (b, [0.5, 0.52, 0.51])):
        for seed, acc in enumerate(accs):
            store.append({
                "point_id": f"exp:{experiment}:quick:{variant}:seed{seed}", "kind": "experiment", "status": "ok",
                "experiment": experiment, "mode": "quick", "variant": variant, "seed": seed, "accuracy": acc,
                "params": 1000, "macs": 1e6, "resolution": 32, "published": {"top1": 80.0, "source": text},
            })  # fmt: skip
        store.append({
            "point_id": f"exp:{experiment}:quick:{variant}:cost32", "kind": "experiment_cost",
            "experiment": experiment, "mode": "quick", "variant": variant, "resolution": 32, "batch": 4,
            "latency_ms_median": 2.0, "latency_ms_p20": 1.5, "latency_ms_p80": 2.5, "peak_bytes": 2**20, "macs": 1e6,
        })  # fmt: skip
    meta = {"name": experiment, "title": text, "task": text, "paper": text, "notes": text}
    (out / "experiment.json").write_text(json.dumps({"quick": {"experiment": meta, "data": data}}))
    return exp_page.build_page([out])


@FAST
@given(names(5), hostile_text)
@example(worst(5), PAYLOADS[0])
def test_reproduce_page(strings, folder):
    same_elements(_experiment_page, strings, folder)


# ---------------------------------------------------------------------- the match page and the footprint page
MATCH_RUN = Path(__file__).resolve().parents[2] / "results" / "match-quick"


def _match_page(strings: list[str], folder: str, root: Path) -> str:
    mechs, data = strings[:4], strings[4]
    out = root / folder
    shutil.copytree(MATCH_RUN, out)
    rename = dict(zip(("full", "linear", "pvt", "quadtree"), mechs, strict=True))
    for name in ("results.jsonl", "footprints.jsonl"):
        lines = []
        for line in (out / name).read_text().splitlines():
            rec = json.loads(line)
            rec["mechanism"] = rename[rec["mechanism"]]
            if name == "results.jsonl":
                rec |= {"data": f"{data}/{data}.png", "preset": data, "knobs": {data: data}}
            lines.append(json.dumps(rec))
        (out / name).write_text("\n".join(lines) + "\n")
    return matching.build_report(out)


@settings(max_examples=max(2, EXAMPLES // 2), deadline=None, phases=PHASES, suppress_health_check=list(HealthCheck))
@given(names(5), hostile_text)
@example(worst(5), PAYLOADS[0])
def test_match_page(strings, folder):
    same_elements(_match_page, strings, folder)


def _footprint_page(mechs: list[str], folder: str, root: Path) -> str:
    weights = [[(i * 4 + j) / 16 for j in range(4)] for i in range(4)]
    panels = [
        {"mechanism": m, "knobs": {m: m}, "kind": kind, "query": [1, 2], "query_hw": [4, 4], "weights": weights,
         "keys_per_query": 16, "macs": 1000}
        for m, kind in zip(mechs, ("self", "cross"), strict=True)
    ]  # fmt: skip
    (root / folder).mkdir(parents=True)
    return matching.write_footprint_page(panels, root / folder / "f.html").read_text()


@FAST
@given(names(2), hostile_text)
@example(worst(2), PAYLOADS[0])
def test_footprint_page(mechs, folder):
    same_elements(_footprint_page, mechs, folder)


def test_slug_keeps_plain_ids_and_makes_any_other_one_safe_and_distinct():
    assert slug("crossover") == "crossover" and slug("plot-0") == "plot-0"
    made = [slug(x) for x in PAYLOADS + ["a b", "a-b", "", "1x"]]
    assert len(set(made)) == len(made)
    assert all(m[0].isalpha() and all(c.isalnum() or c in "-_" for c in m) for m in made)


def test_an_experiment_name_cannot_open_an_element_in_the_reproduce_page(tmp_path):
    name = 'q"><img src=x onerror=alert(5)>'
    page = _experiment_page([name, "a", "b", "t", "synthetic"], "run", tmp_path)
    assert "<img" not in page and ("img", ("onerror", "src")) not in elements(page).found
    assert f'id="{slug(name)}"' in page
