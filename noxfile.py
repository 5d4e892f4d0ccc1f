"""nox sessions for attnbench: what CI and users run.

Every session that needs torch installs it first from ATTNBENCH_TORCH (default
``torch==2.13.0``, the CPU build), so a GPU user can choose theirs, e.g.
``ATTNBENCH_TORCH="torch==2.9.1" nox -s train``; then the project, editable, with
the extras the session needs from pyproject.toml. Virtualenvs are reused
(``nox -R`` also skips the install step).

    tests      the CPU test-suite (what .ci/run runs), less the slow cases
    slow       the slow cases (pytest -m slow): full products, subprocess and executor tests
    kernels    the Triton kernels' tests (interpreter parity, offline sm_90a/sm_80 compile) under CI's triton and 3.6
    lint       ruff check and ruff format --check
    typecheck  mypy on the packages
    bench      pytest-benchmark against this machine's saved baseline; fails on a regression
    smoke      the smoke sweep (CI-sized), its HTML report and a headless-browser check of it
    gpu        scripts/gpu_run.sh: the phased GPU run, in this Python, nothing from the network
    train      a short training of every tiny model
    quick      the main job: the quick sweep and its report
    noise      the noise check: a preset twice on unchanged code, compared; then once with one mechanism 2x slower
    docs       the generated reference pages checked against the code, then mkdocs build --strict
"""

from __future__ import annotations

import os
import shutil
import sys

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint"]

TORCH = os.environ.get("ATTNBENCH_TORCH", "torch==2.13.0")
RUFF = "ruff==0.17.6"  # pinned: formatting must not drift between machines
PACKAGES = ["attnbench", "attentions", "bench", "reports", "models", "studies", "scripts", "noxfile.py", "tests"]
# mypy at its default strictness on these; the ratchet below applies to the rest.
TYPED = ["attnbench/errors.py", "attnbench/__init__.py", "attentions", "bench", "reports"]
TYPED_RATCHET = ["models", "studies", "attnbench/cli.py"]

# nox -s bench fails when a case's median is slower than the baseline's by more than this. Chosen from the
# run-to-run noise of unchanged code (docs/findings.md, "The regression threshold's noise measurements"); override with
# ATTNBENCH_BENCH_FAIL, e.g. "median:10%" on a quiet GPU machine.
BENCH_FAIL = os.environ.get("ATTNBENCH_BENCH_FAIL", "median:50%")
BENCH_COLUMNS = "median,iqr,min,rounds"

# nox -s noise sweeps this preset three times; the mechanism the slowdown plugin makes 2x slower.
NOISE_PRESET = "smoke"
NOISE_SLOWED = "linear"

# For models/ and attnbench/cli.py: mypy's default checks, less the error codes they do not pass yet (41 errors, mostly
# plain dicts and unions passed where narrower types are declared). A ratchet: fix a code's errors, then
# remove it here. Everything else mypy checks by default (call-arg, name-defined, return, override, ...) holds.
MYPY_DISABLED = [
    "arg-type",
    "assignment",
    "attr-defined",
    "call-overload",
    "dict-item",
    "index",
    "list-item",
    "misc",
    "operator",
    "return-value",
    "union-attr",
    "valid-type",
]


def install(session: nox.Session, extras: str = "dev") -> None:
    """torch first (so the override wins), then the project with its extras."""
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


