"""The QuadTree Triton kernel against the PyTorch reference: outputs, gradients, dtypes, compile, counting.

On the CPU the kernels run in Triton's interpreter, which must be switched on
before triton is imported: run with ``TRITON_INTERPRET=1`` (the nox ``tests``
session does). With CUDA the same tests run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from attnbench.attentions.quadtree import refine_reference
from attnbench.attentions.testing import assert_parity, rel_error

from attnbench import attentions

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="the triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is imported",
)
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative L2 error of the kernel against the float32 reference on the same rounded inputs.
LEVEL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def kernel():
    from attnbench.attentions.kernels import quadtree

    return quadtree


def level_inputs(b, h, p, m, d, c, dtype, seed=0):
    """One fine level: children queries (B, h, P, 4, d), keys/values (B, h, M, d), candidates (B, h, P, C)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, p, 4, d, generator=gen)
    k = torch.randn(b, h, m, d, generator=gen)
    v = torch.randn(b, h, m, d, generator=gen)
    # distinct candidates per parent, as the children of distinct keys are
    idx = torch.stack([torch.randperm(m, generator=gen)[:c] for _ in range(b * h * p)]).view(b, h, p, c)
    q, k, v = (t.to(DEVICE, dtype).requires_grad_(True) for t in (q, k, v))
    return q, k, v, idx.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("p", "m", "d", "c", "keep"),
    [(15, 60, 16, 4, 0), (15, 60, 16, 12, 2), (24, 96, 32, 32, 8), (6, 40, 8, 36, 5)],
    ids=["K1", "K3-keep2", "K8-keep8", "K9-d8"],
)
def test_refine_level_matches_reference(dtype, p, m, d, c, keep):
    q, k, v, idx = level_inputs(2, 2, p, m, d, c, dtype)
    out, none, sel = kernel().refine(q, k, v, idx, None, keep)
    assert none is None and out.dtype == dtype and out.shape == q.shape
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (out.float() * grad).sum().backward()
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref, _, ref_sel = refine_reference(*ref_in, idx, None, keep)
    (ref * grad).sum().backward()
    tol = LEVEL_TOL[dtype]
    assert rel_error(out, ref) <= tol
    for name, got, want in zip("qkv", (q, k, v), ref_in, strict=True):
        assert got.grad is not None and got.grad.dtype == dtype
        assert rel_error(got.grad, want.grad) <= tol, f"grad {name}"
    if keep:
        assert sel.shape == (*q.shape[:4], keep)
        # the same candidates, as sets (their order among equals may differ)
        same = (sel.sort(-1).values == ref_sel.sort(-1).values).all(-1).float().mean().item()
        assert same == 1.0 if dtype == torch.float32 else same > 0.9
    else:
        assert sel is None and ref_sel is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("p", "m", "d", "kp", "keep"), [(15, 60, 16, 3, 0), (24, 96, 32, 8, 6)], ids=["K3", "K8-keep6"]
)
def test_refine_level_a_matches_reference(dtype, p, m, d, kp, keep):
    # QuadTree-A: softmax over each key's 4 children times the parent score; kept candidates leave the message
    q, k, v, idx = level_inputs(2, 2, p, m, d, 4 * kp, dtype)
    parent = torch.rand(2, 2, p, kp, generator=torch.Generator().manual_seed(2)).to(DEVICE).requires_grad_(True)
    out, score, sel = kernel().refine(q, k, v, idx, parent, keep)
    gen = torch.Generator().manual_seed(1)
    loss = (out.float() * torch.randn(out.shape, generator=gen).to(DEVICE)).sum()
    if keep:
        loss = loss + (score.float() * torch.randn(score.shape, generator=gen).to(DEVICE)).sum()
    loss.backward()
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v, parent)]
    ref, ref_score, ref_sel = refine_reference(*ref_in[:3], idx, ref_in[3], keep)
    gen = torch.Generator().manual_seed(1)
    ref_loss = (ref * torch.randn(out.shape, generator=gen).to(DEVICE)).sum()
    if keep:
        ref_loss = ref_loss + (ref_score * torch.randn(score.shape, generator=gen).to(DEVICE)).sum()
    ref_loss.backward()
    tol = LEVEL_TOL[dtype]
    assert rel_error(out, ref) <= tol
    for name, got, want in zip(("q", "k", "v", "parent_score"), (q, k, v, parent), ref_in, strict=True):
        assert rel_error(got.grad, want.grad) <= tol, f"grad {name}"
    if keep:
        assert rel_error(score, ref_score) <= tol
        if dtype == torch.float32:
            assert torch.equal(sel, ref_sel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["B", "A"])
