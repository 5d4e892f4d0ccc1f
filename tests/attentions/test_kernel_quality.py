"""Kernel quality without a GPU: every Triton kernel compiled offline for Hopper, no spill, tensor cores in dots.

Runs ``attnbench kernels`` in a subprocess without ``TRITON_INTERPRET`` (the
interpreter replaces compiled kernels), with triton's CUDA backend and the
ptxas of its wheel; no GPU or driver needed. Also checks the committed tables
(results/kernels/*.json) say the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("triton.backends.nvidia.compiler", reason="needs triton's CUDA backend (ptxas in its wheel)")


def _check_rows(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        name = f"{r['kernel']}[{r['variant']}, {r['dtype']}, {r['num_warps']} warps, {r['num_stages']} stages]"
        assert r["spill_bytes"] == 0, f"{name} spills {r['spill_bytes']} B at {r['registers']} registers"
        assert not r["dot"] or r["mma"] + r["wgmma"] > 0, f"{name}: a dot kernel without tensor-core instructions"
        assert r["vector_loads"] > 0, f"{name}: no vectorised global load"


def test_every_kernel_compiles_for_sm90a_without_spills_and_with_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "attnbench", "kernels", "--target", "sm_90a", "--dtype", "bfloat16"]
    cmd += ["--dtype", "float32", "--json", "--check"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["target"] == "sm_90a" and report["problems"] == []
    assert report["triton"] == __import__("triton").__version__  # the triton this test runs under
    _check_rows(report["rows"])
    kernels = {r["kernel"] for r in report["rows"]}
    assert kernels == {"_refine_fwd", "_refine_bwd", "_gather_dot", "_gather_sum", "_scatter_outer"}


@pytest.mark.parametrize("target", ["sm_90a", "sm_80"])
def test_committed_tables_have_no_spill(target):
    report = json.loads((REPO / "results" / "kernels" / f"{target}.json").read_text())
    assert report["target"] == target and report["problems"] == []
    _check_rows(report["rows"])
    assert {r["dtype"] for r in report["rows"]} == {"bfloat16", "float16", "float32"}
