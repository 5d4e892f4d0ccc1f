"""The documentation cannot drift: the generated reference pages match the code, the README stays short and
its Python example runs, and every page is in the site's navigation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_reference_pages_regenerate_to_the_committed_ones(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ATTNBENCH_PLUGINS"}  # the registry as shipped
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "scripts/gen_docs.py", "--out", str(tmp_path)], cwd=ROOT, env=env, check=True)
    fresh = sorted(p.name for p in tmp_path.glob("*.md"))
    committed = sorted(p.name for p in (ROOT / "docs" / "reference").glob("*.md"))
    assert fresh == committed == ["cli.md", "experiment-format.md", "mechanisms.md", "results-schema.md"]
    stale = [n for n in fresh if (tmp_path / n).read_text() != (ROOT / "docs" / "reference" / n).read_text()]
    assert not stale, f"{stale} differ from the code: run `python scripts/gen_docs.py` and commit docs/reference"


def test_a_field_without_words_stops_the_generator(monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_docs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from attnbench.bench import store

    monkeypatch.setitem(store.POINT_FIELDS, "new_field", "int")
    try:
        gen_docs.schema_page()
    except SystemExit as exc:
        assert "new_field" in str(exc)
    else:
        raise AssertionError("an undocumented field went through")


def test_readme_is_short_and_its_python_example_runs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert text.splitlines()[3:5] == [
        "python3 -m pip install -q nox && python3 -m nox -s quick   # main job: all mechanisms at 16x16..64x64 "
        "on the CPU, HTML report in runs/quick/report.html",
        "python3 -m pip install -q nox && python3 -m nox -s tests   # the tests (CPU)",
    ]
    assert "chromium" in text.split("## ")[0].lower()
    example = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    assert "from attnbench import attentions" in example
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["y"].shape == scope["x"].shape


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        for v in item.values() if isinstance(item, dict) else [item]:
            out += _nav_pages(v) if isinstance(v, list) else [v]
    return out


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = set(_nav_pages(config["nav"]))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert nav == pages
    assert {"kernels.md", "video.md", "performance.md"} <= nav
    assert all(v == "warn" for v in config["validation"].values())  # strict then fails on each