def test_the_gpu_tiling_of_four_parents_matches_reference(dtype, variant, monkeypatch):
    # the interpreter's programs own 16 parents; a GPU's own 4 (16 queries): the tiling the GPU runs, here
    monkeypatch.setattr(kernel(), "BLOCK_P", 4)
    q, k, v, idx = level_inputs(2, 2, 11, 60, 16, 12, dtype)  # 11 parents: a partial last program
    parent = torch.rand(2, 2, 11, 3, generator=torch.Generator().manual_seed(2)).to(DEVICE) if variant == "A" else None
    out, _, sel = kernel().refine(q, k, v, idx, parent, 2)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (out.float() * grad).sum().backward()
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref, _, ref_sel = refine_reference(*ref_in, idx, parent, 2)
    (ref * grad).sum().backward()
    tol = LEVEL_TOL[dtype]
    assert rel_error(out, ref) <= tol
    for name, got, want in zip("qkv", (q, k, v), ref_in, strict=True):
        assert rel_error(got.grad, want.grad) <= tol, f"grad {name}"
    if dtype == torch.float32:
        assert torch.equal(sel.sort(-1).values, ref_sel.sort(-1).values)


def test_refine_with_repeated_candidates_sums_their_gradients():
    # every parent names key 0 twice: the kernel's atomics must add both contributions
    q, k, v, idx = level_inputs(1, 1, 4, 8, 8, 4, torch.float32)
    idx[..., 1] = idx[..., 0] = 0
    out, _, _ = kernel().refine(q, k, v, idx, None, 0)
    out.square().sum().backward()
    ref_in = [t.detach().requires_grad_(True) for t in (q, k, v)]
    ref, _, _ = refine_reference(*ref_in, idx, None, 0)
    ref.square().sum().backward()
    assert rel_error(out, ref) < 1e-5
    assert rel_error(k.grad, ref_in[1].grad) < 1e-5 and rel_error(v.grad, ref_in[2].grad) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_candidates_covering_every_key_are_full_attention(dtype):
    # the finest level with every key a candidate of every parent: exactly softmax attention over all keys
    b, h, p, m, d = 2, 2, 6, 16, 16
    q, k, v, idx = level_inputs(b, h, p, m, d, m, dtype)
    out, _, _ = kernel().refine(q, k, v, idx, None, 0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (out.float() * grad).sum().backward()
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    full = torch.nn.functional.scaled_dot_product_attention(ref_in[0].flatten(2, 3), *ref_in[1:])  # (B, h, 4P, d)
    (full.view(out.shape) * grad).sum().backward()
    tol = LEVEL_TOL[dtype]
    assert rel_error(out, full.view(out.shape)) <= tol
    for name, got, want in zip("qkv", (q, k, v), ref_in, strict=True):
        assert rel_error(got.grad, want.grad) <= tol, f"grad {name}"


def test_strided_inputs_are_read_in_place():
    # q, k, v as the module makes them (heads split from (B, N, h*d) and children grouped): no copy, same result
    q, k, v, idx = level_inputs(2, 3, 5, 40, 16, 12, torch.float32)
    ks = k.detach().transpose(1, 2).contiguous().transpose(1, 2)  # (B, h, M, d) with the strides of split_heads
    vs = v.detach().transpose(1, 2).contiguous().transpose(1, 2)
    qs = q.detach().transpose(2, 3).contiguous().transpose(2, 3)  # (B, h, P, 4, d), children outside parents
    assert not (ks.is_contiguous() or qs.is_contiguous())
    args = kernel()._common(qs, ks, vs, idx)
    assert args["k"].data_ptr() == ks.data_ptr() and args["q"].data_ptr() == qs.data_ptr()
    out, _, sel = kernel().refine(qs, ks, vs, idx, None, 3)
    ref, _, ref_sel = refine_reference(q.detach(), k.detach(), v.detach(), idx, None, 3)
    assert rel_error(out, ref) <= 1e-5 and torch.equal(sel.sort(-1).values, ref_sel.sort(-1).values)


def test_many_candidates_select_outside_the_kernel():
    # more candidates than the fused top-K handles: scores once more, torch.topk picks; same sets as the reference
    c = kernel().FUSED_TOPK_MAX_C + 16
    q, k, v, idx = level_inputs(1, 2, 3, 120, 16, c, torch.float32)
    out, _, sel = kernel().refine(q, k, v, idx, None, 5)
    ref, _, ref_sel = refine_reference(q.detach(), k.detach(), v.detach(), idx, None, 5)
    assert rel_error(out, ref) <= 1e-5 and torch.equal(sel.sort(-1).values, ref_sel.sort(-1).values)


# ---------------------------------------------------------------------- the whole mechanism
CASES = [
    ((8, 12), dict(levels=2, topk=2), False),
    ((16, 24), dict(levels=3, topk=(4, 3, 3)), True),
    ((12, 20), dict(levels=3, topk=(8, 8, 8)), False),
    ((16, 8), dict(levels=4, topk=1), False),
    ((8, 12), dict(variant="A", levels=2, topk=4), False),
    ((16, 24), dict(variant="A", levels=3, topk=(4, 3, 3)), True),
]


@pytest.mark.parametrize(
    ("hw", "knobs", "cross"), CASES, ids=[f"{h}x{w}-{k}-{'cross' if c else 'self'}" for (h, w), k, c in CASES]
)
def test_module_float32_matches_reference(hw, knobs, cross):
    torch.manual_seed(0)
    module = attentions.build("quadtree", dim=32, heads=2, **knobs)
    context_hw = (hw[0], 2 * hw[1]) if cross else None
    module.impl = "triton"
    assert not module.unsupported(2, hw, context_hw, dtype=torch.float32, device=DEVICE)
    args = module.example_inputs(2, hw, cross=cross, context_hw=context_hw, device=DEVICE)
    assert_parity(module.to(DEVICE), "triton", torch.float32, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("variant", "levels"), [("B", 3), ("A", 3)])
def test_module_low_precision_matches_reference(dtype, variant, levels):
    # top-K covering every candidate: no near-tie can flip a selection in low precision
    torch.manual_seed(0)
    hw = (8, 12)
    module = attentions.build("quadtree", dim=32, heads=2, variant=variant, levels=levels)
    module = attentions.build("quadtree", dim=32, heads=2, variant=variant, levels=levels, **module.tie_free_knobs(hw))
    args = module.example_inputs(2, hw, device=DEVICE)
    assert_parity(module.to(DEVICE), "triton", dtype, args)


def test_values_conv_and_lepe():
    torch.manual_seed(0)
    module = attentions.build("quadtree", dim=32, heads=2, levels=2, topk=3, values="conv", lepe=True)
    args = module.example_inputs(1, (8, 8), device=DEVICE)
    assert_parity(module.to(DEVICE), "triton", torch.float32, args)


# ---------------------------------------------------------------------- the op
def test_custom_ops_pass_opcheck():
    kernel()  # registers the ops
    q, k, v, idx = level_inputs(1, 2, 3, 12, 8, 8, torch.float32)
    w = torch.rand(1, 2, 3, 4, 8, device=DEVICE, requires_grad=True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    ops = torch.ops.attnbench
    torch.library.opcheck(ops.quadtree_refine.default, (q, k, v, idx, 2), test_utils=checks)
    torch.library.opcheck(ops.quadtree_scores.default, (q, k, idx), test_utils=checks)
    torch.library.opcheck(ops.quadtree_aggregate.default, (w, v, idx), test_utils=checks)


def test_fake_implementation_gives_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernel()
    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 4, 16, dtype=torch.bfloat16)
        k = torch.empty(2, 3, 40, 16, dtype=torch.bfloat16)
        idx = torch.empty(2, 3, 5, 12, dtype=torch.long)
        out, lse, top = torch.ops.attnbench.quadtree_refine(q, k, k, idx, 3)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 5, 4) and lse.dtype == torch.float32
        assert top.shape == (2, 3, 5, 4, 3) and top.dtype == torch.int64
        dq, dk, dv = torch.ops.attnbench.quadtree_refine_backward(out, q, k, k, idx, out, lse)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


