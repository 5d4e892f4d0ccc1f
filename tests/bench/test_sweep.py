"""The sweep harness on the CPU: grid expansion, failure kinds, the results store,
resume after a kill, the executors and the DataFrame schema."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import bench_fakes
import numpy as np
import pandas as pd
import pytest
from attnbench.bench import executors, store
from attnbench.bench.hardware import lookup
from attnbench.bench.measure import Settings
from attnbench.bench.points import Grid, GridError, expand, parse_knob, parse_resolution, split_values
from attnbench.bench.sweep import load_sweep_file, resolve_request, run_sweep

from attnbench import attentions

# Importing the fakes registers them (that is how ATTNBENCH_PLUGINS loads them in a
# worker); in this process they are registered only inside the `fakes` fixture, so
# registry-driven tests elsewhere never see them.
bench_fakes.unregister_all()

REPO = Path(__file__).resolve().parents[2]
FAKES_DIR = str(Path(__file__).resolve().parent)


def G(**kw) -> Grid:
    """A grid on the CPU (the default device is cuda where a GPU is present)."""
    kw.setdefault("devices", ["cpu"])
    return Grid(**kw)


FAST = Settings(cpu_min_run_time=0.01, min_samples=3, timeout_s=30.0, threads=1)


@pytest.fixture
def fakes():
    bench_fakes.register_all()
    yield
    bench_fakes.unregister_all()


def plugin_env() -> dict[str, str]:
    env = dict(os.environ)
    env["ATTNBENCH_PLUGINS"] = "bench_fakes"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), FAKES_DIR, env.get("PYTHONPATH", "")])
    return env


# ---------------------------------------------------------------- grid expansion


def test_expansion_is_the_cartesian_product_with_stable_ids():
    grid = G(
        mechanisms=["full", "linear"],
        resolutions=["8", "8x12"],
        batches=[1, 2],
        dims=[32],
        heads=[2],
        passes=["fwd", "fwd+bwd"],
        impls=["reference", "fast"],
    )
    points = expand(grid).points
    assert len(points) == 2 * 2 * 2 * 2 * 2
    assert len({p.point_id for p in points}) == len(points)
    assert [p.point_id for p in expand(grid).points] == [p.point_id for p in points]
    p = next(p for p in points if p.width == 12)
    assert (p.height, p.width, p.tokens) == (8, 12, 96)
    # knobs hold the mechanism's full resolved knob set
    assert p.knob_dict() == attentions.get(p.mechanism).knob_defaults()
    row = p.to_json()
    assert row["knobs"] == p.knob_dict() and row["pass"] in ("fwd", "fwd+bwd") and row["cross"] is False


def test_knob_axes_apply_to_mechanisms_that_have_the_knob(fakes):
    grid = G(mechanisms=["full", "fake_probe"], resolutions=["4"], dims=[8], knobs={"width_mult": ["1", "2", "3"]})
    points = expand(grid).points
    assert sorted(p.knob_dict()["width_mult"] for p in points if p.mechanism == "fake_probe") == [1, 2, 3]
    assert sum(p.mechanism == "full" for p in points) == 1
    with pytest.raises(GridError, match="belongs to none"):
        expand(G(mechanisms=["full"], knobs={"width_mult": [2]}))
    with pytest.raises(attentions.KnobError, match="delay"):
        expand(G(mechanisms=["fake_probe"], knobs={"delay": ["-1"]}))


def test_cost_knob_selection_is_generic(fakes):
    grid = G(cost_knob_names=["width_mult"], cost_knob_values={"width_mult": [2, 4]}, resolutions=["4"], dims=[8])
    points = expand(grid).points
    assert {p.mechanism for p in points} == {"fake_probe"}
    assert sorted(p.knob_dict()["width_mult"] for p in points) == [2, 4]


def test_resolutions_and_stages():
    assert parse_resolution("64")[0].hw == (64, 64)
    assert parse_resolution("64x96")[0].hw == (64, 96)
    s2 = parse_resolution("224px:s2")[0]
    assert (s2.hw, s2.stage, s2.image) == ((28, 28), 2, (224, 224))
    assert [r.hw for r in parse_resolution("224px")] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert parse_resolution("1024x512px:s4")[0].hw == (32, 16)
    with pytest.raises(GridError, match="cannot read resolution"):
        parse_resolution("big")
    points = expand(G(mechanisms=["full"], resolutions=["224px"], dims=["stage"])).points
    assert [(p.height, p.dim, p.heads, p.stage) for p in points] == [
        (56, 96, 3, 1),
        (28, 192, 6, 2),
        (14, 384, 12, 3),
        (7, 768, 24, 4),
    ]


def test_static_refusals_are_returned_with_reasons():
    exp = expand(G(mechanisms=["full"], resolutions=["4"], dims=[30], heads=[4], impls=["fast", "kernel9"]))
    assert len(exp.points) == 2
    reasons = ["; ".join(r) for r in exp.refused.values()]
    assert any("dim (30) must be divisible by heads (4)" in r for r in reasons)
    assert any("'kernel9' is not one of full's implementations" in r for r in reasons)


def test_pooling_widening_to_a_width_the_heads_divide_sweeps(tmp_path):
    # dim 30 is not a multiple of 4 heads, but pooling's heads split dim_out = 32: the harness accepts it
    grid = G(mechanisms=["pooling"], resolutions=["8"], dims=[30], heads=[4], knobs={"dim_out": [32]})
    exp = expand(grid)
    assert len(exp.points) == 1 and exp.refused == {}
    summary = run_sweep(grid, tmp_path / "run", FAST)
    assert summary.counts == {"ok": 1}


def test_cli_value_parsing():
    assert split_values(["8,16", "32"]) == ["8", "16", "32"]
    assert parse_knob("topk=4,8,16") == ("topk", ["4", "8", "16"])
    assert parse_knob("topk=[16,8,8],[8,4,4]") == ("topk", [["16", "8", "8"], ["8", "4", "4"]])
    with pytest.raises(GridError):
        parse_knob("topk")
    grid, settings = resolve_request(
        preset="quick", axes={"mechanisms": ["full"], "compile": ["both"]}, knobs=["qkv_bias=false"]
    )
    assert grid.mechanisms == ["full"] and grid.compile == [False, True] and grid.knobs == {"qkv_bias": ["false"]}
    assert settings.threads == 1


def test_sweep_files(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "grid:\n  mechanisms: [full]\n  resolutions: ['8x12']\nsettings:\n  timeout_s: 5\nslurm:\n  mem_gb: 8\n"
    )
    (tmp_path / "s.toml").write_text('mechanisms = ["linear"]\nresolutions = ["16"]\n')
    (tmp_path / "bad.yaml").write_text("!!python/object/apply:os.system ['true']\n")
    assert load_sweep_file(tmp_path / "s.yaml")["settings"] == {"timeout_s": 5}
    assert load_sweep_file(tmp_path / "s.yaml")["slurm"] == {"mem_gb": 8}
    assert load_sweep_file(tmp_path / "s.toml")["grid"]["mechanisms"] == ["linear"]
    with pytest.raises(Exception, match="python/object"):  # yaml.safe_load refuses code
        load_sweep_file(tmp_path / "bad.yaml")
    with pytest.raises(GridError, match="unknown sweep field"):
        resolve_request(config=tmp_path / "s.yaml", axes={"colour": ["red"]})


# ---------------------------------------------------------------- measurement and failure kinds


def test_every_failure_kind_is_recorded(tmp_path, fakes):
    events = []
    grid = G(
        mechanisms=["fake_probe"],
        resolutions=["4", "5x4"],
        dims=[8],
        knobs={"fail": ["none", "oom", "error", "nan"]},
        passes=["fwd+bwd"],
    )
    summary = run_sweep(grid, tmp_path / "run", FAST, on_event=lambda k, d: events.append((k, d)))
    assert summary.counts == {"ok": 1, "oom": 1, "error": 2, "skipped": 4}
    df = store.load(tmp_path / "run")
    by = {(r.knobs["fail"], r.height): r for r in df.itertuples()}
    assert "odd" in by[("none", 5)].reason and by[("none", 5)].status == "skipped"
    assert by[("oom", 4)].status == "oom" and "out of memory" in by[("oom", 4)].reason
    assert by[("error", 4)].status == "error" and "simulated failure" in by[("error", 4)].reason
    assert by[("nan", 4)].status == "error" and "NaN" in by[("nan", 4)].reason
    ok = by[("none", 4)]
    assert ok.status == "ok" and ok.samples >= 3 and ok.latency_ms_p20 <= ok.latency_ms_median <= ok.latency_ms_p80
    assert [k for k, _ in events][0] == "start" and [k for k, _ in events][-1] == "end"

    # timeout: a budget in process (the first call alone outlives the limit)
    slow = G(mechanisms=["fake_probe"], resolutions=["4"], dims=[8], knobs={"fail": ["slow"]})
    run_sweep(slow, tmp_path / "slow", Settings(timeout_s=0.3, threads=1))
    (rec,) = store.read_results(tmp_path / "slow").records
    assert rec["status"] == "timeout" and "per-point limit" in rec["reason"]


def test_memory_grows_quadratically_for_full_math_and_linearly_for_linear(tmp_path):
    grid = G(
        mechanisms=["full", "linear"], resolutions=["8", "16", "32"], dims=[32], heads=[2], impls=["reference", "fast"]
    )
    run_sweep(grid, tmp_path / "run", Settings(cpu_min_run_time=0.01, min_samples=3, threads=1, count_flops=False))
    df = store.load(tmp_path / "run")
    assert (df.status == "ok").all()

    def exponent(mech: str, impl: str) -> float:
        g = df[(df.mechanism == mech) & (df.impl == impl)].sort_values("tokens")
        return float(np.polyfit(np.log(g.tokens.astype(float)), np.log(g.peak_bytes.astype(float)), 1)[0])

    assert exponent("full", "reference") > 1.6
    assert exponent("linear", "fast") < 1.2


# ---------------------------------------------------------------- store, schema, resume


def test_dataframe_schema_and_derived_columns(tmp_path):
    run_sweep(G(mechanisms=["full"], resolutions=["8"], dims=[16], passes=["fwd", "fwd+bwd"]), tmp_path / "r", FAST)
    df = store.load(tmp_path / "r")
    assert list(df.columns[: len(store.SCHEMA)]) == list(store.SCHEMA)
    for col in ("flops", "tflops", "peak_tflops", "pct_peak", "bytes_per_token"):
        assert col in df.columns
    assert str(df["tokens"].dtype) == "Int64" and str(df["latency_ms_median"].dtype) == "float64"
    assert df[df["pass"] == "fwd+bwd"].backward_macs.iloc[0] > 0  # measured by the counter
    row = df[df["pass"] == "fwd"].iloc[0]
    assert row.macs == attentions.build("full", dim=16, heads=2).macs(1, (8, 8))
    assert row.flops == 2 * row.macs
    assert row.bytes_per_token == pytest.approx(row.peak_bytes / 64)
    assert row.tflops == pytest.approx(2 * row.macs / (row.latency_ms_median / 1e3) / 1e12)
    assert math.isnan(row.pct_peak)  # no peak for a CPU
    assert row.peak_bytes > 0 and row.baseline_bytes > 0 and "profiler" in row.memory_method
    assert row.threads == 1 and row.params == sum(
        p.numel() for p in attentions.build("full", dim=16, heads=2).parameters()
    )
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    for key in ("gpu_name", "gpu_count", "driver", "cuda", "torch", "triton", "python", "cpu_model", "threads"):
        assert key in env
    assert env["threads"] == 1 and "git_rev" in env and "git_dirty" in env and "time" in env


def test_percent_of_peak_from_the_hardware_table(tmp_path):
    assert lookup("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
    assert lookup("NVIDIA H100 PCIe").name == "NVIDIA H100 PCIe"
    assert lookup("NVIDIA A100-SXM4-80GB").bandwidth_gbs == 2039.0
    assert lookup("NVIDIA GeForce RTX 4090").bf16 == 165.2
    assert lookup("NVIDIA L4").fp32 == 30.3 and lookup("NVIDIA H200").bandwidth_gbs == 4800.0
    assert lookup("Some Laptop GPU") is None
    assert lookup("NVIDIA GH200 480GB") is None and lookup("NVIDIA GH200 144G HBM3e") is None  # not an H200
    # The NVL boards are not the SXM parts of the same name.
    assert lookup("NVIDIA H200 NVL").name == "NVIDIA H200 NVL" and lookup("NVIDIA H200").name == "NVIDIA H200 SXM"
    assert lookup("NVIDIA H200 NVL").bf16 < lookup("NVIDIA H200").bf16
    assert lookup("NVIDIA H100 NVL").bandwidth_gbs == 3900.0
    run = tmp_path / "gpu"
    run.mkdir()
    (run / "env.json").write_text(json.dumps({"gpu_name": "NVIDIA H100 80GB HBM3"}))
    point = expand(G(mechanisms=["full"], resolutions=["10"], dtypes=["bfloat16"], devices=["cuda"])).points[0]
    row = {**point.to_json(), "status": "ok"}
    row |= {"tokens": 100, "macs": 10**9, "latency_ms_median": 1.0, "peak_bytes": 1000}
    (run / "results.jsonl").write_text(json.dumps(row) + "\n")
    r = store.load(run).iloc[0]
    assert r.tflops == pytest.approx(2.0) and r.pct_peak == pytest.approx(100 * 2.0 / 989.5)
    assert r.bytes_per_token == pytest.approx(10.0)


def test_corrupt_lines_are_reported_not_fatal(tmp_path):
    grid = G(mechanisms=["full"], resolutions=["4"], dims=[8])
    run_sweep(grid, tmp_path / "r", FAST)
    path = tmp_path / "r" / store.RESULTS
    good = path.read_text()
    path.write_text("not json\n" + good + '{"point_id": "x", "stat')  # a write cut short
    rep = store.read_results(tmp_path / "r")
    assert len(rep.records) == 1 and len(rep.corrupt) == 2 and rep.trailing_corrupt
    df = store.load(tmp_path / "r")
    assert len(df) == 1 and len(df.attrs["corrupt"]) == 2 and "trailing line" in df.attrs["corrupt"][1]
    # resuming moves the cut-short line aside and appends on a clean line
    warnings = []
    bigger = G(mechanisms=["full"], resolutions=["4", "6"], dims=[8])
    run_sweep(
        bigger, tmp_path / "r", FAST, append=True, on_event=lambda k, d: warnings.append(d) if k == "warning" else None
    )
    assert len(warnings) == 2
    assert (tmp_path / "r" / store.CORRUPT).read_text().startswith('{"point_id": "x"')
    rep = store.read_results(tmp_path / "r")
    assert len(rep.records) == 2 and [c[1] for c in rep.corrupt] == ["not json"]


def test_resume_measures_only_what_is_missing(tmp_path):
    seen: list[str] = []

    class Counting(executors.InProcess):
        def run(self, points, settings):
            points = list(points)
            seen.extend(p.point_id for p in points)
            yield from super().run(points, settings)

    small = G(mechanisms=["full"], resolutions=["4"], dims=[8], passes=["fwd", "fwd+bwd"])
    run_sweep(small, tmp_path / "r", FAST, executor=Counting())
    assert len(seen) == 2
    big = G(mechanisms=["full"], resolutions=["4", "6"], dims=[8], passes=["fwd", "fwd+bwd"])
    summary = run_sweep(big, tmp_path / "r", FAST, executor=Counting(), append=True)
    assert len(seen) == 4 and len(set(seen)) == 4 and summary.stored == 2
    ids = [r["point_id"] for r in store.read_results(tmp_path / "r").records]
    assert sorted(ids) == sorted(p.point_id for p in expand(big).points)
    # the environment must match to append to a run
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    env["torch"] = "0.0.1"
    (tmp_path / "r" / "env.json").write_text(json.dumps(env))
    with pytest.raises(store.StoreError, match="another environment"):
        run_sweep(big, tmp_path / "r", FAST, append=True)


def test_reading_results_needs_no_torch(tmp_path):
    run_sweep(G(mechanisms=["full"], resolutions=["4"], dims=[8]), tmp_path / "r", FAST)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from attnbench import bench\nimport attnbench.bench.hardware\n"
        f"df = bench.load({str(tmp_path / 'r')!r}); assert len(df) == 1, df\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------- kill and resume, executors


@pytest.mark.slow
def test_killing_a_sweep_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "attnbench",
        "sweep",
        "-m",
        "fake_probe",
        "-r",
        "4,6,8",
        "--dim",
        "8",
        "--device",
        "cpu",
    ]
    cmd += ["--knob", "width_mult=1,2", "--knob", "delay=0.05", "--out", str(out), "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=plugin_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / store.RESULTS
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed; make its points slower"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = store.read_results(out).records
    assert 2 <= len(first) < 6
    subprocess.run(cmd, cwd=REPO, env=plugin_env(), check=True, capture_output=True, timeout=300)
    ids = [r["point_id"] for r in store.read_results(out).records]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert {r["point_id"] for r in first} <= set(ids)
    assert all(r["status"] == "ok" for r in store.read_results(out).records)


@pytest.mark.slow
def test_subprocess_executor_isolates_crashes_and_kills_at_the_hard_limit(fakes):
    pts = expand(G(mechanisms=["fake_probe"], resolutions=["4"], dims=[8], knobs={"fail": ["crash", "oom"]})).points
    ex = executors.Subprocess(env={"ATTNBENCH_PLUGINS": "bench_fakes", "PYTHONPATH": FAKES_DIR})
    recs = {r["knobs"]["fail"]: r for r in ex.run(pts, FAST)}
    assert recs["oom"]["status"] == "oom" and "out of memory" in recs["oom"]["reason"]
    assert recs["crash"]["status"] == "error" and "signal 9" in recs["crash"]["reason"]
    # the hard limit: timeout_s + start-up grace, here shorter than the start-up itself
    hard = executors.Subprocess(startup_grace_s=0.2, env={"ATTNBENCH_PLUGINS": "bench_fakes", "PYTHONPATH": FAKES_DIR})
    (rec,) = list(hard.run(pts[:1], Settings(timeout_s=0.1)))
    assert rec["status"] == "timeout" and "killed" in rec["reason"]


@pytest.mark.slow
def test_multi_device_executor_runs_workers_in_parallel():
    pts = expand(G(mechanisms=["full"], resolutions=["4", "6"], dims=[8])).points
    recs = list(executors.MultiDevice(["cpu", "cpu"]).run(pts, FAST))
    assert sorted(r["point_id"] for r in recs) == sorted(p.point_id for p in pts)
    assert all(r["status"] == "ok" and r["worker_device"] == "cpu" for r in recs)
    with pytest.raises(ValueError, match="--device cuda"):
        executors.MultiDevice(["cuda:0", "cuda:1"]).validate(expand(G(devices=["cuda:1"])).points)


@pytest.mark.slow
def test_submitit_local_executor(tmp_path):
    submitit = pytest.importorskip("submitit")
    pts = expand(G(mechanisms=["full"], resolutions=["4"], dims=[8], passes=["fwd+bwd"])).points
    local = submitit.LocalExecutor(folder=str(tmp_path / "jobs"))
    ex = executors.Submitit(tmp_path / "jobs", executor=local, poll_s=0.2)
    recs = list(ex.run(pts, FAST))
    assert sorted(r["point_id"] for r in recs) == sorted(p.point_id for p in pts)
    assert all(r["status"] == "ok" and r["job_id"] for r in recs)


def test_cli_sweep_and_env(tmp_path):
    from typer.testing import CliRunner

    from attnbench import cli

    runner = CliRunner()
    res = runner.invoke(
        cli.app, ["sweep", "-m", "full", "-r", "4x6", "--dim", "8", "--device", "cpu", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 0, res.output
    df = store.load(tmp_path / "r")
    assert len(df) == 1 and df.status.iloc[0] == "ok" and (df.height.iloc[0], df.width.iloc[0]) == (4, 6)
    # --resume with no axes reruns the stored sweep: nothing is missing, nothing is added
    res = runner.invoke(cli.app, ["sweep", "--resume", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert len(store.read_results(tmp_path / "r").records) == 1
    res = runner.invoke(cli.app, ["sweep", "-m", "full", "--knob", "nope=1", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "belongs to none" in res.output
    res = runner.invoke(cli.app, ["env", "--json"])
    assert res.exit_code == 0 and "torch" in json.loads(res.output)


def test_records_store_their_timed_seconds_and_the_sweep_reports_the_share(tmp_path):
    """Each record's ``timed_s`` (its timed regions) lies within the point's own wall time, and the sweep's
    end event and the CLI report the timed seconds as a share of the sweep's wall time."""
    events: list[tuple[str, dict]] = []
    grid = G(mechanisms=["full", "linear"], resolutions=["4", "6"], dims=[8], passes=["fwd", "fwd+bwd"])
    summary = run_sweep(grid, tmp_path / "r", FAST, on_event=lambda kind, data: events.append((kind, data)))
    records = store.read_results(tmp_path / "r").records
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    for r in records:
        assert 0 < r["timed_s"] <= r["wall_s"], (r["timed_s"], r["wall_s"])
    end = [d for k, d in events if k == "end"][0]
    assert math.isclose(end["timed_s"], sum(r["timed_s"] for r in records), rel_tol=1e-6)
    assert end["timed_share"] == pytest.approx(end["timed_s"] / end["wall_s"]) and 0 < end["timed_share"] < 1
    assert summary.timed_s == end["timed_s"] and summary.wall_s == end["wall_s"]

    from typer.testing import CliRunner

    from attnbench import cli

    args = ["sweep", "-m", "full", "-r", "4", "--dim", "8", "--device", "cpu", "--out", str(tmp_path / "c")]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    assert "timed share" in res.output and "[1/1] ok full 4x4" in res.output  # not a terminal: a line per point


