"""Reports: results -> a self-contained interactive HTML page, summary tables and run comparisons.

Reads run directories with pandas only (never torch), so a report renders anywhere.
"""

from __future__ import annotations

from attnbench.reports.analysis import (
    DEFAULT_BASELINE,
    Baseline,
    BaselineError,
    crossover,
    fit_exponent,
    format_table,
    reference,
    references,
    resolve_baseline,
    summary_table,
)
from attnbench.reports.compare import Comparison, FingerprintMismatch, compare, fingerprint_differences
from attnbench.reports.data import Run, RunError, load_run, tidy
from attnbench.reports.page import build_compare_page, build_report

__all__ = [
    "DEFAULT_BASELINE",
    "Baseline",
    "BaselineError",
    "Comparison",
    "FingerprintMismatch",
    "Run",
    "RunError",
    "build_compare_page",
    "build_report",
    "compare",
    "crossover",
    "fingerprint_differences",
    "fit_exponent",
    "format_table",
    "load_run",
    "reference",
    "references",
    "resolve_baseline",
    "summary_table",
    "summary_of",
    "tidy",
]


def summary_of(runs: list[Run], baseline: str | Baseline = DEFAULT_BASELINE):  # noqa: ANN201 - a DataFrame
    """The summary table of ``runs`` at their reference point (what ``--format md|csv`` prints)."""
    df = tidy(runs)
    base = resolve_baseline(df, baseline)
    return summary_table(df, references(df, base), base)
