"""nox sessions for attnbench: what CI and users run.

Every session that needs torch installs it first from ATTNBENCH_TORCH (default
``torch==2.13.0``, the CPU build), so a GPU user can choose theirs, e.g.
``ATTNBENCH_TORCH="torch==2.9.1" nox -s gpu``. Virtualenvs are reused.
"""

from __future__ import annotations

import os

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint"]

TORCH = os.environ.get("ATTNBENCH_TORCH", "torch==2.13.0")
PACKAGES = ["attentions", "bench", "reports", "models", "cli.py", "noxfile.py", "tests"]


def install(session: nox.Session, extras: str = "dev") -> None:
    """torch first (so the override wins), then the project with its extras."""
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test-suite (what .ci/run runs); GPU tests skip without CUDA."""
    install(session)
    session.run("pytest", "-q", *session.posargs, env={"TRITON_INTERPRET": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", *PACKAGES)
    session.run("ruff", "format", "--check", *PACKAGES)


@nox.session
def quick(session: nox.Session) -> None:
    """The main job: a quick sweep of every mechanism on the CPU, then its HTML report."""
    install(session)
    out = session.posargs[0] if session.posargs else "runs/quick"
    session.run("attnbench", "sweep", "--preset", "quick", "--out", out, "--resume")
    session.run("attnbench", "report", out, "--out", f"{out}/report.html")
    session.log(f"report written to {out}/report.html")
