"""Parity checks of a fast path against the float32 reference.

Used by the test-suite and by kernel authors: ``parity(module, impl, dtype, args)``
runs the module's ``reference`` implementation in float32 and ``impl`` in
``dtype`` on copies of the same weights and inputs, and returns the relative
L2 error of the output and of every input and parameter gradient.
"""

from __future__ import annotations

import copy

import torch

from .base import Attention

# Relative L2 error allowed against the float32 reference, per dtype of the fast
# path. Outputs are held tighter than gradients: a parameter's gradient is a
# reduction over every token (B*N terms), each rounded to the dtype's mantissa
# (bf16: 8 bits, eps 7.8e-3), and LayerNorm-weight gradients in bf16 land at
# 2-4e-2 on random seeds.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
# Low-precision bound for the gradients a mechanism declares in ``cancelling_grads``
# (checked at TOLERANCE in float32 like every other gradient).
CANCELLING_TOLERANCE = 0.25
OUTPUT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 1e-2,
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def _cast_args(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(
        a.detach().to(dtype).requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )


def outputs_and_grads(module: Attention, args: tuple, seed: int = 0) -> dict[str, torch.Tensor]:
    """Output and gradients of a fixed random projection of it, by name."""
    module.zero_grad(set_to_none=True)
    out = module(*args)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    (out.float() * weight).sum().backward()
    found = {"output": out}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.grad is not None:
            found[f"grad input[{i}]"] = a.grad
    for name, p in module.named_parameters():
        if p.grad is not None:
            found[f"grad {name}"] = p.grad
    return found


def parity(module: Attention, impl: str, dtype: torch.dtype, args: tuple) -> dict[str, float]:
    """Relative errors of ``impl`` in ``dtype`` against the float32 reference.

    Both paths see the same values: weights and inputs are rounded to ``dtype``
    first and the reference runs on their float32 upcast, so the error measured
    is the implementation's, not the rounding of its inputs.
    """
    fast = copy.deepcopy(module).to(dtype)
    fast.impl = impl
    ref = copy.deepcopy(fast).float()
    ref.impl = "reference"
    rounded = _cast_args(args, dtype)
    expected = outputs_and_grads(ref, _cast_args(rounded, torch.float32))
    actual = outputs_and_grads(fast, rounded)
    missing = sorted(set(expected) ^ set(actual))
    if missing:
        raise AssertionError(f"gradients present in only one path: {missing}")
    return {name: rel_error(actual[name], expected[name]) for name in expected}


def assert_parity(module: Attention, impl: str, dtype: torch.dtype, args: tuple, tol: float | None = None) -> None:
    tol = TOLERANCE[dtype] if tol is None else tol
    out_tol = min(tol, OUTPUT_TOLERANCE[dtype])
    errors = parity(module, impl, dtype, args)
    low = dtype in (torch.float16, torch.bfloat16)
    loose = {f"grad {p}" for p in module.cancelling_grads} if low else set()

    def bound(key: str) -> float:
        return out_tol if key == "output" else max(tol, CANCELLING_TOLERANCE) if key in loose else tol

    bad = {k: v for k, v in errors.items() if not v <= bound(k)}
    if bad:
        worst = ", ".join(f"{k}: {v:.2e}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:6])
        raise AssertionError(
            f"{module.name} impl={impl} {dtype} differs from the float32 reference (tol {tol:.0e}): {worst}"
        )
