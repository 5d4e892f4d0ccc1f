"""The phased GPU run of attnbench (scripts/gpu_run.sh installs the wheels, then runs this).

    python scripts/gpu_run.py OUTDIR [--dry-run] [--tiny] [--plan] [--pack FILE.tar.gz]

Phases, in order of value per device-second, each with its own time budget and
its own log, each writing into OUTDIR as it goes, none stopping the next (a
phase that fails or runs out of time is recorded in OUTDIR/phases.jsonl and
the run moves on):

    env       nvidia-smi (clocks, power, throttling), the environment fingerprint, the packages
    parity    the GPU tests of the fast paths against their references (recorded, not fatal)
    full      full attention through SDPA over the scaling resolutions: the baseline
    quadtree  quadtree (top-K 8) reference / fast / triton over the scaling resolutions
    windowed  swin (window 8) and pooling, SDPA with a bias (fast) and FlexAttention (flex)
    biased    full attention with a bias table (128): fast (bias materialised) and flex (read in a score_mod)
    peers     timm's modules beside ours, weights copied, parity-checked first (where timm is importable)
    report    OUTDIR/report.html and OUTDIR/summary.md of every phase's run; nvidia-smi at the end

Budgets are cumulative: a phase may run until the sum of its own and the
earlier phases' budgets has passed since the start (so time a phase leaves
unused goes to the next), and the report always keeps its own. The whole,
install included, is held to TOTAL_S. Sweeps resume: run the same command
again and only the missing points are measured.

``--dry-run`` runs every phase on the CPU with a tiny grid (16x16,
float32, dim 32) and prints the plan of the real run: its points and the
estimated GPU time per phase. ``--tiny`` runs the tiny grid on the GPU. ``--plan``
only prints the plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRESET = "gpu-run"
# The whole run, install included, must fit 5 minutes of an H100 or H200: with the machine's start-up, a whole
# second run fits a 15-minute lease when the first fails.
TOTAL_S = 300.0
INSTALL_BUDGET_S = 20.0  # scripts/gpu_run.sh's pip install of .whl/ (a few pure-Python wheels), counted in TOTAL_S
PEER_PLUGIN = "attnbench.attentions.peers"
# The installed distributions, as pip freeze prints them (without pip's start-up).
FREEZE = (
    "import importlib.metadata as m; print(*sorted(f'{d.name}=={d.version}' for d in m.distributions()), sep='\\n')"
)

# The tiny grid of --dry-run and --tiny: every phase's commands, on the smallest map every phase runs.
TINY = ["--resolution", "16", "--dim", "32", "--heads", "2"]
TINY_CPU = ["--dtype", "float32", "--device", "cpu"]

# Maps of the phases whose flex paths compile one kernel per shape and pass: 3 maps x 2 passes = 6 graphs per
# process, under torch.compile's limit of 8 recompilations of one function (past it, flex would run unfused).
FLEX_RESOLUTIONS = "64,128"
BIAS_RESOLUTIONS = "64"  # the fast path materialises an (h, N, N) bias: 2 GiB in bf16 at 128x128
# QuadTree against full attention where its sparsity matters: 64x64 to 256x256 (and 32x32, launch bound)
QUADTREE_RESOLUTIONS = "32,64,128,256"
PEER_RESOLUTIONS = "64"  # timm's modules beside ours: one map (each sweep is a process start)

# ---------------------------------------------------------------------------------------------------------------
# The estimate of GPU time. A model, not a measurement: no GPU has run this yet. Each constant is an assumption,
# to be replaced by what the first GPU run records (phases.jsonl holds each phase's estimate beside its wall time,
# results.jsonl each point's wall_s).
BF16_TFLOPS = 788.0  # assumed ceiling of a large bf16 matmul through PyTorch on an H200 (80% of 989 dense)
EFFICIENCY = {"reference": 0.05, "fast": 0.3, "flex": 0.25, "triton": 0.2, "timm": 0.3}  # share of that ceiling
LAUNCH_FLOOR_MS = {"reference": 1.0, "fast": 0.08, "flex": 0.1, "triton": 0.3, "timm": 0.08}  # per fwd call
PROCESS_START_S = 8.0  # python, torch and attnbench imported, CUDA context and handles made
POINT_OVERHEAD_S = 0.4  # module and inputs built, first call, memory call, synchronisations, record written
FIRST_COMPILE_S = {"flex": 25.0, "triton": 6.0}  # the first compile in a process (inductor / Triton JIT)
SHAPE_COMPILE_S = {"flex": 8.0, "triton": 0.5}  # each further shape (or pass) compiled
PYTEST_S = 45.0  # the parity tests: collection, Triton JIT and flex compiles of a dozen cases
REPORT_S = 12.0  # the report command (pandas and plotly, no torch)
PEER_PARITY_S = 6.0  # timm imported, five small float32 forward and backward passes on each side


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One ``attnbench sweep --preset gpu-run`` call: its arguments beyond the preset."""

    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    budget_s: float
    kind: str  # env | tests | sweep | peers | report
    what: str
    sweeps: tuple[Sweep, ...] = ()