def test_dataframe_of_an_empty_run_has_the_schema(tmp_path):
    (tmp_path / "e").mkdir()
    df = store.load(tmp_path / "e")
    assert len(df) == 0 and list(df.columns[: len(store.SCHEMA)]) == list(store.SCHEMA)
    assert isinstance(df, pd.DataFrame)


@pytest.mark.parametrize("name", ["quick", "smoke"])
def test_cpu_presets_run_every_mechanism(name):
    from attnbench.bench import presets
    from attnbench.bench.measure import precheck

    grid, settings = resolve_request(preset=name)
    exp = expand(grid)
    assert {p.mechanism for p in exp.points} == set(attentions.available())
    assert not exp.refused
    refused = {p.label(): precheck(p) for p in exp.points if precheck(p)}
    assert not refused, refused
    if name == "quick":  # the main job compares at maps where the mechanisms differ, at a Swin-T stage width
        assert max(p.tokens for p in exp.points) >= 64 * 64 and {p.dim for p in exp.points} == {96}
    assert set(presets.names()) >= {"quick", "smoke", "scaling", "topk", "batch", "paper"}
    topk = expand(Grid.from_dict(presets.get("topk")["grid"]))
    assert all(attentions.get(p.mechanism).cost_knob == "topk" for p in topk.points)


cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_measurement_and_real_oom(tmp_path):
    grid = Grid(
        mechanisms=["full"],
        resolutions=["32", "128"],
        batches=[1, 64],
        dims=[256],
        heads=[4],
        dtypes=["bfloat16"],
        passes=["fwd+bwd"],
        impls=["reference"],
        devices=["cuda"],
    )
    run_sweep(grid, tmp_path / "g", Settings(timeout_s=60.0))
    df = store.load(tmp_path / "g")
    small = df[(df.height == 32) & (df.batch == 1)].iloc[0]
    assert small.status == "ok" and "cuda events" in small.timing_method and small.samples >= 3
    assert small.memory_method.startswith("torch.cuda") and 0 < small.peak_bytes <= small.reserved_bytes
    # 64 x 4 heads x 16384^2 scores (over 250 GiB in bf16) cannot fit: a real out-of-memory, recorded,
    # and the sweep went on
    huge = df[(df.height == 128) & (df.batch == 64)].iloc[0]
    assert huge.status == "oom", huge.reason
    assert len(df) == 4 and (df.status == "ok").sum() == 3
    if lookup(small.device_name) is not None:
        assert 0 < small.pct_peak < 100


def test_a_failing_counter_leaves_the_analytic_count(tmp_path, monkeypatch):
    from attnbench.bench import flops, measure

    def broken(*args, **kwargs):
        raise RuntimeError("counter broke")

    monkeypatch.setattr(flops, "count", broken)
    monkeypatch.setattr(measure, "_FLOP_CACHE", {})
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))  # nothing counted before
    run_sweep(G(mechanisms=["full"], resolutions=["4"], dims=[8], passes=["fwd+bwd"]), tmp_path / "r", FAST)
    (rec,) = store.read_results(tmp_path / "r").records
    assert rec["status"] == "ok" and "counter broke" in rec["macs_error"]
    assert rec["macs"] == attentions.build("full", dim=8, heads=2).macs(1, (4, 4)) and rec["counted_macs"] is None
    assert not list((tmp_path / "cache").rglob("*.json"))  # a failed count is not remembered
