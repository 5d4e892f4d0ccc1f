"""A ninth mechanism with a map constraint, registered from tests/plugins only: the quick preset, a sweep,
``flops``, the report and the registry-driven tests cover it with no other file touched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from attnbench.bench import presets
from attnbench.bench.measure import Settings
from attnbench.bench.points import Grid, expand
from attnbench.bench.sweep import run_sweep
from typer.testing import CliRunner

from attnbench import attentions, reports

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "tests" / "plugins"


@pytest.fixture(scope="module")
def tiles():
    sys.path.insert(0, str(PLUGINS))
    import tiles  # noqa: F401  registers "tiles"

    yield attentions.get("tiles")
    # the rest of the session sees the registry as it was: tests that list it at run time stay as they were
    attentions.base._REGISTRY.pop("tiles")
    sys.modules.pop("tiles")
    sys.path.remove(str(PLUGINS))


FAST = Settings(cpu_min_run_time=0.005, min_samples=2, timeout_s=30.0, threads=1, count_flops=True)


def test_quick_preset_fits_the_tile_and_the_report_shows_it(tiles, tmp_path):
    grid = Grid.from_dict({**presets.get("quick")["grid"], "mechanisms": ["tiles"]})
    exp = expand(grid)
    maps = {p.hw for p in exp.points}
    per_map = len(grid.passes) * len(grid.impls)  # every pass and impl of the preset, nothing refused
    assert exp.refused == {} and len(exp.points) == len(maps) * per_map
    (tile,) = {dict(p.knobs)["tile"] for p in exp.points}
    assert tile != tiles.Knobs().tile and all(h % tile == 0 and w % tile == 0 for h, w in maps)
    summary = run_sweep(grid, tmp_path / "run", FAST)
    assert summary.counts == {"ok": len(exp.points)}
    html = reports.build_report([reports.load_run(tmp_path / "run")])
    assert "tiles" in html


def test_sweep_refuses_a_tile_that_does_not_divide_the_map(tiles, tmp_path):
    grid = Grid(mechanisms=["tiles"], resolutions=["8", "12"], dims=[16], knobs={"tile": [3]}, devices=["cpu"])
    summary = run_sweep(grid, tmp_path / "run", FAST)
    assert summary.counts == {"ok": 1, "skipped": 1}
    (refused,) = expand(grid).refused.values()
    assert "multiples of the tile 3" in refused[0]


def test_flops_counts_it_and_refuses_what_it_refuses(tiles):
    from attnbench import cli

    runner = CliRunner()
    args = ["flops", "--mechanism", "tiles", "--dim", "64", "--heads", "2", "--knob", "tile=4", "--resolution"]
    ok = runner.invoke(cli.app, [*args, "12"])
    assert ok.exit_code == 0, ok.output
    macs = attentions.build("tiles", dim=64, heads=2, tile=4).macs(1, (12, 12))
    assert f"{macs:,}" in ok.output
    bad = runner.invoke(cli.app, [*args, "10"])
    assert bad.exit_code == 2 and "multiples of the tile 4" in " ".join(bad.output.replace("│", " ").split())


def test_registry_driven_tests_run_over_it(tiles):
    env = {**os.environ, "ATTNBENCH_PLUGINS": "tiles", "PYTHONPATH": os.pathsep.join([str(ROOT), str(PLUGINS)])}
    files = ["tests/attentions/test_contract.py", "tests/bench/test_flops.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "tiles", *files],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    passed = int(run.stdout.split(" passed")[0].split()[-1])
    assert passed >= 10, run.stdout[-2000:]
