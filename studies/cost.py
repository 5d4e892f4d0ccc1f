"""How studies measure cost: the harness's one function (``bench.measure.measure_module``) with the
sweep's settings, and with less timing per round in smoke mode."""

from __future__ import annotations

from attnbench.bench.measure import Settings


def cost_settings(smoke: bool, threads: int | None = None) -> Settings:
    """Settings of a study's cost rows: rounds between calibration probes, contended slots taken again,
    samples stored, as a sweep's points; ``threads`` as the study runs (None: the process's)."""
    if smoke:
        return Settings(timeout_s=30.0, cpu_min_run_time=0.03, min_samples=3, count_flops=False, threads=threads)
    return Settings(timeout_s=120.0, count_flops=False, threads=threads)
