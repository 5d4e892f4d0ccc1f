"""Kernel quality without a GPU: every Triton kernel of attnbench compiled offline, its resources read.

``attnbench kernels --target sm_90a`` compiles each kernel, in every autotuning
configuration, for a GPU target with triton's compile API (``ASTSource`` and a
``GPUTarget``) and the ptxas bundled in triton's wheel, at the shapes of the
``scaling`` preset (dim 128 in 4 heads: head dim 32; top-K 8: 32 candidates).
Per kernel and configuration it reports registers, spill bytes (``ptxas -v``),
shared memory (triton's metadata), tensor-core instructions in the PTX
(``mma.sync`` / ``wgmma``) and vectorised global loads (``ld.global.v2``/``.v4``,
and 8- or 16-byte ``cp.async`` copies into shared memory, which is how triton
pipelines the loads that feed a dot).

Pointers are compiled as 16-byte aligned, as torch's allocations are; integer
arguments get no divisibility hint, so vectorisation must come from the kernel
itself (head dim constexpr, strides in its units). Needs triton's CUDA backend
but no GPU and no driver; must run without ``TRITON_INTERPRET=1`` (the
interpreter replaces the compiled kernels).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from typing import Any

TARGETS = {"sm_90a": 90, "sm_80": 80}
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# The scaling preset: dim 128 in 4 heads, quadtree's default top-K 8 (4K = 32 candidates per parent).
SCALING = {"head_dim": 32, "topk": 8}


@dataclasses.dataclass
class Row:
    kernel: str
    variant: str  # what the kernel computes in this build (e.g. "keep=8")
    dtype: str
    head_dim: int
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # spill stores + spill loads per thread
    stack_bytes: int
    shared_bytes: int
    dot: bool  # the kernel multiplies tiles (tl.dot): it must use tensor cores
    mma: int  # mma.sync instructions in the PTX
    wgmma: int  # wgmma.mma_async instructions in the PTX
    global_loads: int  # ld.global and cp.async (global to shared) instructions in the PTX
    vector_loads: int  # of which 8 or 16 bytes wide: ld.global.v2 / .v4, cp.async of 0x8 / 0x10

    @property
    def tensor_cores(self) -> bool:
        return self.mma + self.wgmma > 0


def _kernels(head_dim: int, topk: int, dtype: str) -> list[tuple[Any, str, dict[str, str], dict[str, Any]]]:
    """(kernel, variant, pointer dtypes, constexprs) of every build the QuadTree path launches."""
    import torch

    from . import quadtree as qt

    c = 4 * topk
    t = DTYPES[dtype]
    common = dict(C=c, HEAD_DIM=head_dim, BLOCK_D=qt.block_d(head_dim), SMALL=True, PARENTS=4)
    common["PRECISION"] = "tf32" if dtype == "float32" else "ieee"
    fwd_ptrs = dict(Q=t, K=t, V=t, IDX="i64", O=t, LSE="fp32", TOP="i64")
    bwd_ptrs = dict(Q=t, K=t, V=t, IDX="i64", O=t, DO=t, LSE="fp32", DQ=t, DK="fp32", DV="fp32")
    builds = [
        (qt._refine_fwd, f"keep={topk}", fwd_ptrs, dict(common, BLOCK_C=qt.block_c(c, topk), KEEP=topk)),
        (qt._refine_fwd, "finest", fwd_ptrs, dict(common, BLOCK_C=qt.block_c(c), KEEP=0)),
        (qt._refine_bwd, "", bwd_ptrs, dict(common, BLOCK_C=qt.bwd_block_c(c, getattr(torch, dtype)))),
        (qt._gather_dot, "", dict(X=t, T=t, IDX="i64", OUT="fp32"), dict(common, BLOCK_C=qt.block_c(c))),
        (qt._gather_sum, "", dict(W="fp32", T=t, IDX="i64", OUT=t), dict(common, BLOCK_C=qt.block_c(c))),
        (qt._scatter_outer, "", dict(W="fp32", X=t, IDX="i64", G="fp32"), dict(common, BLOCK_C=qt.block_c(c))),
    ]
    return builds


def _source(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any]) -> Any:
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def ptxas_info(ptx: str, arch: str) -> dict[str, int]:
    """Registers, spill and stack bytes from ``ptxas -v`` (the ptxas of triton's wheel) on ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    if not (regs and spill and stack):
        raise RuntimeError(f"cannot read ptxas -v output:\n{text}")
    return {
        "registers": int(regs.group(1)),
        "spill_bytes": int(spill.group(1)) + int(spill.group(2)),
        "stack_bytes": int(stack.group(1)),
    }


def analyse(target: str, dtypes: Iterable[str] = tuple(DTYPES), configs: Iterable[tuple[int, int]] | None = None):
    """Compile every kernel for ``target`` ("sm_90a", "sm_80") and read its resources: a list of :class:`Row`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("attnbench kernels compiles for a GPU: run it without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget

    from . import quadtree as qt

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
    gpu = GPUTarget("cuda", TARGETS[target], 32)
    rows = []
    for dtype in dtypes:
        for fn, variant, pointers, constexprs in _kernels(SCALING["head_dim"], SCALING["topk"], dtype):
            for warps, stages in configs or qt.CONFIGS:
                compiled = triton.compile(
                    _source(fn, pointers, constexprs), target=gpu, options={"num_warps": warps, "num_stages": stages}
                )
                ptx = compiled.asm["ptx"]
                info = ptxas_info(ptx, target)
                loads = re.findall(r"ld\.global[\w.]*|cp\.async\.\w+\.shared\.global.*?, 0x\d+", ptx)
                rows.append(
                    Row(
                        kernel=fn.__name__,
                        variant=variant,
                        dtype=dtype,
                        head_dim=SCALING["head_dim"],
                        num_warps=warps,
                        num_stages=stages,
                        shared_bytes=int(compiled.metadata.shared),
                        dot="tl.dot" in fn.src or "_dot(" in fn.src,
                        mma=len(re.findall(r"\bmma\.sync", ptx)),
                        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                        global_loads=len(loads),
                        vector_loads=sum(1 for ld in loads if re.search(r"\.v[24]\b|0x(8|10)$", ld)),
                        **info,
                    )
                )
    return rows


def problems(rows: list[Row]) -> list[str]:
    """What the kernel-quality check refuses: any spill, a dot kernel without tensor cores, no vectorised load."""
    out = []
    for r in rows:
        name = f"{r.kernel}[{r.variant or '-'}, {r.dtype}, warps={r.num_warps}, stages={r.num_stages}]"
        if r.spill_bytes:
            out.append(f"{name} spills {r.spill_bytes} B per thread at {r.registers} registers")
        if r.dot and not r.tensor_cores:
            out.append(f"{name} multiplies tiles without tensor-core instructions (no mma/wgmma in its PTX)")
        if not r.vector_loads:
            out.append(f"{name} has no vectorised global load")
    return out


def as_json(target: str, rows: list[Row]) -> dict[str, Any]:
    import triton

    return {
        "target": target,
        "triton": triton.__version__,
        "shapes": dict(SCALING, preset="scaling"),
        "rows": [dict(dataclasses.asdict(r), tensor_cores=r.tensor_cores) for r in rows],
        "problems": problems(rows),
    }


def as_markdown(target: str, rows: list[Row]) -> str:
    import triton

    lines = [
        f"# Triton kernels compiled for {target} (triton {triton.__version__}, offline, ptxas from triton's wheel)",
        "",
        f"Shapes of the scaling preset: head dim {SCALING['head_dim']}, top-K {SCALING['topk']} "
        f"({4 * SCALING['topk']} candidates per parent). Written by `attnbench kernels --target {target} --out DIR`.",
        "",
        "| kernel | variant | dtype | warps | stages | registers | spill B | shared B | mma | wgmma "
        "| vector loads / global loads |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.variant or '-'} | {r.dtype} | {r.num_warps} | {r.num_stages} | {r.registers} "
            f"| {r.spill_bytes} | {r.shared_bytes} | {r.mma} | {r.wgmma} | {r.vector_loads} / {r.global_loads} |"
        )
    found = problems(rows)
    lines += ["", "Problems: " + ("none" if not found else "; ".join(found)), ""]
    return "\n".join(lines)
