"""One import root: the wheel installs the package ``attnbench`` and nothing else at the top of site-packages.

The wheel is built from a copy of the checkout, installed into a fresh virtual environment (no dependencies),
and then imported from a folder outside the checkout with that environment's site-packages first on the path
(torch and the rest come from the interpreter running the tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".nox", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".whl", "results")


def _site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python*/site-packages")) + sorted(env.glob("Lib/site-packages"))
    assert found, f"no site-packages under {env}"
    return found[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, set[str]]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    dist = tmp / "dist"
    # Without setuptools here, pip builds in an isolated environment (from the package index).
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") is not None else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheels = list(dist.glob("attnbench-*.whl"))
    assert len(wheels) == 1, wheels
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    site = _site_packages(env)
    before = {p.name for p in site.iterdir()}
    python = env / ("Scripts" if os.name == "nt" else "bin") / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheels[0]),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return site, {p.name for p in site.iterdir()} - before


def test_the_wheel_installs_one_top_level_package(installed):
    site, added = installed
    top = {name for name in added if not name.endswith(".dist-info") and name != "__pycache__"}
    assert top == {"attnbench"}, f"top-level names other than attnbench: {sorted(top - {'attnbench'})}"
    package = site / "attnbench"
    for sub in ("attentions", "attentions/kernels", "bench", "models", "reports", "studies"):
        assert (package / sub / "__init__.py").is_file(), sub
    assert (package / "cli.py").is_file()
    assert sorted(p.name for p in (package / "experiments").glob("*.yaml")), "the experiment files are not shipped"


def test_the_installed_package_imports_from_itself(installed, tmp_path):
    site, _ = installed
    code = (
        "import json, attnbench, attnbench.cli, attnbench.attentions, attnbench.bench.sweep, attnbench.models,"
        " attnbench.reports\n"
        "from attnbench.studies import experiments\n"
        "print(json.dumps([attnbench.__file__, list(attnbench.__path__), attnbench.attentions.available(),"
        " sorted(p.name for p in experiments.EXPERIMENTS_DIR.glob('*.yaml'))]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True
    )
    init, path, mechanisms, experiment_files = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(init).parent == site / "attnbench"
    assert path == [str(site / "attnbench")], "an installed attnbench must not reach outside itself"
    assert "full" in mechanisms and "quadtree" in mechanisms
    assert experiment_files == sorted(p.name for p in (ROOT / "experiments").glob("*.yaml"))
