"""The CPU dry run of scripts/gpu_run.sh: every phase's commands run (tiny grid, CPU) and the plan of the GPU run
is printed, so the first GPU run is not the first run of the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_run.sh"
sys.path.insert(0, str(REPO / "scripts"))

import gpu_run  # noqa: E402

SWEEP_PHASES = [p.name for p in gpu_run.PHASES if p.kind == "sweep"]


def run_script(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "ATTNBENCH_SITE": str(tmp / "site")}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("gpu-run")
    out = tmp / "run"
    res = run_script(str(out), "--dry-run", "--pack", str(tmp / "run.tar.gz"), tmp=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res.stdout


def phases(out: Path) -> dict[str, dict]:
    return {r["phase"]: r for r in map(json.loads, (out / "phases.jsonl").read_text().splitlines())}


@pytest.mark.slow  # the dry run: about a minute on 2 cores, two when loaded
def test_every_phase_ran_in_order_and_none_failed(dry_run):
    out, _ = dry_run
    recs = phases(out)  # read before the resume test appends its own records
    assert list(recs) == [p.name for p in gpu_run.PHASES]
    for name, rec in recs.items():
        expected = {"skipped"} if name == "peers" and not gpu_run.peer_sweeps() else {"ok"}
        assert rec["status"] in expected, (name, rec, (out / rec.get("log", "run.log")).read_text()[-2000:])
        assert rec["budget_s"] > 0 and rec["wall_s"] >= 0


@pytest.mark.slow  # the dry run: about a minute on 2 cores, two when loaded
def test_each_sweep_phase_wrote_its_points_as_it_went(dry_run):
    out, _ = dry_run
    for name in SWEEP_PHASES:
        lines = (out / name / "results.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert records and all(r["device"] == "cpu" and r["height"] == 16 for r in records), name
        assert any(r["status"] == "ok" for r in records), name
    flex = [json.loads(x) for x in (out / "windowed" / "results.jsonl").read_text().splitlines()]
    # the CPU cannot run flex: those points are recorded with the reason, not dropped
    assert {r["status"] for r in flex if r["impl"] == "flex"} == {"skipped"}


@pytest.mark.slow  # the dry run: about a minute on 2 cores, two when loaded
def test_env_report_and_pack(dry_run):
    out, _ = dry_run
    assert json.loads((out / "env" / "env.json").read_text())["torch"]
    assert (out / "env" / "nvidia-smi-start.csv").exists() and (out / "env" / "nvidia-smi-end.csv").exists()
    assert (out / "parity" / "junit.xml").exists()
    assert "<html" in (out / "report.html").read_text()[:2000].lower()
    assert "| mechanism |" in (out / "summary.md").read_text()
    import tarfile

    with tarfile.open(out.parent / "run.tar.gz") as tar:
        names = tar.getnames()
    assert "run/phases.jsonl" in names and "run/report.html" in names


@pytest.mark.slow  # the dry run: about a minute on 2 cores, two when loaded
def test_the_plan_prints_points_and_estimates_within_the_budget(dry_run):
    _, stdout = dry_run
    assert "plan of the GPU run" in stdout
    for phase in gpu_run.PHASES:
        assert f"  {phase.name:<9}budget" in stdout
    assert "full bias_table=0 fast fwd: 16x16 32x32 48x48 64x64 96x96 128x128 192x192 256x256 384x384" in stdout
    budget = gpu_run.INSTALL_BUDGET_S + sum(p.budget_s for p in gpu_run.PHASES)
    assert budget <= gpu_run.TOTAL_S <= 300  # a whole second run fits a 15-minute lease with the start-up
    total = [line for line in stdout.splitlines() if line.startswith("  total    budget")][0]
    assert float(total.split("estimated")[1].split("s")[0]) <= 300


@pytest.mark.slow  # the dry run: about a minute on 2 cores, two when loaded
def test_a_rerun_resumes_and_measures_nothing_twice(dry_run, tmp_path):
    out, _ = dry_run
    before = {n: len((out / n / "results.jsonl").read_text().splitlines()) for n in ("full",)}
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_run.py"), str(out), "--dry-run", "--only", "full"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    after = {n: len((out / n / "results.jsonl").read_text().splitlines()) for n in ("full",)}
    assert after == before


def test_a_phase_past_its_time_is_killed_and_the_next_runs(tmp_path):
    args = gpu_run.argparse.Namespace(dry_run=True, tiny=False, pack=None)
    runner = gpu_run.Runner(tmp_path, args, 0.0)
    status, rc = runner.run([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "slow.log", 1.0)
    assert (status, rc) == ("timeout", -9)
    assert "killed" in (tmp_path / "slow.log").read_text()
    status, _ = runner.run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log", 10.0)
    assert status == "failed"


def test_tiny_args_replace_the_sweeps_own_axes():
    mode = gpu_run.argparse.Namespace(dry_run=True, tiny=False)
    args = gpu_run.tiny_args(("--mechanism", "swin", "--resolution", "64,128", "--knob", "window=8"), mode)
    assert args.count("--resolution") == 1 and args[args.index("--resolution") + 1] == "16"
    assert args[args.index("--device") + 1] == "cpu" and "window=8" in args
    full = gpu_run.argparse.Namespace(dry_run=False, tiny=False)
    assert gpu_run.tiny_args(("--resolution", "64"), full) == ["--resolution", "64"]


def test_usage_error_without_an_output_dir(tmp_path):
    res = run_script("--dry-run", tmp=tmp_path)
    assert res.returncode == 2 and "usage" in res.stderr