def has_cuda(session: nox.Session) -> bool:
    out = session.run("python", "-c", "import torch; print(torch.cuda.is_available())", silent=True, log=False)
    return str(out).strip().endswith("True")


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test-suite (what .ci/run runs); GPU tests skip without CUDA, Triton kernels run interpreted."""
    install(session, "dev,browser")
    session.run("pytest", "-q", *session.posargs, env={"TRITON_INTERPRET": "1"})


KERNEL_PARITY = "tests/attentions/test_kernels_quadtree.py"  # under TRITON_INTERPRET=1
KERNEL_QUALITY = "tests/attentions/test_kernel_quality.py"  # compiled offline for sm_90a, without the interpreter


@nox.session
@nox.parametrize("triton", ["ci", "3.6"])
def kernels(session: nox.Session, triton: str) -> None:
    """The Triton kernels' tests under the triton CI installs ("ci") and under 3.6, the GPU image's (with torch
    2.11 there: ATTNBENCH_TORCH="torch==2.11.*" nox -s "kernels(triton='3.6')" for the same pair)."""
    install(session)
    if triton != "ci":
        session.install(f"triton=={triton}.*")
    session.run("python", "-c", "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)")
    session.run("pytest", "-q", KERNEL_PARITY, *session.posargs, env={"TRITON_INTERPRET": "1"})
    session.run("pytest", "-q", KERNEL_QUALITY, *session.posargs, env={"TRITON_INTERPRET": "0"})


@nox.session
def slow(session: nox.Session) -> None:
    """The cases under the slow marker, which the default test run leaves out (pyproject.toml's addopts)."""
    install(session, "dev,browser")
    session.run("pytest", "-q", "-m", "slow", *session.posargs, env={"TRITON_INTERPRET": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(RUFF)
    session.run("ruff", "check", *PACKAGES)
    session.run("ruff", "format", "--check", *PACKAGES)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy: attentions, bench and reports at default strictness; models, studies and the CLI under the ratchet."""
    install(session)
    if session.posargs:
        session.run("mypy", *session.posargs)
        return
    session.run("mypy", *TYPED)
    session.run("mypy", *[f"--disable-error-code={code}" for code in MYPY_DISABLED], *TYPED_RATCHET)


@nox.session
def bench(session: nox.Session) -> None:
    """pytest-benchmark (tests/perf) against this machine's latest saved baseline; fails on a median regression.

    nox -s bench                 compare with the baseline in .benchmarks/<machine>/, fail over BENCH_FAIL
    nox -s bench -- --save       save a new baseline (do this on main); commit the new .benchmarks file
    nox -s bench -- -k swin      any other arguments go to pytest
    """
    install(session)
    args = list(session.posargs)
    save = "--save" in args
    if save:
        args.remove("--save")
    common = [
        "--benchmark-only",
        f"--benchmark-columns={BENCH_COLUMNS}",
        "--benchmark-sort=name",
        "-q",
        "-W",
        "ignore::DeprecationWarning",
    ]
    if save:
        session.run("pytest", "tests/perf", *common, "--benchmark-autosave", *args)
        session.log("baseline saved under .benchmarks/; commit it (git add .benchmarks) on main")
        return
    compare = ["--benchmark-compare", f"--benchmark-compare-fail={BENCH_FAIL}"]
    # tests/perf first: its conftest keys the storage by machine, so it must be the path pytest starts from.
    regressed = os.path.join(session.create_tmp(), "regressed.txt")
    if os.path.exists(regressed):
        os.remove(regressed)
    session.run("pytest", "tests/perf", *common, *compare, *args, env={"ATTNBENCH_BENCH_REGRESSED": regressed})
    if not os.path.exists(regressed):
        return
    with open(regressed) as f:
        cases = [line.strip() for line in f if line.strip()]
    # A case over the threshold is measured once more; only a case slower both times fails the session.
    session.log(f"measuring again the {len(cases)} case(s) over {BENCH_FAIL}, to tell a regression from noise")
    session.run("pytest", *common, *compare, *cases)


@nox.session
def smoke(session: nox.Session) -> None:
    """The smoke sweep of every mechanism on the CPU, its HTML report, and the report opened in headless Chromium."""
    install(session, "dev,browser")
    out = session.posargs[0] if session.posargs else "runs/smoke"
    session.run("attnbench", "sweep", "--preset", "smoke", "--device", "cpu", "--out", out, "--resume")
    session.run("attnbench", "report", out, "--out", f"{out}/report.html")
    session.run("python", ".ci/check_report.py", f"{out}/report.html")
    session.run("attnbench", "match", "--smoke", "--seeds", "1", "--out", f"{out}-match")


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """The phased GPU run (scripts/gpu_run.sh) in this Python, installing nothing from the network.

    nox -s gpu                       the full run into runs/gpu (wheels from .whl/ if present)
    nox -s gpu -- runs/x --dry-run   any arguments go to the script: --dry-run, --tiny, --plan, --pack FILE
    """
    args = list(session.posargs) or ["runs/gpu"]
    python = os.environ.get("PYTHON", sys.executable)  # the Python nox runs in, unless PYTHON names another
    session.run("bash", "scripts/gpu_run.sh", *args, external=True, env={"PYTHON": python})


@nox.session
def train(session: nox.Session) -> None:
    """One short epoch of every tiny model on the synthetic images (CPU, or the GPU where present).

    Each model's run goes to runs/train/<model> (or the directory given as the argument), replaced on each run.
    """
    install(session)
    names = str(
        session.run("python", "-c", "from attnbench import models; print(*models.available())", silent=True, log=False)
    )
    device = "cuda" if has_cuda(session) else "cpu"
    out = session.posargs[0] if session.posargs else "runs/train"
    for name in names.split():
        shutil.rmtree(f"{out}/{name}", ignore_errors=True)  # this session's own run of the model, replaced
        session.run(
            "attnbench", "train", "--model", name, "--tiny", "--device", device, "--epochs", "1",
            "--train-size", "64", "--val-size", "32", "--batch", "16", "--out", f"{out}/{name}",
        )  # fmt: skip


@nox.session
def quick(session: nox.Session) -> None:
    """The main job: every mechanism at 16x16..64x64 on the CPU (the quick preset), then its HTML report."""
    install(session)
    out = session.posargs[0] if session.posargs else "runs/quick"
    session.run("attnbench", "sweep", "--preset", "quick", "--out", out)
    session.run("attnbench", "report", out, "--out", f"{out}/report.html")
    session.log(f"report written to {out}/report.html")


@nox.session
def noise(session: nox.Session) -> None:
    """Two sweeps of NOISE_PRESET on unchanged code, compared (prints the conclusive regressions); then a third
    with tests/bench/slowdown.py making NOISE_SLOWED 2x slower, which must be flagged at its every point only."""
    install(session)
    out = session.posargs[0] if session.posargs else "runs/noise"
    shutil.rmtree(out, ignore_errors=True)  # this session's own runs, replaced
    for name in ("a", "b"):
        session.run("attnbench", "sweep", "--preset", NOISE_PRESET, "--out", f"{out}/{name}")
    session.run("python", ".ci/noise_check.py", f"{out}/a", f"{out}/b")
    slowed = {"ATTNBENCH_PLUGINS": "slowdown", "ATTNBENCH_SLOWDOWN": NOISE_SLOWED, "PYTHONPATH": "tests/bench"}
    session.run("attnbench", "sweep", "--preset", NOISE_PRESET, "--out", f"{out}/slowed", env=slowed)
    session.run("python", ".ci/noise_check.py", f"{out}/a", f"{out}/slowed", "--slowed", NOISE_SLOWED)


@nox.session
def docs(session: nox.Session) -> None:
    """The reference pages regenerated and compared with docs/reference (scripts/gen_docs.py --check), then the
    site built with mkdocs --strict: a broken link, a missing anchor or a page outside the nav fails it."""
    install(session, "docs")
    session.run("python", "scripts/gen_docs.py", "--check")
    session.run("mkdocs", "build", "--strict", "--site-dir", os.path.join(session.create_tmp(), "site"))