def _flex_sweeps(mechanisms: dict[str, list[str]], resolutions: str) -> tuple[Sweep, ...]:
    """One process per mechanism (with its knob arguments) for the flex impl: 6 compiled graphs at most."""
    return tuple(
        Sweep(("--mechanism", m, "--impl", "flex", "--resolution", resolutions, *extra))
        for m, extra in mechanisms.items()
    )


PARITY_TESTS = (
    "tests/attentions/test_kernels_quadtree.py",
    "tests/attentions/test_flex.py",
    "tests/attentions/test_peers.py",
)

PHASES: tuple[Phase, ...] = (
    Phase("env", 5, "env", "nvidia-smi clocks and power, the environment fingerprint, the packages"),
    Phase("parity", 54, "tests", "the GPU tests of the Triton and flex paths against their references"),
    Phase(
        "full",
        22,
        "sweep",
        "full attention through SDPA over the scaling resolutions: the baseline",
        (Sweep(("--mechanism", "full", "--impl", "fast")),),
    ),
    Phase(
        "quadtree",
        32,
        "sweep",
        "quadtree (top-K 8) reference, fast and triton from 32x32 to 256x256",
        (
            Sweep(
                ("--mechanism", "quadtree", "--impl", "reference,fast,triton", "--knob", "topk=8")
                + ("--resolution", QUADTREE_RESOLUTIONS)
            ),
        ),
    ),
    Phase(
        "windowed",
        82,
        "sweep",
        "swin (window 8) and pooling through SDPA with a bias (fast) and FlexAttention (flex)",
        (
            # window=8 is swin's window; pooling stays global (its window knob is MViTv2's hybrid windows)
            Sweep(("--mechanism", "swin", "--impl", "fast", "--knob", "window=8", "--resolution", FLEX_RESOLUTIONS)),
            Sweep(("--mechanism", "pooling", "--impl", "fast", "--resolution", FLEX_RESOLUTIONS)),
            # flex for swin only: each flex process pays a cold inductor compile (FIRST_COMPILE_S) that a
            # 5-minute plan affords twice; pooling's flex path is checked by the parity phase
            *_flex_sweeps({"swin": ["--knob", "window=8"]}, FLEX_RESOLUTIONS),
        ),
    ),
    Phase(
        "biased",
        53,
        "sweep",
        "full attention with a relative-position bias table (128): fast (bias materialised) and flex",
        (
            Sweep(
                ("--mechanism", "full", "--impl", "fast", "--knob", "bias_table=128", "--resolution", BIAS_RESOLUTIONS)
            ),
            *_flex_sweeps({"full": ["--knob", "bias_table=128"]}, BIAS_RESOLUTIONS),
        ),
    ),
    Phase("peers", 18, "peers", "timm's equivalent modules beside ours (weights copied, parity first)"),
    Phase("report", 14, "report", "report.html and summary.md of every phase's run; nvidia-smi at the end"),
)
assert INSTALL_BUDGET_S + sum(p.budget_s for p in PHASES) <= TOTAL_S


# ---------------------------------------------------------------------------------------------------------------
# Peers: the sweep of the timm modules registered by attentions.peers (when timm imports).


