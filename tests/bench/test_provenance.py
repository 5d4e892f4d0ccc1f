"""What ran is recorded, and a point whose label would lie is an error, not a number.

Compiled points use Dynamo's ``eager`` backend (graphs captured and counted, no
code generation) so that two dozen of them compile in seconds on the CPU; the
recompile limits they exercise are Dynamo's, whatever the backend.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from attnbench.bench.measure import Settings, measure
from attnbench.bench.points import Grid, expand

from attnbench import bench

REPO = Path(__file__).resolve().parents[2]
FAST = dict(cpu_min_run_time=0.005, min_samples=3, remeasure=0, count_flops=False, compile_backend="eager")


def _sweep(tmp_path, grid: dict, **settings):
    base = {"dims": [16], "heads": [2], "passes": ["fwd", "fwd+bwd"], "devices": ["cpu"]}
    summary = bench.run_sweep(Grid.from_dict({**base, **grid}), tmp_path / "run", Settings(**{**FAST, **settings}))
    return summary, bench.read_results(tmp_path / "run").records


@pytest.mark.slow
def test_compile_sweep_records_a_graph_at_every_point(tmp_path):
    # 4 mechanisms x 3 maps x 2 passes = 24 compiled points, three times Dynamo's default limit of 8
    # entries of the one frame Attention.forward that every mechanism shares.
    grid = {
        "mechanisms": ["full", "linear", "swin", "pvt"],
        "resolutions": ["8", "12", "16"],
        "impls": ["fast"],
        "compile": [True],
        "cost_knob_values": {"window": [4], "sr_ratio": [2]},
    }
    summary, records = _sweep(tmp_path, grid)
    assert summary.total == 24 and len(records) == 24
    for r in records:
        assert r["status"] == "ok", r["reason"]
        c = r["provenance"]["compile"]
        assert c["backend"] == "eager" and c["graphs"] >= 1 and c["frames_compiled"] >= 1
        assert c["compiled_regions_per_step"] >= 1 and c["recompiles"] == 0
    assert {r["mechanism"] for r in records} == {"full", "linear", "swin", "pvt"}


def test_compile_recompile_limit_is_an_error_naming_eager(tmp_path, monkeypatch):
    # Forced: no reset between points and a limit of 1 entry; the later points would run eager.
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    grid = {"mechanisms": ["full"], "resolutions": ["8", "12", "16"], "impls": ["fast"], "compile": [True]}
    with torch._dynamo.config.patch(recompile_limit=1):
        _, records = _sweep(tmp_path, {**grid, "passes": ["fwd"]})
    errors = [r for r in records if r["status"] == "error"]
    assert errors and all("recompile limit" in r["reason"] and "eager" in r["reason"] for r in errors)
    assert all("latency_ms_median" not in r for r in errors)


def test_sdpa_backend_is_recorded():
    grid = {"mechanisms": ["full"], "resolutions": ["8"], "dims": [16], "heads": [2], "impls": ["reference", "fast"]}
    point = expand(Grid.from_dict(grid)).points
    reference = [p for p in point if p.impl == "reference"][0]
    fast = [p for p in point if p.impl == "fast"][0]
    settings = Settings(**FAST)
    assert measure(fast, settings)["provenance"]["sdpa"]  # the CPU kernel SDPA chose, by name
    assert measure(reference, settings)["provenance"]["sdpa"] == {}  # the math reference calls no SDPA


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """Compiled flex attention on the CPU (eager backend) with the CPU test backward unlocked."""
    flex_api = pytest.importorskip("torch.nn.attention.flex_attention")
    from attnbench.attentions.kernels import flex

    monkeypatch.setattr(flex_api, "_validate_device", lambda *tensors: None)
    with warnings.catch_warnings(), flex.compile_config(backend="eager", devices=("cpu", "cuda")):
        warnings.simplefilter("ignore")
        yield flex


FLEX_GRID = {
    "mechanisms": ["full", "swin", "pooling"],
    "resolutions": ["8", "12", "16", "24"],
    "impls": ["flex"],
    "cost_knob_values": {"window": [4], "stride_kv": [2]},
}


@pytest.mark.slow
def test_flex_sweep_never_falls_back(tmp_path, flex_on_cpu):
    # 3 mechanisms x 4 maps x 2 passes = 24 points, 24 shape and grad combinations of the one
    # compiled flex_attention: past 8 of them torch used to run its unfused path.
    summary, records = _sweep(tmp_path, FLEX_GRID)
    assert summary.total == 24 and len(records) == 24
    for r in records:
        assert r["status"] == "ok", r["reason"]
        assert set(r["provenance"]["flex"]) == {"compiled"}, r["provenance"]


def test_flex_forced_fallback_is_an_error_naming_it(tmp_path, monkeypatch, flex_on_cpu):
    torch._dynamo.reset()  # from a clean cache: earlier tests' graphs of these shapes would count against the limit
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    grid = {**FLEX_GRID, "mechanisms": ["swin"], "resolutions": ["8", "12", "16"]}
    with flex_on_cpu.compile_config(recompile_limit=1), torch._dynamo.config.patch(recompile_limit=1):
        flex_on_cpu._compiled.cache_clear()
        _, records = _sweep(tmp_path, grid)
    flex_on_cpu._compiled.cache_clear()
    errors = [r for r in records if r["status"] == "error"]
    assert errors and all("unfused fallback" in r["reason"] for r in errors)


def _one_point(**grid):
    base = {"mechanisms": ["full"], "resolutions": ["8"], "dims": [16], "heads": [2], "impls": ["fast"]}
    return expand(Grid.from_dict({**base, **grid})).points


def _probes(monkeypatch, values):
    """probe_ms returns ``values`` in turn (the sweep's reference first), then 1.0."""
    from attnbench.bench import measure as m

    it = iter(values)
    monkeypatch.setattr(m, "probe_ms", lambda device: next(it, 1.0))
    monkeypatch.setattr(m, "_REFERENCE", {})
    monkeypatch.setattr(m, "PROBE_REUSE_S", -1.0)  # every slot takes both its probes: the scripts below say which


def test_back_to_back_slots_share_the_probe_between_them(monkeypatch):
    """A slot's closing probe stands as the next slot's opening probe when nothing ran between them
    (one point's rounds, or the next point of the rotation): rounds + 1 probes, not 2 x rounds."""
    from attnbench.bench import measure as m

    taken: list[float] = []
    monkeypatch.setattr(m, "probe_ms", lambda device: taken.append(1.0) or 1.0)
    monkeypatch.setattr(m, "_REFERENCE", {})
    monkeypatch.setattr(m, "_LAST_PROBE", {})
    settings = Settings(**{**FAST, "rounds": 3, "remeasure": 0, "median_ci_bound": 1e9, "noisy_spread": 1e9})
    r = measure(_one_point(passes=["fwd"])[0], settings)
    assert len(r["latency_rounds"]) == 3
    assert len(taken) == 3 + 3 + 1  # the first reference (three probes), then one probe per slot and one more


def test_contended_point_is_remeasured_then_flagged_with_evidence(monkeypatch):
    _probes(monkeypatch, [1.0, 1.0, 1.0] + [1.0, 5.0] * 5)  # reference, then a slow probe after every slot
    r = measure(_one_point(passes=["fwd"])[0], Settings(**{**FAST, "rounds": 3, "remeasure": 2}))
    assert r["status"] == "ok" and r["contended"] is True and r["probe_ms"] == 5.0
    c = r["contention"]
    assert c["reference_ms"] == 1.0 and len(c["slots"]) == 5  # three rounds and two more, all contended
    assert all(s["contended"] and s["probe_ms"] == [1.0, 5.0] for s in c["slots"])
    assert c["kept"] == [0, 1, 2, 3, 4] and r["latency_rounds"] == [s["samples"] for s in c["slots"]]


def test_a_contended_slot_is_left_out_and_taken_again(monkeypatch):
    _probes(monkeypatch, [1.0, 1.0, 1.0] + [1.0, 1.0] + [1.0, 1.6] + [1.0, 1.0] * 2)  # the second slot is slow
    r = measure(_one_point(passes=["fwd"])[0], Settings(**{**FAST, "rounds": 3, "remeasure": 2}))
    assert r["contended"] is False and r["probe_ms"] == 1.0
    c = r["contention"]
    assert [s["contended"] for s in c["slots"]] == [False, True, False, False] and c["kept"] == [0, 2, 3]
    assert r["latency_rounds"] == [c["slots"][i]["samples"] for i in (0, 2, 3)]
    assert r["samples"] == sum(r["latency_rounds"]) == len(r["latency_samples_ms"])


def test_probe_margin_decides_contention(monkeypatch):
    # the same slow probes, 1.6x the reference, under a margin that allows them: clean, measured once
    _probes(monkeypatch, [1.0, 1.0, 1.0] + [1.0, 1.6] * 3)
    settings = Settings(**{**FAST, "rounds": 3, "remeasure": 2, "probe_margin": 0.7, "median_ci_bound": 1e9})
    r = measure(_one_point(passes=["fwd"])[0], settings)
    assert r["contended"] is False and len(r["latency_rounds"]) == 3 and r["probe_ms"] == 1.6


def test_quiet_point_is_measured_in_its_rounds_once(monkeypatch):
    _probes(monkeypatch, [])
    settings = Settings(**{**FAST, "rounds": 3, "remeasure": 2, "median_ci_bound": 1e9, "noisy_spread": 1e9})
    r = measure(_one_point(passes=["fwd"])[0], settings)
    assert r["contended"] is False and r["contention"] is None and r["probe_ms"] == 1.0
    assert len(r["latency_rounds"]) == 3 and r["noisy"] is False
    assert r["threads"] == 1 and r["latency_samples_ms"] and r["overhead_ms"] > 0
    assert r["host_ms_per_call"] == r["latency_ms_median"] and r["launch_bound"] is None  # CPU: host is the device


def test_flops_counted_once_per_configuration(monkeypatch, tmp_path):
    from attnbench.bench import flopcache, flops
    from attnbench.bench import measure as m

    calls = []
    real = flops.count
    monkeypatch.setattr(flops, "count", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(m, "_FLOP_CACHE", {})
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))
    fwd, bwd = sorted(_one_point(passes=["fwd", "fwd+bwd"]), key=lambda p: p.pass_)
    settings = Settings(**{**FAST, "count_flops": True})
    rf, rb = measure(fwd, settings), measure(bwd, settings)
    assert len(calls) == 1 and rf["macs"] == rb["macs"]
    assert rf["backward_macs"] is None and rb["backward_macs"] > 0
    # a later process (its memory cache empty) of the same code revision reads the count from disk
    if flopcache.code_revision() is not None:
        assert list((tmp_path / "cache" / "flops").rglob("*.json"))
        monkeypatch.setattr(m, "_FLOP_CACHE", {})
        again = measure(bwd, settings)
        assert len(calls) == 1 and again["macs"] == rb["macs"] and again["backward_macs"] == rb["backward_macs"]
    # another revision counts again
    monkeypatch.setattr(m, "_FLOP_CACHE", {})
    monkeypatch.setattr(flopcache, "code_revision", lambda: "another-revision")
    measure(fwd, settings)
    assert len(calls) == 2


