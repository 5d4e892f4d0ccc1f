"""attnbench: benchmark and profile efficient vision attention.

The typer app. It parses, calls the packages and prints; it holds no logic of
its own.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from attnbench.errors import AttnbenchError


class _Commands(TyperGroup):
    """Every command's bad input (an AttnbenchError) ends as one line on stderr and exit status 2."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except AttnbenchError as exc:
            typer.echo("error: " + " ".join(str(exc).split()), err=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # the environment's failures: a full disk, a read-only directory, a vanished file
            typer.echo("error: " + " ".join(_os_error_line(exc).split()), err=True)
            raise typer.Exit(2) from None


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError that no writing point turned into an AttnbenchError: the path, the error, advice."""
    from attnbench.bench.store import os_advice

    where = f" {exc.filename}" if exc.filename else ""
    if exc.filename2:
        where += f" -> {exc.filename2}"
    if exc.errno is None:
        return f"cannot use{where}: {exc}"
    return f"cannot use{where}: [Errno {exc.errno}] {exc.strerror}; {os_advice(exc)}"


app = typer.Typer(
    cls=_Commands,
    help="Benchmark and profile efficient vision attention: eight mechanisms, one interface, honest numbers.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)  # progress goes here, so that --json output stays clean


class _Steps:
    """Progress of work done in steps, from its first second: on a terminal a spinner naming the
    current step, with the elapsed time and the count of steps done (on stderr); elsewhere quiet but
    for one line per finished step (to stderr, with its seconds), none at all when ``quiet``."""

    def __init__(self, title: str, total: int | None = None, quiet: bool = False):
        import time

        self.title, self.total, self.clock = title, total, time.perf_counter
        self.current: str | None = None
        self.done = 0
        self.started = self.step_started = self.clock()
        self.live = err_console.is_terminal
        self.quiet = quiet
        self.status = err_console.status(escape(title), spinner="dots") if self.live else None

    def _finish_step(self) -> None:
        if self.current is None:
            return
        self.done += 1
        if not self.live and not self.quiet:
            of = f"/{self.total}" if self.total else ""
            err_console.print(
                f"[{self.done}{of}] {escape(self.current)} done in {self.clock() - self.step_started:.1f} s",
                highlight=False,
            )

    def step(self, name: str) -> None:
        self._finish_step()
        self.current, self.step_started = name, self.clock()
        if self.status is not None:
            of = f"{self.done}/{self.total} done, " if self.total else ""
            self.status.update(f"{escape(self.title)}: {escape(name)} ({of}{self.clock() - self.started:.0f} s)")

    def __enter__(self) -> _Steps:
        if self.status is not None:
            self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._finish_step()
        if self.status is not None:
            self.status.__exit__(*exc)


@app.callback()
def main() -> None:
    """Sweep attention mechanisms, count their FLOPs, train models and write HTML reports."""


JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


@app.command("list")
def list_(as_json: bool = JSON_OPTION) -> None:
    """List the registered attention mechanisms, their knobs (with defaults) and cost knob."""
    from attnbench import attentions

    rows = [attentions.get(name).describe() for name in attentions.available()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    import shutil
    import textwrap

    width = max(40, shutil.get_terminal_size((80, 24)).columns)
    lines = []
    for r in rows:
        head = f"{r['name']}: {r['complexity']}; cost knob {r['cost_knob'] or '-'}; cross attention {r['cross']}"
        lines += textwrap.wrap(head, width, subsequent_indent="    ", break_long_words=False)
        knobs = [f"{k}={v['default']}" for k, v in r["knobs"].items()] or ["-"]
        lines += _wrap_items("  knobs: ", knobs, width)
        lines += _wrap_items("  impls: ", r["impls"], width)
        lines.append("")
    typer.echo("\n".join(lines).rstrip("\n"))


def _wrap_items(label: str, items: list[str], width: int) -> list[str]:
    """Items joined by ", " in lines of at most ``width`` characters, never cutting one item in two (an item
    longer than a line gets a line of its own); continuation lines indented under the label."""
    lines, line = [], label
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if line.strip() and len(line) + 1 + len(piece) > width and line != label:
            lines.append(line.rstrip())
            line = "    "
        line += ("" if line in (label, "    ") else " ") + piece
    lines.append(line.rstrip())
    return lines


# -- further commands are added below this line, one function each --

SWEEP_MECHANISM_OPTION = typer.Option(
    None, "--mechanism", "-m", help="Mechanisms (comma-separated or repeated); default: all registered."
)
SWEEP_RESOLUTION_OPTION = typer.Option(
    None,
    "--resolution",
    "-r",
    help="Token maps: 32,64 (square), 64x96 (H x W), 224px:s2 (stage 2 of a 224 px image), 224px (its four stages).",
)
SWEEP_FRAMES_OPTION = typer.Option(
    None,
    "--frames",
    help="Token frames, e.g. 1,4,8,16: every resolution becomes a T x H x W clip map (-r 56 --frames 8 is "
    "8x56x56; -r also reads 8x56x56 and 32f:224px, the four stages of a 32-frame clip).",
)
SWEEP_BATCH_OPTION = typer.Option(None, "--batch", "-b", help="Batch sizes, e.g. 1,8.")
SWEEP_DIM_OPTION = typer.Option(
    None, "--dim", help="Widths, e.g. 64,128; 'stage' takes each stage resolution's width and heads."
)
SWEEP_HEADS_OPTION = typer.Option(None, "--heads", help="Head counts, e.g. 2,4.")
SWEEP_KNOB_OPTION = typer.Option(
    None,
    "--knob",
    "-k",
    help="NAME=V1,V2 (repeatable), e.g. topk=4,8,16 or topk=[16,8,8]; applies to every selected "
    "mechanism with that knob.",
)
SWEEP_DTYPE_OPTION = typer.Option(None, "--dtype", help="float32, bfloat16, float16.")
SWEEP_PASS_OPTION = typer.Option(None, "--pass", help="fwd (inference forward), fwd+bwd.")
SWEEP_IMPL_OPTION = typer.Option(None, "--impl", help="reference, fast, or a kernel a mechanism declares.")
SWEEP_COMPILE_OPTION = typer.Option(None, "--compile", help="eager, compile or both (torch.compile).")
SWEEP_DEVICE_OPTION = typer.Option(None, "--device", help="cpu, cuda or cuda:N.")
SWEEP_CROSS_OPTION = typer.Option(None, "--cross", help="self, cross or both (cross attention where supported).")
SWEEP_PRESET_OPTION = typer.Option(
    None, "--preset", help="Named sweep: quick, scaling, topk, batch, paper, stages, video."
)
SWEEP_CONFIG_OPTION = typer.Option(None, "--config", help="A YAML or TOML sweep file (grid: and settings:).")
SWEEP_OUT_OPTION = typer.Option(
    None, "--out", "-o", help="Run directory (default runs/sweep-<time>); an existing one is resumed."
)
SWEEP_RESUME_OPTION = typer.Option(
    False,
    "--resume",
    help="Reuse the points --out holds even if another code revision measured them; with no axes, rerun its "
    "stored sweep.",
)
SWEEP_APPEND_OPTION = typer.Option(
    False, "--append", help="Add this grid to an --out that holds a sweep of another grid or other settings."
)
SWEEP_ISOLATE_OPTION = typer.Option(
    False, "--isolate", help="One subprocess per point (hard timeout; a crash costs one point)."
)
SWEEP_DEVICES_OPTION = typer.Option(
    None, "--devices", help="Run isolated workers in parallel, one per device: cuda:0,cuda:1."
)
SWEEP_CLUSTER_OPTION = typer.Option(None, "--cluster", help="Submit one job per point with submitit: slurm or local.")
SWEEP_TIMEOUT_OPTION = typer.Option(
    None, "--timeout", help="Per-point time limit in seconds (a budget in process, a kill with --isolate)."
)
SWEEP_THREADS_OPTION = typer.Option(
    None,
    "--threads",
    help="CPU threads (fixed with torch.set_num_threads and recorded; default 1, not the core count).",
)


@app.command("sweep")
def sweep(
    mechanism: list[str] = SWEEP_MECHANISM_OPTION,
    resolution: list[str] = SWEEP_RESOLUTION_OPTION,
    frames: list[str] = SWEEP_FRAMES_OPTION,
    batch: list[str] = SWEEP_BATCH_OPTION,
    dim: list[str] = SWEEP_DIM_OPTION,
    heads: list[str] = SWEEP_HEADS_OPTION,
    knob: list[str] = SWEEP_KNOB_OPTION,
    dtype: list[str] = SWEEP_DTYPE_OPTION,
    pass_: list[str] = SWEEP_PASS_OPTION,
    impl: list[str] = SWEEP_IMPL_OPTION,
    compile_: list[str] = SWEEP_COMPILE_OPTION,
    device: list[str] = SWEEP_DEVICE_OPTION,
    cross: list[str] = SWEEP_CROSS_OPTION,
    preset: str = SWEEP_PRESET_OPTION,
    config: str = SWEEP_CONFIG_OPTION,
    out: str = SWEEP_OUT_OPTION,
    resume: bool = SWEEP_RESUME_OPTION,
    append: bool = SWEEP_APPEND_OPTION,
    isolate: bool = SWEEP_ISOLATE_OPTION,
    devices: str = SWEEP_DEVICES_OPTION,
    cluster: str = SWEEP_CLUSTER_OPTION,
    timeout: float = SWEEP_TIMEOUT_OPTION,
    threads: int = SWEEP_THREADS_OPTION,
) -> None:
    """Measure latency, peak memory and MACs over a grid of points; results go to RUN_DIR/results.jsonl."""
    import datetime
    from pathlib import Path

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from attnbench.bench import executors
    from attnbench.bench.sweep import check_runnable, resolve_request, run_sweep

    if console.is_terminal:  # something from the first second: importing torch and expanding take a few
        console.print("sweep: importing torch, expanding the grid", style="dim")
    if out is None:
        if resume:
            raise AttnbenchError("--resume needs --out RUN_DIR")
        out = f"runs/sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    axes = {
        "mechanisms": mechanism,
        "resolutions": resolution,
        "frames": frames,
        "batches": batch,
        "dims": dim,
        "heads": heads,
        "dtypes": dtype,
        "passes": pass_,
        "impls": impl,
        "compile": compile_,
        "devices": device,
        "cross": cross,
    }
    grid, settings = resolve_request(
        preset, config, axes, knob, {"timeout_s": timeout, "threads": threads}, stored=Path(out) if resume else None
    )
    if sum(bool(x) for x in (isolate, devices, cluster)) > 1:
        raise AttnbenchError("choose one of --isolate, --devices and --cluster")
    if cluster not in (None, "slurm", "local"):
        raise AttnbenchError(f"--cluster takes slurm or local, not {cluster!r}")
    check_runnable(grid, devices_here=not cluster)
    if devices:
        executor = executors.MultiDevice([d.strip() for d in devices.split(",") if d.strip()])
    elif cluster:
        local = None
        if cluster == "local":
            import submitit

            local = submitit.LocalExecutor(folder=str(Path(out) / "submitit"))
        from attnbench.bench.sweep import load_sweep_file

        slurm = load_sweep_file(config)["slurm"] if config else None
        executor = executors.Submitit(Path(out) / "submitit", executor=local, slurm=slurm)
    elif isolate:
        executor = executors.Subprocess()
    else:
        executor = executors.InProcess()

    failed = {"n": 0, "skipped": 0}
    skip_reasons: Counter[str] = Counter()
    live = console.is_terminal  # not a terminal: no bar, one line per stored point
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("set up {task.fields[setup]}, slots {task.fields[slots]}, failed {task.fields[failed]}, "
                   "skipped {task.fields[skipped]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not live,
    )  # fmt: skip
    task = progress.add_task("preparing", total=None, setup=0, slots=0, failed=0, skipped=0)
    seen = {"setup": 0, "slots": 0, "stored": 0, "todo": 0}

    def on_event(kind: str, data: dict) -> None:
        if kind == "warning":
            console.print(f"[yellow]warning:[/yellow] {escape(data['message'])}")
        elif kind == "start":
            seen["todo"] = data["todo"]
            console.print(
                f"{data['total']} points, {data['stored']} already in {escape(out)}, {data['todo']} to measure"
            )
            progress.update(task, description="sweep", total=data["todo"], completed=0)
        elif kind in ("setup", "slot"):
            seen["setup" if kind == "setup" else "slots"] += 1
            what = f"set up {data['label']}" if kind == "setup" else f"slot {data['slot']} of {data['label']}"
            progress.update(task, setup=seen["setup"], slots=seen["slots"], description=f"sweep: {escape(what)}")
        elif kind == "point":
            rec = data["record"]
            seen["stored"] += 1
            if rec["status"] in ("oom", "error", "timeout"):
                failed["n"] += 1
                console.print(
                    f"[red]{rec['status']}[/red] {escape(str(rec['mechanism']))} {rec['height']}x{rec['width']}: "
                    f"{escape(str(rec.get('reason'))[:200])}"
                )
            elif rec["status"] == "skipped":
                failed["skipped"] += 1
                skip_reasons[" ".join(str(rec.get("reason") or "no reason given").split())] += 1
            if not live:  # one line per stored point
                median = rec.get("latency_ms_median")
                value = f" {median:.4g} ms" if isinstance(median, (int, float)) else ""
                console.print(
                    f"[{seen['stored']}/{seen['todo']}] {rec['status']} {escape(str(rec['mechanism']))} "
                    f"{rec['height']}x{rec['width']} {rec['pass']} {rec['impl']}{value}",
                    highlight=False,
                )
            progress.update(task, advance=1, failed=failed["n"], skipped=failed["skipped"])
        elif kind == "end":
            share = data["timed_share"]
            console.print(
                f"timed {data['timed_s']:.1f} s of the sweep's {data['wall_s']:.1f} s wall time: "
                f"timed share {share:.0%}"
            )

    with progress:
        summary = run_sweep(grid, out, settings, executor=executor, on_event=on_event, append=append, resume=resume)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items())) or "nothing new"
    for reason, n in skip_reasons.most_common():  # each distinct reason once, with how many points it skipped
        console.print(f"[yellow]skipped {n}[/yellow] point{'s' if n > 1 else ''}: {escape(reason)}")
    console.print(f"done: {counts}; results in {escape(str(summary.run_dir))}/results.jsonl (bench.load reads them)")


@app.command("env")
def env_(as_json: bool = JSON_OPTION) -> None:
    """Print the environment fingerprint that every run records (GPU, driver, CUDA, torch, CPU, git)."""
    from attnbench.bench.env import fingerprint

    fp = fingerprint()
    if as_json:
        typer.echo(json.dumps(fp, indent=2))
        return
    table = Table(title="environment")
    table.add_column("field")
    table.add_column("value")
    for k, v in fp.items():
        table.add_row(k, "-" if v is None else escape(str(v)))
    console.print(table)


REPORT_DIRS_ARGUMENT = typer.Argument(..., help="Run directories written by `attnbench sweep --out DIR`.")
REPORT_OUT_OPTION = typer.Option(
    None,
    "--out",
    "-o",
    help="HTML file to write (default RUN/report.html, in the first run directory; with --format only when given).",
)
REPORT_FORMAT_OPTION = typer.Option(
    None, "--format", help="md or csv: print the summary table at the reference point to stdout."
)
REPORT_BASELINE_OPTION = typer.Option(
    None,
    "--baseline",
    help="NAME[:IMPL]: the mechanism and implementation every ratio and crossover is set against "
    "(default full, impl fast); one the runs do not hold is refused.",
)


def default_report_name(run_dirs: list[str]) -> str:
    """report.html for one run; with several, a name that says which runs it sets beside the first."""
    from pathlib import Path

    if len(run_dirs) == 1:
        return "report.html"
    return "report-with-" + "-".join(Path(d).resolve().name for d in run_dirs[1:]) + ".html"


@app.command("report")
def report(
    run_dirs: list[str] = REPORT_DIRS_ARGUMENT,
    out: str = REPORT_OUT_OPTION,
    fmt: str = REPORT_FORMAT_OPTION,
    baseline: str | None = REPORT_BASELINE_OPTION,
) -> None:
    """Write one self-contained interactive HTML report of one or more runs (opens offline)."""
    from pathlib import Path

    from attnbench import reports
    from attnbench.bench.store import write_atomic

    if fmt is not None and fmt not in ("md", "csv"):
        raise AttnbenchError(f"--format takes md or csv, not {fmt!r}")
    if out is not None and Path(out).is_dir():
        raise AttnbenchError(f"--out {out} is a directory; pass the HTML file to write, e.g. {Path(out, 'r.html')}")
    runs = [reports.load_run(d) for d in run_dirs]
    baseline = reports.resolve_baseline(reports.tidy(runs), baseline, strict=baseline is not None)
    if fmt is not None:
        text = reports.format_table(reports.summary_of(runs, baseline), fmt)
        if not text:
            typer.echo("no point ran, so there is no summary table", err=True)
        typer.echo(text, nl=False)
    if fmt is None or out is not None:
        path = Path(out) if out else Path(run_dirs[0]) / default_report_name(run_dirs)
        html = reports.build_report(runs, baseline)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, html)
        typer.echo(f"report: {path} ({path.stat().st_size / 2**20:.1f} MiB)", err=fmt is not None)


COMPARE_BASE_ARGUMENT = typer.Argument(..., help="The run to compare against (e.g. main).")
COMPARE_NEW_ARGUMENT = typer.Argument(..., help="The run under test (e.g. your branch).")
COMPARE_HTML_OPTION = typer.Option(None, "--html", help="Also write the comparison as a self-contained HTML page.")
COMPARE_FAIL_OPTION = typer.Option(
    "10%",
    "--fail-above",
    help="Exit 1 only on a conclusive regression: the lower end of the bootstrap 95% interval of the "
    "probe-corrected latency ratio is above 1 + this (or memory grew by more than this, or a point broke).",
)
COMPARE_NOISE_OPTION = typer.Option(
    "5%", "--noise", help="Noise band for old records stored without samples and without a p20/p80 spread."
)
COMPARE_FORCE_OPTION = typer.Option(False, "--force", help="Compare runs from different environments anyway.")
COMPARE_ALLOW_MISSING_OPTION = typer.Option(
    False,
    "--allow-missing",
    help="Accept points of the base that the new run lacks (by default they fail the comparison, exit 1).",
)


@app.command("compare")
def compare_(
    base_run: str = COMPARE_BASE_ARGUMENT,
    new_run: str = COMPARE_NEW_ARGUMENT,
    html: str = COMPARE_HTML_OPTION,
    fail_above: str = COMPARE_FAIL_OPTION,
    noise: str = COMPARE_NOISE_OPTION,
    force: bool = COMPARE_FORCE_OPTION,
    allow_missing: bool = COMPARE_ALLOW_MISSING_OPTION,
) -> None:
    """Compare two runs point by point: latency and memory change, a verdict per point; exit 1 on regression.

    Points of the base missing from the new run fail it too (exit 1), unless --allow-missing.

    The test: a bootstrap 95% interval (2000 resamples) of the ratio of medians, new / base, from the raw samples.

    It is divided by the runs' calibration probe ratio: a machine slower as a whole is not a slower kernel.

    Interval above 1: slower; below 1: faster; else within noise. Contended in either run: inconclusive.

    Old records without samples: their p20-p80 intervals decide (decided_by "intervals").
    """
    from pathlib import Path

    from attnbench import reports
    from attnbench.bench.store import write_atomic
    from attnbench.reports.analysis import fmt_number
    from attnbench.reports.compare import missing_line, parse_percent, summary_line, terminal_table

    threshold, band = parse_percent(fail_above), parse_percent(noise)
    if html is not None and Path(html).is_dir():
        raise AttnbenchError(f"--html {html} is a directory; pass the HTML file to write, e.g. {Path(html, 'c.html')}")
    base, new = reports.load_run(base_run), reports.load_run(new_run)
    cmp = reports.compare(base, new, fail_above=threshold, noise=band, force=force, allow_missing=allow_missing)
    path = None
    if html:  # written first: a page that cannot be written is one line of error, before the table
        path = Path(html)
        page = reports.build_compare_page(cmp, base, new)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, page)
    if cmp.differences:
        console.print(
            "[yellow]forced:[/yellow] environments differ: " + escape("; ".join(cmp.differences)), soft_wrap=True
        )
    shown = terminal_table(cmp)
    table = Table(title=escape(f"{base.name} -> {new.name} (! = regression beyond {fail_above})"))
    for col in shown.columns:
        table.add_column(col, justify="right" if shown[col].dtype.kind in "fi" else "left")
    styles = {"slower": "red", "faster": "green"}
    for _, r in shown.iterrows():
        style = "bold red" if r["verdict"].endswith("!") else styles.get(str(r["verdict"]).split(" ")[0])
        table.add_row(*(escape(fmt_number(v)) for v in r), style=style)
    console.print(table)
    console.print(escape(summary_line(cmp)), soft_wrap=True)
    if path is not None:
        console.print(f"comparison: {escape(str(path))}", soft_wrap=True)
    missing = missing_line(cmp)
    if missing:
        typer.echo("failed: " + missing, err=True)
    if cmp.failed:
        raise typer.Exit(1)


FLOPS_MECHANISM_OPTION = typer.Option(None, "--mechanism", "-m", help="A registered mechanism (see `attnbench list`).")
FLOPS_MODEL_OPTION = typer.Option(
    None, "--model", help="A model: a name in models.create, or any nn.Module factory as package.module:function."
)
FLOPS_RESOLUTION_OPTION = typer.Option(
    "14x14", "--resolution", "-r", help="Token map HxW (or one side) for a mechanism; image pixels for a model."
)
FLOPS_KNOB_OPTION = typer.Option(None, "--knob", "-k", help="A mechanism knob as k=v; repeat for several.")
FLOPS_CONTEXT_OPTION = typer.Option(None, "--context-resolution", help="Context map HxW for --cross (default: own).")


def _flops_hw(text: str, label: str, image: bool = False) -> tuple[int, ...]:
    """One map in the sweep's grammar (bench.points.parse_resolution): 14, 14x20, 224px:s2 (a stage's
    token map); for a model (``image``), image pixels: 224, 224x320 or 224px."""
    from attnbench.bench.points import parse_resolution

    parsed = parse_resolution(text)
    if image and len(parsed) == 4 and parsed[0].image is not None:  # 224px: the image itself
        return parsed[0].image
    if len(parsed) != 1 or (image and parsed[0].stage is not None):
        raise AttnbenchError(f"{label} takes one map such as 14x14, got {text!r}")
    return parsed[0].hw


# flops runs the module on real tensors: maps beyond these bounds cannot be held (full attention at the
# largest map already stores 3 x 65,536^2 float32 weights, 48 GiB), so they are refused before anything is built.
FLOPS_MAX_TOKENS = 65_536  # tokens of one map (256x256) for a mechanism
FLOPS_MAX_PIXELS = 16 * FLOPS_MAX_TOKENS  # pixels of one image (1024x1024) for a model (stage 1: 16 px a token)
FLOPS_MAX_BATCH_ITEMS = 4  # a batch may hold up to 4 maps or images of the largest size


def _check_flops_size(label: str, hw: tuple[int, int], batch: int, image: bool) -> None:
    limit, unit = (FLOPS_MAX_PIXELS, "pixels") if image else (FLOPS_MAX_TOKENS, "tokens")
    size = hw[0] * hw[1]
    if size > limit:
        raise AttnbenchError(
            f"{label} {hw[0]}x{hw[1]} is {size:,} {unit}, above flops' bound of {limit:,} {unit} "
            f"({'1024x1024' if image else '256x256'}), whose tensors cannot be held; pass a smaller {label}"
        )
    if batch * size > FLOPS_MAX_BATCH_ITEMS * limit:
        raise AttnbenchError(
            f"--batch {batch} at {hw[0]}x{hw[1]} is {batch * size:,} {unit} in all, above flops' bound of "
            f"{FLOPS_MAX_BATCH_ITEMS * limit:,}; pass a smaller --batch"
        )


def _flops_model(spec: str, tiny: bool):
    """Build a model from models.create(name) or from a package.module:factory spec."""
    import importlib

    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise AttnbenchError(f"--model {spec}: write a factory as package.module:function")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise AttnbenchError(f"--model {spec}: cannot import {module_name} ({exc}); check the module") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise AttnbenchError(f"--model {spec}: {module_name} has no callable {attr!r}")
        return factory()
    from attnbench import models

    return models.create(spec, tiny=tiny) if tiny else models.create(spec)


@app.command("flops")
def flops_(
    mechanism: str = FLOPS_MECHANISM_OPTION,
    model: str = FLOPS_MODEL_OPTION,
    resolution: str = FLOPS_RESOLUTION_OPTION,
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="Batch size."),
    knob: list[str] = FLOPS_KNOB_OPTION,
    dim: int = typer.Option(96, "--dim", help="Channels of the mechanism."),
    heads: int = typer.Option(3, "--heads", help="Attention heads of the mechanism."),
    cross: bool = typer.Option(False, "--cross", help="Cross attention (keys and values from a context map)."),
    context_resolution: str = FLOPS_CONTEXT_OPTION,
    impl: str = typer.Option(None, "--impl", help="Implementation to count (default: the mechanism's fastest)."),
    tiny: bool = typer.Option(False, "--tiny", help="The tiny variant of a zoo model."),
    in_chans: int = typer.Option(3, "--in-chans", help="Image channels of a model's input."),
    backward: bool = typer.Option(True, "--backward/--no-backward", help="Also measure the backward pass."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Count multiply-adds (MACs; FLOPs = 2 x MACs) of one mechanism at one point, or of a whole model."""
    import torch

    from attnbench import attentions
    from attnbench.bench import flops as flopcount
    from attnbench.bench.points import parse_knob

    if (mechanism is None) == (model is None):
        raise AttnbenchError("give exactly one of --mechanism NAME or --model NAME")
    hw = _flops_hw(resolution, "--resolution", image=model is not None)
    _check_flops_size("--resolution", hw, batch, image=model is not None)
    if mechanism is not None:
        values = {}
        for item in knob or []:
            key, parsed = parse_knob(item)  # the sweep's --knob grammar, one value
            if len(parsed) != 1:
                raise AttnbenchError(f"--knob {item}: flops counts one point, so give one value")
            values[key] = parsed[0]
        context_hw = _flops_hw(context_resolution, "--context-resolution") if context_resolution else None
        if context_hw is not None:
            _check_flops_size("--context-resolution", context_hw, batch, image=False)
        if context_hw is not None and not cross:
            raise AttnbenchError("--context-resolution needs --cross")
        reasons = attentions.not_supported_reasons(
            mechanism, dim=dim, heads=heads, hw=hw, knobs=values, impl=impl, batch=batch, cross=cross,
            context_hw=context_hw,
        )  # fmt: skip
        if reasons:
            raise AttnbenchError("; ".join(reasons))
        module = attentions.build(mechanism, dim=dim, heads=heads, impl=impl, **values)
        args = module.example_inputs(batch, hw, cross=cross, context_hw=context_hw)
        what = (
            f"{mechanism} ({module.impl}) at {'x'.join(map(str, hw))} tokens, batch {batch}, dim {dim}, heads {heads}"
        )
        what += f", cross with {args[3][0]}x{args[3][1]} context" if len(args) > 3 else ""
        analytic = None
    else:
        with _Steps(f"flops --model {model}", quiet=as_json) as building:
            building.step(f"building {model}")
            net = _flops_model(model, tiny)
        if not isinstance(net, torch.nn.Module):
            raise AttnbenchError(f"--model {model} did not build an nn.Module (got {type(net).__name__})")
        args = (torch.randn(batch, in_chans, hw[0], hw[1]),)
        module = net
        what = f"model {model} at {hw[0]}x{hw[1]} px, batch {batch}"
        model_macs = getattr(net, "macs", None)
        analytic = (lambda m, a: int(model_macs(batch, hw))) if callable(model_macs) else None
    with _Steps(f"counting {what}", quiet=model is None or as_json) as steps:  # a mechanism: about a second
        result = flopcount.count(module, args, analytic=analytic, backward=backward, on_stage=steps.step)
    if as_json:
        typer.echo(json.dumps({"what": what, **result.as_dict()}, indent=2))
        return

    def row(label: str, macs: int | None, note: str = "") -> None:
        if macs is None:
            table.add_row(label, "-", "-", "-", escape(note))
        else:
            table.add_row(label, f"{macs:,}", f"{macs / 1e9:.4f}", f"{2 * macs / 1e9:.4f}", escape(note))

    table = Table(title=escape(f"multiply-adds of one call: {what}"), caption="MACs = multiply-adds; FLOPs = 2 x MACs")
    for col, justify in (("count", "left"), ("MACs", "right"), ("GMACs", "right"), ("GFLOPs", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    err = result.relative_error()
    row("forward: fvcore + handles", result.macs, result.status())
    row("forward: analytic macs()", result.analytic_macs, "" if err is None else f"counter differs by {err:.2%}")
    fc_note = result.flop_counter_error or (
        "INCOMPLETE: " + ", ".join(f"{k} x{v}" for k, v in result.flop_counter_uncovered.items())
        if result.flop_counter_uncovered
        else "complete"
    )
    row("forward: FlopCounterMode", result.flop_counter_macs, fc_note)
    row("backward: rule (2 x forward)", result.backward_macs_rule, "stated rule")
    if backward:
        bw_note = result.backward_error or (
            "INCOMPLETE: " + ", ".join(f"{k} x{v}" for k, v in result.backward_uncovered.items())
            if result.backward_uncovered
            else "measured by FlopCounterMode"
        )
        row("backward: measured", result.backward_macs_measured, bw_note)
    console.print(table)
    zero = ", ".join(f"{k.split('::')[-1]} x{v}" for k, v in sorted(result.zero_ops.items())) or "(none)"
    console.print(
        f"[dim]counted as zero on purpose (elementwise, softmax, top-k, gathers, data movement): {escape(zero)}[/dim]"
    )
    by_op = ", ".join(f"{k} {v:,}" for k, v in sorted(result.by_op.items(), key=lambda kv: -kv[1])) or "(none)"
    console.print(f"MACs by op: {escape(by_op)}")
    if not result.complete:
        missing = escape(result.status().split(": ", 1)[1])
        console.print(f"[bold red]incomplete count: no rule for {missing}[/bold red]")
        raise typer.Exit(3)


@app.command("models")
def models_(
    names: list[str] = typer.Argument(None, help="Models to list (default: the whole zoo)."),
    as_json: bool = JSON_OPTION,
    tiny: bool = typer.Option(False, "--tiny", help="List the tiny variants (32 px, CPU-trainable) instead."),
) -> None:
    """List the model zoo: native resolution, parameters and multiply-adds (FLOPs = 2 x MACs) there."""
    from attnbench import models
    from attnbench.models.report import zoo_rows

    unknown = [n for n in names or [] if n not in models.available()]
    if unknown:
        raise AttnbenchError(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(models.available())}")
    wanted = names or models.available()
    # --json is read by programs: no progress lines there but on a terminal's stderr
    with _Steps(f"counting the multiply-adds of {len(wanted)} model(s)", total=len(wanted), quiet=as_json) as steps:
        rows = zoo_rows(wanted, tiny=tiny, on_row=lambda name, i, n: steps.step(name))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(
        title="model zoo" + (" (tiny variants)" if tiny else ""),
        caption="MACs = multiply-adds counted by bench.flops at the native resolution (batch 1); FLOPs = 2 x MACs. "
        "The papers' 'GFLOPs' are GMACs.",
    )
    for col, justify in (
        ("model", "left"), ("native", "right"), ("params", "right"), ("GMACs", "right"), ("GFLOPs", "right"),
        ("published", "right"), ("count", "left"),
    ):  # fmt: skip
        table.add_column(col, justify=justify, no_wrap=col == "model")
    for r in rows:
        pub = "-"
        if r["published_params"] is not None and not tiny:
            pub = f"{r['published_params'] / 1e6:.1f}M, {r['published_gmacs']} GMACs"
        table.add_row(
            r["model"],
            f"{r['resolution']} px",
            f"{r['params'] / 1e6:.2f}M",
            f"{r['macs'] / 1e9:.3f}",
            f"{2 * r['macs'] / 1e9:.3f}",
            pub,
            "complete" if not r["uncovered"] else escape("INCOMPLETE: " + ", ".join(r["uncovered"])),
        )
    console.print(table)


@app.command("train")
def train_(
    model: str = typer.Option(..., "--model", "-m", help="A zoo model (attnbench models lists them)."),
    tiny: bool = typer.Option(False, "--tiny", help="The tiny variant (32 px native), trains on a CPU."),
    data: str = typer.Option(
        "synthetic", "--data", help="synthetic, cifar10:PATH, cifar100:PATH, imagenet:PATH or a folder ROOT/<class>/."
    ),
    resolution: int = typer.Option(None, "--resolution", "-r", help="Image side in px (default: the model's native)."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs to train in all (a continued run may be given more)."),
    batch: int = typer.Option(64, "--batch", "-b", help="Batch size."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate of AdamW (cosine schedule, 1 epoch warm-up)."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision (float16 on CUDA, bfloat16 on the CPU)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]."),
    out: str = typer.Option(
        ..., "--out", "-o", help="Run directory (results, env.json, checkpoint.pt); the same command continues it."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Kept for older scripts: the same command continues the run in --out anyway."
    ),
    train_size: int = typer.Option(2048, "--train-size", help="Synthetic training images."),
    val_size: int = typer.Option(512, "--val-size", help="Synthetic held-out images."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order, the synthetic images and the weights."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for torch, set before any work, in every row."),
    recipe: str = typer.Option(
        "none", "--recipe", help="Augmentation: none, or deit (crop, flip, RandAugment, mixup, cutmix, erasing)."
    ),
    ema: float = typer.Option(None, "--ema", help="Also evaluate an EMA of the weights with this decay (0.9998)."),
    drop_path: float = typer.Option(None, "--drop-path", help="Stochastic depth rate (default: the model's own)."),
    nproc: int = typer.Option(
        1, "--nproc", help="Processes (one per GPU) on this node, data-parallel; --batch is the global batch."
    ),
    cluster: str = typer.Option(None, "--cluster", help="slurm: submit --nodes x --nproc tasks through submitit."),
    nodes: int = typer.Option(1, "--nodes", help="Nodes of a --cluster slurm job."),
    partition: str = typer.Option(None, "--partition", help="Slurm partition of a --cluster slurm job."),
    workers: int = typer.Option(0, "--workers", help="Data-loader processes per training process (0: none)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train a zoo model end to end; per-epoch and final metrics go to RUN_DIR/results.jsonl.

    Killed at any moment, the same command continues the run from its last checkpoint; run again when
    complete, it prints the stored result. Another command's directory, or a run made with other
    options, is refused in one line. Started by torchrun or srun, each process trains its share."""
    from attnbench.studies.train import TrainConfig, train

    cfg = TrainConfig(
        model=model, tiny=tiny, data=data, resolution=resolution, epochs=epochs, batch=batch, lr=lr, amp=amp,
        device=device, out=out, resume=resume, train_size=train_size, val_size=val_size, seed=seed, threads=threads,
        recipe=recipe, ema=ema, drop_path=drop_path, nproc=nproc, cluster=cluster, nodes=nodes, partition=partition,
        workers=workers,
    )  # fmt: skip
    result = train(cfg, progress=not as_json)
    if result is None:  # a rank other than 0 (torchrun, srun): rank 0 reports
        return
    if "submitted" in result:
        console.print(
            f"submitted Slurm job {result['submitted']} ({result['tasks']} tasks); logs in {escape(result['logs'])}; "
            f"results in {escape(out)}/results.jsonl"
        )
        return
    result.pop("step_losses", None)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    macs = result["macs"]
    console.print(
        f"{escape(result['model'])} at {result['resolution']} px: held-out accuracy {result['accuracy']:.1%} after "
        f"{result['epochs']} epochs; {result['params'] / 1e6:.3f}M params, "
        + (f"{macs / 1e9:.4f} GMACs ({2 * macs / 1e9:.4f} GFLOPs) per image, " if macs is not None else "")
        + f"{result['images_per_s']:.0f} img/s on {result.get('world_size', 1)} process(es), "
        + (f"data wait {wait:.0%}, " if (wait := result.get("data_wait_share")) is not None else "")
        + f"peak {result['peak_bytes'] / 2**20:.0f} MiB "
        f"({result['memory_method']}); results in {escape(out)}/results.jsonl"
    )


def _knob_pairs(knob: list[str] | None) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in knob or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise AttnbenchError(f"--knob takes NAME=VALUE, got {item!r}")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


@app.command("match")
def match_(
    mechanism: str = typer.Option(
        "full,linear,pvt,quadtree",
        "--mechanism",
        "-m",
        help="Mechanisms with cross attention, comma-separated; controls: MECH.twin (negative), MECH.isolated "
        "(positive: each token reads only itself), MECH.self-only (positive: no cross blocks).",
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Quick preset (patch stem, 20 epochs): 4 mechanisms x 2 seeds in about 3 min on 2 CPU cores.",
    ),
    smoke: bool = typer.Option(False, "--smoke", help="The smoke preset: seconds, checks that everything runs."),
    seeds: int = typer.Option(2, "--seeds", help="Seeds per mechanism (weights, data and order); 95% intervals."),
    resolution: int = typer.Option(None, "--resolution", "-r", help="Image side in px, a multiple of 8 (>= 32)."),
    data: str = typer.Option("synthetic", "--data", help="'synthetic', 'skimage' (its photos) or a folder."),
    knob: list[str] = typer.Option(None, "--knob", "-k", help="NAME=VALUE for every mechanism with that knob."),
    out: str = typer.Option(..., "--out", "-o", help="Run directory (results store, footprints, report.html)."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for torch, set before any work, in every row."),
    nproc: int = typer.Option(
        1, "--nproc", help="Processes training each run data-parallel (gloo, CPU); the batch is split across them."
    ),
) -> None:
    """Train the LoFTR-style coarse matcher per mechanism and seed; rows and report in --out.

    Killed at any moment, the same command continues (a run from its last checkpoint); more mechanisms or
    seeds may be added to a directory, other settings are refused."""
    import time

    from attnbench.reports.matching import write_report
    from attnbench.studies.matching import MatchRunConfig, run

    if quick and smoke:
        raise AttnbenchError("choose one of --quick and --smoke")
    t0 = time.perf_counter()
    cfg = MatchRunConfig(
        mechanisms=tuple(m.strip() for m in mechanism.split(",") if m.strip()),
        out=out, seeds=seeds, preset="smoke" if smoke else "quick" if quick else "default", source=data,
        resolution=resolution, knobs=_knob_pairs(knob), threads=threads, nproc=nproc,
    )  # fmt: skip
    run(cfg, log=console.print, progress=True)
    path = write_report(out)
    console.print(f"{time.perf_counter() - t0:.0f} s; results in {out}/results.jsonl, report {path}")


@app.command("footprint")
def footprint_(
    mechanism: str = typer.Option(
        "full,linear,pvt,swin,quadtree,deformable,pooling,cross", "--mechanism", "-m", help="Mechanisms, comma list."
    ),
    resolution: str = typer.Option(
        "28", "--resolution", "-r", help="Token map: 28 (square), 28x56 (H x W) or 4x28x28 (a T x H x W clip)."
    ),
    frames: int = typer.Option(
        None, "--frames", help="Token frames: the -r map becomes a T x H x W clip, drawn as a strip of frames."
    ),
    query: str = typer.Option(
        None, "--query", "-q", help="Query pixel I,J of the map, T,I,J of a clip (default: its centre)."
    ),
    cross: bool = typer.Option(False, "--cross", help="Cross attention over a second map, where supported."),
    knob: list[str] = typer.Option(None, "--knob", "-k", help="NAME=VALUE for every mechanism with that knob."),
    dim: int = typer.Option(64, "--dim", help="Width of the tokens."),
    heads: int = typer.Option(4, "--heads", help="Heads."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and the random tokens."),
    out: str = typer.Option(..., "--out", "-o", help="The HTML file to write."),
) -> None:
    """Draw where one query looks, for each mechanism at initialisation: weights over the key map (on a clip,
    -r TxHxW or --frames, a strip of frames per mechanism)."""
    from attnbench.reports.matching import write_footprint_page
    from attnbench.studies.matching import standalone_footprints

    hw = _flops_hw(resolution, "--resolution")
    if frames is not None:
        if len(hw) == 3:
            raise AttnbenchError(f"--resolution {resolution} is already a clip; drop --frames or the T of -r")
        if frames < 1:
            raise AttnbenchError(f"--frames takes a positive number of token frames, got {frames}")
        hw = (frames, *hw)
    parts = [] if query is None else query.split(",")
    want = "T,I,J (three integers) on a clip" if len(hw) == 3 else "I,J (two integers)"
    if query is not None and (len(parts) != len(hw) or not all(p.strip().lstrip("-").isdigit() for p in parts)):
        raise AttnbenchError(f"--query takes {want}, got {query!r}")
    q = None if query is None else tuple(int(p) for p in parts)
    panels = standalone_footprints(
        [m.strip() for m in mechanism.split(",") if m.strip()], hw, q, cross, _knob_pairs(knob), dim, heads, seed
    )
    write_footprint_page(panels, out)
    console.print(f"footprints of {len(panels)} mechanism(s) in {out}")


@app.command("reproduce")
def reproduce(
    experiment: str = typer.Argument(None, help="A shipped experiment (--list) or the path of an experiment YAML."),
    quick: bool = typer.Option(False, "--quick", help="The CPU-sized mode: tiny models, >= 3 seeds (the default)."),
    full: bool = typer.Option(False, "--full", help="The published configuration (224 px; a GPU or an image folder)."),
    smoke: bool = typer.Option(False, "--smoke", help="One training step per variant, one seed (seconds; for CI)."),
    seeds: int = typer.Option(None, "--seeds", help="Seeds per variant (default: the file's)."),
    data: str = typer.Option(
        None, "--data", help="synthetic, cifar10:PATH, cifar100:PATH, imagenet:PATH or a folder (default: the file's)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]."),
    out: str = typer.Option(None, "--out", "-o", help="Directory of the rows (results.jsonl) and report.html."),
    work: str = typer.Option(None, "--work", help="Where the training runs and checkpoints go (default OUT/runs)."),
    compare: list[str] = typer.Option([], "--compare", help="Other reproduce directories shown on the same page."),
    list_: bool = typer.Option(False, "--list", help="List the shipped experiments and exit."),
    nproc: int = typer.Option(
        1, "--nproc", help="Processes (one per GPU) training each variant data-parallel; the recipe's batch is global."
    ),
) -> None:
    """Train and measure every variant of a paper's experiment; rows in OUT/results.jsonl, page in OUT/report.html.

    Killed at any moment, the same command continues: stored rows are kept, trainings continue from their
    checkpoints. A directory of another command, or one being written, is refused in one line."""
    from attnbench.studies import experiments

    if list_:
        for path in experiments.shipped():
            exp = experiments.load(str(path))
            console.print(f"[bold]{exp.name}[/bold]  {len(exp.variants)} variants  {exp.title}")
        return
    if experiment is None or out is None:
        raise AttnbenchError("give an experiment and --out DIR (or --list)")
    if quick + full + smoke > 1:
        raise AttnbenchError("choose one of --quick, --full and --smoke")
    mode = "full" if full else "smoke" if smoke else "quick"
    from rich.markup import escape

    from attnbench.bench.store import write_atomic
    from attnbench.reports.experiments import build_page

    for other in compare:
        if not (Path(other) / "results.jsonl").is_file():
            raise AttnbenchError(f"--compare {other}: no results.jsonl there; give a directory of attnbench reproduce")
    exp = experiments.load(experiment)
    summary = experiments.run(
        exp, mode, out, seeds=seeds, data=data, device=device, work=work, log=lambda s: console.print(escape(s)),
        progress=True, nproc=nproc,
    )  # fmt: skip
    page = f"{out}/report.html"
    write_atomic(page, build_page([out, *compare]))
    console.print(
        f"{escape(exp.name)} \\[{mode}]: {summary['trained']} trained, {summary['reused']} finished trainings reused, "
        f"{summary['measured']} cost points, "
        f"{summary['skipped']} already stored; {summary['wall_s']:.0f} s; report in {page}"
    )


KERNELS_TARGET_OPTION = typer.Option(
    ["sm_90a"], "--target", help="GPU target(s) to compile for: sm_90a (Hopper), sm_80 (Ampere); repeat for several."
)
KERNELS_DTYPE_OPTION = typer.Option(None, "--dtype", help="bfloat16, float16, float32 (default: all three).")
KERNELS_OUT_OPTION = typer.Option(None, "--out", help="Also write TARGET.json and TARGET.md into this folder.")
KERNELS_CHECK_OPTION = typer.Option(
    False, "--check", help="Exit 1 on any spill, dot kernel without tensor cores or kernel without vectorised loads."
)


@app.command("kernels")
def kernels_(
    target: list[str] = KERNELS_TARGET_OPTION,
    dtype: list[str] | None = KERNELS_DTYPE_OPTION,
    out: str | None = KERNELS_OUT_OPTION,
    check: bool = KERNELS_CHECK_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Compile every Triton kernel offline for a GPU target (no GPU needed) and report registers, spills,
    shared memory, tensor-core instructions and vectorised loads at the scaling preset's shapes."""
    import os

    from attnbench.attentions.kernels import quality

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise AttnbenchError("attnbench kernels compiles for a GPU: unset TRITON_INTERPRET")
    unknown = [t for t in target if t not in quality.TARGETS] + [d for d in dtype or [] if d not in quality.DTYPES]
    if unknown:
        raise AttnbenchError(
            f"unknown target or dtype {unknown}: targets {list(quality.TARGETS)}, dtypes {list(quality.DTYPES)}"
        )
    reports, failed = [], False
    for t in target:
        rows = quality.analyse(t, dtype or list(quality.DTYPES))
        failed = failed or bool(quality.problems(rows))
        reports.append(quality.as_json(t, rows))
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"{t}.json"), "w", encoding="utf-8") as f:
                json.dump(reports[-1], f, indent=1)
                f.write("\n")
            with open(os.path.join(out, f"{t}.md"), "w", encoding="utf-8") as f:
                f.write(quality.as_markdown(t, rows))
        if not as_json:
            typer.echo(quality.as_markdown(t, rows))
    if as_json:
        typer.echo(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
    if check and failed:
        raise typer.Exit(1)


def entry() -> None:
    """The ``attnbench`` console script and ``python -m attnbench``: the app, then a quick exit.

    Tearing down an interpreter that imported torch (freeing every module and object one by one) takes
    0.3 to 0.5 s after the command is done. Once the app has finished, its output is flushed and the exit
    handlers (``atexit``: logging, weakref finalizers, temporary directories) have run, nothing is left to
    do, so the process ends there (``os._exit``) with the app's exit status. Where another non-daemon
    thread still runs, or a profiler or tracer watches (``python -m cProfile -o OUT -m attnbench``, coverage,
    a debugger), the interpreter's usual exit runs instead. ``app()`` itself exits as
    usual (tests call it in process)."""
    import atexit
    import contextlib
    import os
    import sys
    import threading

    try:
        app()
        status: object = 0
    except SystemExit as exc:
        status = exc.code
    watched = sys.getprofile() is not None or sys.gettrace() is not None  # cProfile, coverage, a debugger
    if watched or any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(status)  # the usual exit: a profiler writes its stats, a running thread is waited for
    if status is None:
        status = 0
    elif not isinstance(status, int):  # sys.exit("message"): the message on stderr, status 1
        print(status, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream takes nothing more
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