def peer_sweeps() -> tuple[Sweep, ...]:
    """The peers (impl timm) and ours beside them (impl fast), on the same maps."""
    from attnbench.attentions import peers

    names = peers.registered()
    if not names:
        return ()
    ours = sorted({peers.PEERS[n].ours for n in names})
    env = (("ATTNBENCH_PLUGINS", PEER_PLUGIN),)
    from attnbench import attentions

    def sweeps(mechs: list[str], impl: str) -> list[Sweep]:
        # windows of 8 only where the window is the mechanism's cost knob (Swin's), not MViTv2's hybrid one
        windowed = [m for m in mechs if attentions.get(m).cost_knob == "window"]
        rest = [m for m in mechs if m not in windowed]
        out = [Sweep(("--mechanism", ",".join(windowed), "--impl", impl, "--knob", "window=8",
                      "--resolution", PEER_RESOLUTIONS), env)] if windowed else []  # fmt: skip
        return out + ([Sweep(("--mechanism", ",".join(rest), "--impl", impl, "--resolution", PEER_RESOLUTIONS), env)]
                      if rest else [])  # fmt: skip

    return tuple(sweeps(list(names), "timm") + sweeps(ours, "fast"))


# ---------------------------------------------------------------------------------------------------------------
# Plan: the points of each sweep and their estimated GPU time.


def sweep_points(sweep: Sweep, extra: list[str]) -> list[Any]:
    """The points one sweep call would measure (those its grid does not refuse statically)."""
    from attnbench.bench.points import expand
    from attnbench.bench.sweep import resolve_request

    axes: dict[str, list[str]] = {}
    knobs: list[str] = []
    names = {"--mechanism": "mechanisms", "--impl": "impls", "--pass": "passes", "--resolution": "resolutions"}
    names.update({"--dim": "dims", "--heads": "heads", "--dtype": "dtypes", "--device": "devices"})
    args = list(sweep.args) + extra
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag == "--knob":
            knobs.append(value)
        else:
            axes[names[flag]] = [value]
    from attnbench.attentions.base import _device_reasons

    grid, _ = resolve_request(PRESET, None, axes, knobs)
    expansion = expand(grid)
    # The plan is of the GPU run: a point refused only because this machine has no GPU stays in it
    # (estimate_point then asks the mechanism about CUDA itself).
    return [
        p for p in expansion.points if p not in expansion.refused or expansion.refused[p] == _device_reasons(p.device)
    ]


def estimate_point(point: Any) -> tuple[float, str | None]:
    """(seconds of GPU time, None) for a point the mechanism accepts on CUDA; (0, reason) when it refuses it."""
    import torch

    from attnbench import attentions

    with torch.device("meta"):
        module = attentions.build(
            point.mechanism, dim=point.dim, heads=point.heads, impl=point.impl, **point.knob_dict()
        )
    ctx = module.default_context_hw(point.hw) if point.cross else None
    from attnbench.attentions.base import _device_reasons

    reasons = module.unsupported(point.batch, point.hw, ctx, dtype=getattr(torch, point.dtype), device="cuda")
    reasons = [r for r in reasons if r not in _device_reasons("cuda")]  # this machine's lack of a GPU aside
    if reasons:
        return 0.0, "; ".join(reasons)
    macs = module.macs(point.batch, point.hw, ctx)
    train = point.pass_ == "fwd+bwd"
    flops = 2 * macs * (3 if train else 1)
    impl = point.impl
    call_s = max(flops / (EFFICIENCY.get(impl, 0.1) * BF16_TFLOPS * 1e12), LAUNCH_FLOOR_MS.get(impl, 0.1) * 1e-3)
    if train:
        call_s = max(call_s, 3 * LAUNCH_FLOOR_MS.get(impl, 0.1) * 1e-3)
    # CUDA timing: warm-up and timed windows of the preset, at least 3 samples; plus first, warm and memory calls
    window_s = max(0.060, 7 * call_s) + 3 * call_s
    # warm-up until the call time settles (at least 10 calls; an idle GPU's clocks ramp up within the cap),
    # and where the map is launch bound, a CUDA graph captured and replayed 20 times
    window_s += 10 * call_s + (25 * call_s if call_s <= 2 * LAUNCH_FLOOR_MS.get(impl, 0.1) * 1e-3 else 0.0)
    return POINT_OVERHEAD_S + window_s, None