def test_wide_samples_on_a_quiet_machine_are_noisy_not_contended(monkeypatch):
    _probes(monkeypatch, [])  # the machine is quiet throughout
    # the samples' median interval exceeds a bound of zero: wide, stored noisy, not measured again
    r = measure(
        _one_point(passes=["fwd"])[0], Settings(**{**FAST, "rounds": 3, "remeasure": 2, "median_ci_bound": -1.0})
    )
    assert r["status"] == "ok" and r["contended"] is False and r["noisy"] is True
    slots = r["contention"]["slots"]
    assert len(slots) == 3 and not any(s["contended"] for s in slots) and r["contention"]["kept"] == [0, 1, 2]


@pytest.mark.parametrize("per_call_s,warm", [(1e-4, 1), (0.2, 0)])
def test_a_slot_warms_short_calls_only(monkeypatch, per_call_s, warm):
    """One untimed call before a slot's samples where a call is short; none where it lasts longer than
    WARM_CALL_UNDER_S (its own length dwarfs a cold cache)."""
    from attnbench.bench import measure as m

    _probes(monkeypatch, [])
    point = _one_point(passes=["fwd"])[0]
    work = m.build_workload(point)
    calls: list[int] = []
    real = work.step
    work.step = lambda: calls.append(1) or real()
    settings = Settings(**{**FAST, "rounds": 1, "min_samples": 1, "max_samples": 1})
    timed: list[float] = []
    monkeypatch.setattr(m, "_cpu_times", lambda *a, **k: timed.append(1) or [1.0])
    timing = m._Timing(point, work, per_call_s, settings, m._Budget(60.0, m.time.perf_counter))
    timing.slot()
    assert len(calls) == warm and timed == [1]