def test_works_under_torch_compile():
    torch.manual_seed(0)
    module = attentions.build("quadtree", dim=32, heads=2, levels=2, topk=2, impl="triton").to(DEVICE)
    x, hw = module.example_inputs(1, (8, 12), device=DEVICE)
    expected = module(x, hw)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=False)
    x = x.detach().requires_grad_(True)
    out = compiled(x, hw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_flops_counted_by_both_counters_and_backward_by_its_rule():
    from attnbench.bench import flops

    torch.manual_seed(0)
    module = attentions.build("quadtree", dim=32, heads=2, levels=2, topk=2, impl="triton").to(DEVICE)
    args = module.example_inputs(1, (8, 12), device=DEVICE)
    assert not module.unsupported(1, (8, 12), device=DEVICE)
    result = flops.count(module, args)
    assert result.complete and result.flop_counter_uncovered == {}
    assert result.macs == result.analytic_macs == result.flop_counter_macs
    assert "attnbench::quadtree_refine" in result.by_op
    pairs = 2 * 8 * 12 * 4 * 2  # heads * queries * 4K candidates
    assert result.by_op["attnbench::quadtree_refine"] == pairs * 2 * 16
    assert result.backward_uncovered == {}
    fast = flops.count(attentions.build("quadtree", dim=32, heads=2, levels=2, topk=2, impl="fast").to(DEVICE), args)
    assert result.macs == fast.macs  # the kernel computes the pairs the PyTorch path does
    module = attentions.build("quadtree", dim=32, heads=2, variant="A", levels=2, topk=2, impl="triton").to(DEVICE)
    result = flops.count(module, args)
    assert result.complete and result.flop_counter_uncovered == {} and result.backward_uncovered == {}
    assert result.macs == result.analytic_macs == result.flop_counter_macs
    assert result.by_op["attnbench::quadtree_scores"] == result.by_op["attnbench::quadtree_aggregate"] == pairs * 16


# ---------------------------------------------------------------------- refusals
def test_refusals_name_the_fix(monkeypatch):
    module = attentions.build("quadtree", dim=32, heads=2, impl="triton")
    assert "float32, float16 or bfloat16" in module.unsupported(1, (8, 8), dtype=torch.float64)[0]
    monkeypatch.setattr(kernel(), "INTERPRET", False)
    reason = module.unsupported(1, (8, 8), device="cpu")[0]  # the impl's needs come before the map's
    assert "TRITON_INTERPRET=1" in reason and "CUDA" in reason
    with pytest.raises(attentions.UnsupportedPoint, match="TRITON_INTERPRET"):
        module(*module.example_inputs(1, (8, 8)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_large_level_matches_reference(dtype):
    q, k, v, idx = level_inputs(2, 4, 1024, 4096, 64, 32, dtype)
    out, _, sel = kernel().refine(q, k, v, idx, None, 8)
    out.float().square().sum().backward()
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref, _, _ = refine_reference(*ref_in, idx, None, 8)
    ref.square().sum().backward()
    tol = LEVEL_TOL[dtype]
    assert rel_error(out, ref) <= tol
    assert all(rel_error(a.grad, b.grad) <= 2 * tol for a, b in zip((q, k, v), ref_in, strict=True))