def estimate_sweep(sweep: Sweep, points: list[Any]) -> float:
    total = PROCESS_START_S
    compiled: dict[str, int] = {}
    for p in points:
        seconds, refused = estimate_point(p)
        if refused:
            continue
        total += seconds
        if p.impl in FIRST_COMPILE_S:
            n = compiled.get(p.impl, 0)
            total += FIRST_COMPILE_S[p.impl] if n == 0 else SHAPE_COMPILE_S[p.impl]
            compiled[p.impl] = n + 1
    return total


def _group(points: list[Any]) -> list[str]:
    """Points as lines: mechanism impl pass: resolutions."""
    rows: dict[tuple[str, str, str, str], list[str]] = {}
    for p in points:
        knobs = ",".join(f"{k}={v}" for k, v in p.knobs if k in ("topk", "window", "bias_table"))
        rows.setdefault((p.mechanism, knobs, p.impl, p.pass_), []).append(f"{p.height}x{p.width}")
    return [f"{m} {k} {i} {ps}: {' '.join(r)}".replace("  ", " ") for (m, k, i, ps), r in rows.items()]


def plan(phases: tuple[Phase, ...], log: Any) -> dict[str, dict[str, Any]]:
    """Print, per phase, its points on the GPU and the estimated GPU time; return them by phase."""
    out: dict[str, dict[str, Any]] = {}
    log(f"plan of the GPU run (estimates from the model in {Path(__file__).name}; not measurements)")
    log(f"  install  budget {INSTALL_BUDGET_S:5.0f} s")
    for phase in phases:
        sweeps = phase.sweeps if phase.kind == "sweep" else (peer_sweeps() if phase.kind == "peers" else ())
        n, est, lines = 0, 0.0, []
        for sweep in sweeps:
            points = sweep_points(sweep, [])
            runnable = [p for p in points if not estimate_point(p)[1]]
            n += len(runnable)
            est += estimate_sweep(sweep, points)
            lines += _group(runnable)
        if phase.kind == "env":
            est = 3.0
        elif phase.kind == "tests":
            est = PROCESS_START_S + PYTEST_S
        elif phase.kind == "report":
            est = REPORT_S
        elif phase.kind == "peers" and not sweeps:
            lines = ["(timm is not importable here: on the GPU image the peers' parity check and sweep run)"]
        elif phase.kind == "peers":
            est += PROCESS_START_S + PEER_PARITY_S  # python -m attnbench.attentions.peers first
        flag = "  OVER BUDGET" if est > phase.budget_s else ""
        log(f"  {phase.name:<9}budget {phase.budget_s:5.0f} s  estimated {est:5.0f} s  {n:3d} points{flag}")
        for line in lines:
            log(f"      {line}")
        out[phase.name] = {"points": n, "estimated_s": round(est, 1)}
    total = INSTALL_BUDGET_S + sum(v["estimated_s"] for v in out.values())
    budget = INSTALL_BUDGET_S + sum(p.budget_s for p in phases)
    log(f"  total    budget {budget:5.0f} s  estimated {total:5.0f} s  (limit {TOTAL_S:.0f} s)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running.


class Runner:
    def __init__(self, out: Path, args: argparse.Namespace, elapsed_s: float):
        self.out = out
        self.args = args
        self.start = time.monotonic() - elapsed_s
        self.python = sys.executable
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [self.env.get("PYTHONPATH")])])
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.setdefault("TRITON_INTERPRET", "1" if args.dry_run else "0")

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.out / "run.log", "a") as f:
            f.write(text + "\n")

    def run(
        self, cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None, stdout: Path | None = None
    ) -> tuple[str, int]:
        """Run a command into ``log`` (its stdout into ``stdout`` if given) until ``timeout``; past it, kill its
        process group. Returns (status, returncode); a command that cannot start is ``failed``."""
        with open(log, "a") as f, open(stdout or os.devnull, "w") as out:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                proc = subprocess.Popen(
                    cmd, cwd=REPO, stdout=out if stdout else f, stderr=f if stdout else subprocess.STDOUT,
                    env={**self.env, **(env or {})}, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                f.write(f"cannot run it: {exc}\n")
                return "failed", -1
            try:
                rc = proc.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                f.write(f"\n[killed: past its {timeout:.0f} s]\n")
                return "timeout", -9
        return ("ok" if rc == 0 else "failed"), rc

    def cli(self, *args: str) -> list[str]:
        return [self.python, "-m", "attnbench", *args]

    def sweep_cmd(self, sweep: Sweep, run_dir: Path) -> list[str]:
        # a phase sweeps several grids (mechanisms, impls, knobs) into one run directory: --append says so
        args = tiny_args(sweep.args, self.args)
        return self.cli("sweep", "--preset", PRESET, *args, "--out", str(run_dir), "--append")

    def nvidia_smi(self, name: str, log: Path) -> str:
        """Clocks, power, temperature and throttling now, as CSV in env/nvidia-smi-NAME.csv."""
        fields = "timestamp,name,pstate,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu"
        fields += ",clocks_throttle_reasons.active,utilization.gpu,memory.used,memory.total"
        target = self.out / "env" / f"nvidia-smi-{name}.csv"
        target.parent.mkdir(exist_ok=True)
        return self.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], log, 20, stdout=target)[0]

    def phase(self, phase: Phase, deadline: float, estimate: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        log = self.out / f"{phase.name}.log"
        record: dict[str, Any] = {"phase": phase.name, "what": phase.what, "budget_s": phase.budget_s, **estimate}
        record["started_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        statuses: list[str] = []
        rcs: list[int] = []

        def left() -> float:
            return deadline - time.monotonic()

        def step(cmd: list[str], env: dict[str, str] | None = None, stdout: Path | None = None) -> None:
            if left() < 1:
                statuses.append("timeout")
                return
            status, rc = self.run(cmd, log, left(), env, stdout)
            statuses.append(status)
            rcs.append(rc)

        if phase.kind == "env":
            env_dir = self.out / "env"
            env_dir.mkdir(exist_ok=True)
            self.nvidia_smi("start", log)  # without a GPU (the dry run) the failure is in the log, not the status
            self.run(["nvidia-smi", "-q"], log, min(left(), 20), stdout=env_dir / "nvidia-smi-q.txt")
            step(self.cli("env", "--json"), stdout=env_dir / "env.json")
            step([self.python, "-c", FREEZE], stdout=env_dir / "packages.txt")
        elif phase.kind == "tests":
            (self.out / "parity").mkdir(exist_ok=True)
            tests = [t for t in PARITY_TESTS if (REPO / t).exists()]
            junit = self.out / "parity" / "junit.xml"
            cmd = [self.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *tests]
            step([*cmd, f"--junitxml={junit}"])
        elif phase.kind in ("sweep", "peers"):
            sweeps = phase.sweeps
            if phase.kind == "peers":
                sweeps = peer_sweeps()
                if not sweeps:
                    record["reason"] = "timm is not importable here"
                    statuses.append("skipped")
                else:
                    (self.out / phase.name).mkdir(exist_ok=True)
                    parity = self.out / phase.name / "parity.json"
                    device = "cpu" if self.args.dry_run else "cuda"
                    step([self.python, "-m", "attnbench.attentions.peers", "--device", device, "--out", str(parity)])
                    if parity.exists():  # only the peers that matched ours are timed
                        ok = [r["peer"] for r in json.loads(parity.read_text()) if r["ok"]]
                        sweeps = _keep_mechanisms(sweeps, ok)
            for sweep in sweeps:
                step(self.sweep_cmd(sweep, self.out / phase.name), dict(sweep.env))
        elif phase.kind == "report":
            runs = [str(d) for d in self.run_dirs()]
            if runs:
                # one call writes both: the page, and the summary table on stdout
                report = self.cli("report", *runs, "--out", str(self.out / "report.html"), "--format", "md")
                step(report, stdout=self.out / "summary.md")
            else:
                record["reason"] = "no phase wrote results"
                statuses.append("skipped")
            self.nvidia_smi("end", log)
        for s in ("timeout", "failed", "skipped", "ok"):
            if s in statuses:
                record["status"] = s
                break
        else:
            record["status"] = "skipped"
        record["returncodes"] = rcs
        record["wall_s"] = round(time.monotonic() - started, 1)
        record["log"] = log.name
        with open(self.out / "phases.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def run_dirs(self) -> list[Path]:
        return [self.out / p.name for p in PHASES if (self.out / p.name / "results.jsonl").exists()]

    def pack(self) -> None:
        if not self.args.pack:
            return
        target = Path(self.args.pack)
        tmp = target.with_name(target.name + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.out, arcname=self.out.name)
        os.replace(tmp, target)


def tiny_args(args: tuple[str, ...], mode: argparse.Namespace) -> list[str]:
    """A sweep's arguments, with the tiny grid's axes in place of its own under --tiny and --dry-run."""
    if not (mode.tiny or mode.dry_run):
        return list(args)
    tiny = TINY + (TINY_CPU if mode.dry_run else [])
    replaced = set(tiny[::2])
    kept = [x for flag, value in zip(args[::2], args[1::2], strict=True) if flag not in replaced for x in (flag, value)]
    return kept + tiny


def _keep_mechanisms(sweeps: tuple[Sweep, ...], peers_ok: list[str]) -> tuple[Sweep, ...]:
    """The peer sweeps limited to the peers whose parity held, and the mechanisms of ours they stand beside."""
    from attnbench.attentions import peers

    keep = {"timm": peers_ok, "fast": sorted({peers.PEERS[n].ours for n in peers_ok})}
    out = []
    for sweep in sweeps:
        args = list(sweep.args)
        names = keep[args[args.index("--impl") + 1]]
        if names:
            args[args.index("--mechanism") + 1] = ",".join(names)
            out.append(Sweep(tuple(args), sweep.env))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The phased GPU run of attnbench.")
    parser.add_argument("out", help="output directory (created; a second run resumes its sweeps)")
    parser.add_argument("--dry-run", action="store_true", help="every phase on the CPU with a tiny grid, and the plan")
    parser.add_argument("--tiny", action="store_true", help="the tiny grid on the GPU")
    parser.add_argument("--plan", action="store_true", help="print the plan of the GPU run and stop")
    parser.add_argument("--pack", help="after each phase, write OUTDIR as this .tar.gz (atomically)")
    parser.add_argument("--elapsed", type=float, default=0.0, help="seconds already spent (the install)")
    parser.add_argument("--only", help="comma-separated phases to run (default: all, in order)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, args, args.elapsed)
    if args.plan or args.dry_run:
        estimates = plan(PHASES, runner.log)
        if args.plan:
            return 0
        runner.start = time.monotonic() - args.elapsed  # the schedule starts after the plan
    else:
        estimates = {}
    mode = "dry run: CPU, tiny grid" if args.dry_run else ("tiny grid" if args.tiny else "full run")
    runner.log(f"gpu_run: {mode}; output in {out}; {args.elapsed:.0f} s spent before the phases")
    cumulative = INSTALL_BUDGET_S
    only = set(args.only.split(",")) if args.only else {p.name for p in PHASES}
    unknown = only - {p.name for p in PHASES}
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; phases: {', '.join(p.name for p in PHASES)}")
    for phase in PHASES:
        cumulative += phase.budget_s
        if phase.name not in only:
            continue
        deadline = runner.start + cumulative
        if phase.kind == "report":  # the report always keeps its own budget
            deadline = max(deadline, time.monotonic() + phase.budget_s)
        try:
            rec = runner.phase(phase, deadline, estimates.get(phase.name, {}))
        except Exception as exc:  # a bug in one phase is recorded; the next phase runs
            rec = {"phase": phase.name, "status": "error", "reason": f"{type(exc).__name__}: {exc}", "wall_s": 0.0}
            with open(out / "phases.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        runner.log(f"phase {phase.name}: {rec['status']} in {rec['wall_s']:.1f} s (budget {phase.budget_s:.0f} s)")
        runner.pack()
    runner.log(f"done in {time.monotonic() - runner.start:.0f} s; phases in {out / 'phases.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