HEAVY = ("torch._inductor", "torch._dynamo", "sympy")  # what an eager sweep must not import (seconds of start)


def _heavy_imports_of(code: str) -> list[str]:
    """Run ``code`` in a fresh process (this one may have imported anything already) and return which of
    HEAVY it had imported when ``code`` called ``report()``; the process must succeed."""
    prelude = (
        f"import json, sys\ndef report():\n    print('HEAVY', json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("HEAVY ")]
    return json.loads(line[len("HEAVY ") :])


def test_profiled_step_imports_neither_inductor_nor_dynamo():
    # The profiled step (op names and the CPU memory probe) of an eager point must not import the compiler
    # stack: torch.profiler.profile asks hasattr(torch, "_inductor") on every start, which imports inductor
    # and Dynamo (about 1 s of a smoke sweep).
    code = (
        "import torch\n"
        "from attnbench.bench.provenance import profile_ops\n"
        "w = torch.randn(8, 8, requires_grad=True)\n"
        "names, peak = profile_ops(lambda: (w @ w).softmax(-1).sum().backward(), memory=True)\n"
        "assert names['aten::mm'] >= 1 and peak > 0, (names, peak)\n"
        "report()\n"
    )
    assert not {"torch._inductor", "torch._dynamo"} & set(_heavy_imports_of(code))


def test_the_timed_backward_is_autograds_without_importing_sympy():
    # fwd+bwd runs the engine call that torch.autograd.backward ends in: the same gradients, without its
    # per-call checks of the upstream gradient, whose first use imports sympy (0.4 s).
    code = (
        "import torch\n"
        "from attnbench.bench.measure import backward_from\n"
        "torch.manual_seed(0)\n"
        "w = torch.randn(8, 8, requires_grad=True)\n"
        "outs = ((w @ w).softmax(-1), w.sin())\n"
        "grads = [torch.randn_like(t) for t in outs]\n"
        "backward_from(outs, grads)\n"
        "report()\n"
        "ours = w.grad.clone()\n"
        "w.grad = None\n"
        "torch.autograd.backward(((w @ w).softmax(-1), w.sin()), grads)\n"
        "assert torch.equal(ours, w.grad), (ours - w.grad).abs().max()\n"
    )
    assert _heavy_imports_of(code) == []


def test_probe_modules_of_every_mechanism_import_no_dynamo():
    # Grid expansion asks questions of modules built on the meta device; arithmetic on meta tensors runs torch's
    # Python decompositions, whose first use imports torch._dynamo (about 1.4 s of an eager sweep) or sympy
    # (0.3 s, torch.randn's reference). Every mechanism, with its default knobs and each of its examples, must be
    # built without them.
    code = (
        "from attnbench import attentions\n"
        "from attnbench.attentions.base import probe_module\n"
        "for name in attentions.available():\n"
        "    cls = attentions.get(name)\n"
        "    for knobs in ({}, *cls.examples):\n"
        "        for impl in cls.impls:\n"
        "            probe_module(name, 32, 2, cls.make_knobs(**knobs), impl)\n"
        "report()\n"
    )
    assert _heavy_imports_of(code) == []
