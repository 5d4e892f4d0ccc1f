"""QuadTree attention: equivalences, selection, cost and refusals."""

from __future__ import annotations

import pytest
import torch
from attnbench.attentions.common import attend
from attnbench.attentions.quadtree import refine, refine_reference
from attnbench.attentions.testing import assert_parity

from attnbench import attentions

DIM, HEADS = 16, 2
IMPLS = ["reference", "fast"]


MECHANISM = "quadtree"
BUILD = dict(dim=DIM, heads=HEADS, impl="reference")


def inputs(module, hw, context_hw=None, batch=1, seed=0):
    return module.example_inputs(batch, hw, cross=context_hw is not None, context_hw=context_hw, seed=seed)


def full_twin(module) -> attentions.Attention:
    """Full attention with the quadtree module's projections."""
    full = attentions.build("full", dim=DIM, heads=HEADS, impl="reference")
    full.proj.load_state_dict(module.proj.state_dict())
    return full


# ---------------------------------------------------------------------- brute force
def brute_force(pyr, variant: str, topks: tuple[int, ...]):
    """Selections and messages of every level, one query and head at a time.

    Written from the definition, independently of the module's gathers: a
    query's candidates at level l are the 4 children of every key its parent
    selected at level l - 1 (all keys at level 0); QuadTree-B takes a softmax
    over them, QuadTree-A a softmax over each key's 4 children times that key's
    score; both keep the ``topk[l]`` best by score, and A leaves them out of the
    message at every level but the finest.
    """
    levels = len(pyr.queries)
    b_, h_, _, d = pyr.queries[0].shape
    scale = d**-0.5
    selected = [torch.zeros(b_, h_, pyr.queries[lv].shape[2], topks[lv], dtype=torch.long) for lv in range(levels - 1)]
    messages = [torch.zeros_like(q) for q in pyr.queries]
    for b in range(b_):
        for h in range(h_):
            prev: dict[int, list[tuple[int, float]]] = {}
            for lv in range(levels):
                q, k, v = pyr.queries[lv][b, h], pyr.keys[lv][b, h], pyr.values[lv][b, h]
                qh, qw = pyr.q_hw[lv]
                kw = pyr.k_hw[lv][1]
                cur: dict[int, list[tuple[int, float]]] = {}
                for n in range(qh * qw):
                    if lv == 0:
                        cand = list(range(k.shape[0]))
                        s = torch.stack([q[n] @ k[j] for j in cand]) * scale
                        p = torch.softmax(s, 0)
                    else:
                        y, x = divmod(n, qw)
                        parent = (y // 2) * (qw // 2) + x // 2
                        cand, groups = [], []
                        for j, pj in prev[parent]:
                            jy, jx = divmod(j, kw // 2)
                            kids = [(2 * jy + a) * kw + 2 * jx + c for a in (0, 1) for c in (0, 1)]
                            cand += kids
                            groups.append((kids, pj))
                        s = torch.stack([q[n] @ k[j] for j in cand]) * scale
                        if variant == "B":
                            p = torch.softmax(s, 0)
                        else:
                            p = torch.cat(
                                [torch.softmax(s[4 * i : 4 * i + 4], 0) * pj for i, (_, pj) in enumerate(groups)]
                            )
                    order = sorted(range(len(cand)), key=lambda i: -float(p[i]))
                    keep = order[: topks[lv]] if lv < levels - 1 else []
                    cur[n] = [(cand[i], p[i]) for i in keep]
                    if keep:
                        selected[lv][b, h, n] = torch.tensor(sorted(cand[i] for i in keep))
                    drop = set(keep) if variant == "A" else set()
                    messages[lv][b, h, n] = sum(p[i] * v[cand[i]] for i in range(len(cand)) if i not in drop)
                prev = cur
    return selected, messages


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("variant", "hw", "context_hw", "topk"),
    [
        ("B", (8, 8), None, 3),
        ("A", (8, 8), None, 3),
        ("B", (8, 12), (12, 8), (5, 3, 2)),  # cross attention, context of another size
        ("A", (8, 12), (12, 8), (5, 3, 2)),
    ],
)
def test_selection_and_messages_match_brute_force(build, impl, variant, hw, context_hw, topk):
    """Each query keeps exactly its true top-K, and each level's message is its definition."""
    module = build(impl=impl, variant=variant, levels=3, topk=topk)
    args = inputs(module, hw, context_hw, seed=1)
    with torch.no_grad():
        pyr = module.pyramid(*args)
    selected, messages = brute_force(pyr, variant, module.topks())
    assert len(pyr.selected) == 2
    for lv, (got, want) in enumerate(zip(pyr.selected, selected, strict=True)):
        assert got.shape == want.shape, f"level {lv}"
        assert torch.equal(got.sort(-1).values, want), f"level {lv}: a query did not keep its true top-K"
    for lv, (got, want) in enumerate(zip(pyr.messages, messages, strict=True)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"message of level {lv}")


# ---------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("hw", "context_hw"), [((8, 8), None), ((8, 12), None), ((8, 8), (8, 16))])
def test_full_topk_quadtree_b_is_full_attention_at_its_finest_level(build, impl, hw, context_hw):
    """QuadTree-B whose top-K covers every candidate is full attention at its finest level.

    With topk = (M0, 4*M0, 16*M0) for M0 keys at the coarsest level, every
    query keeps every key at every level, so at the finest level the children
    of its parent's selection are all the keys of the map: the finest message
    is softmax(q k^T / sqrt(d)) v over every key, i.e. full attention. With the
    level weights set to (0, 0, 1) (logits -inf, -inf, 0) the whole module then
    equals full attention with the same projections, exactly up to rounding.
    """
    ch, cw = context_hw or hw
    m0 = (ch // 4) * (cw // 4)
    module = build(impl=impl, variant="B", levels=3, topk=(m0, 4 * m0, 16 * m0))
    args = inputs(module, hw, context_hw, batch=2)
    with torch.no_grad():
        pyr = module.pyramid(*args)
        full_message = attend(pyr.queries[-1], pyr.keys[-1], pyr.values[-1], math=True)
        torch.testing.assert_close(pyr.messages[-1], full_message, rtol=1e-5, atol=1e-6)
        module.level_weight.copy_(torch.tensor([float("-inf"), float("-inf"), 0.0]))
        torch.testing.assert_close(module(*args), full_twin(module)(*args), rtol=1e-5, atol=1e-6)
        # the test can fail: keep one key fewer at the coarsest level and it is no longer full attention
        pruned = build(impl=impl, variant="B", levels=3, topk=(m0 - 1, 4 * (m0 - 1), 16 * (m0 - 1)))
        pruned.load_state_dict(module.state_dict())
        assert not torch.allclose(pruned(*args), full_twin(module)(*args), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_quadtree_a_with_full_topk_is_a_hierarchical_softmax(build, impl):
    """QuadTree-A with a top-K covering every candidate.

    A's weights are not a flat softmax: a finest key gets p0(ancestor at level 0)
    times, at each finer level, the softmax over the 4 children of its parent.
    With every key kept, every coarse message is empty (all keys are refined
    below) and the output is the finest message alone; with one level, A is
    plain full attention. Both are checked here against dense computations.
    """
    hw = (8, 8)
    module = build(impl=impl, variant="A", levels=3, topk=(4, 16, 64))
    args = inputs(module, hw, batch=2)
    with torch.no_grad():
        pyr = module.pyramid(*args)
        for lv in (0, 1):
            assert pyr.messages[lv].abs().max() == 0, f"level {lv} kept a key out of refinement"
        # dense hierarchical weights: (B, h, 64 queries, 64 keys)
        q2, k2, v2 = pyr.queries[2], pyr.keys[2], pyr.values[2]
        scale = q2.shape[-1] ** -0.5
        weight = torch.ones(2, HEADS, 64, 64)
        for lv in range(3):
            side = 2**lv * 2  # map side at level lv: 2, 4, 8
            s = (pyr.queries[lv] @ pyr.keys[lv].transpose(-2, -1)) * scale  # (B, h, side^2, side^2)
            if lv == 0:
                p = torch.softmax(s, -1)
            else:  # softmax over the 4 keys that share a parent
                kp = side // 2
                parent_of_key = torch.tensor([(y // 2) * kp + x // 2 for y in range(side) for x in range(side)])
                e = (s - s.amax(-1, keepdim=True)).exp()
                denom = torch.zeros(*e.shape[:3], kp * kp).index_add_(-1, parent_of_key, e)
                p = e / denom[..., parent_of_key]
            # lift to the finest map: each finest token's ancestor at level lv
            f = 8 // side
            anc = torch.tensor([(y // f) * side + x // f for y in range(8) for x in range(8)])
            weight = weight * p[:, :, anc][:, :, :, anc]
        assert torch.allclose(weight.sum(-1), torch.ones(()), atol=1e-5)
        torch.testing.assert_close(pyr.messages[2], weight @ v2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module(*args), module.proj.output(weight @ v2), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(weight @ v2, attend(q2, k2, v2, math=True), atol=1e-4)
        one = build(impl=impl, variant="A", levels=1)
        x, hw = inputs(one, hw)
        torch.testing.assert_close(one(x, hw), full_twin(one)(x, hw), rtol=1e-5, atol=1e-6)


def test_quadtree_b_mixes_levels_with_a_softmax_weight_and_lepe(build):
    """Output = out_proj(sum_l softmax(w)_l * upsample(message_l + dwconv3x3_l(values_l)))."""
    module = build(impl="reference", variant="B", levels=3, topk=3, values="conv", lepe=True)
    x, hw = inputs(module, (8, 12), batch=2)
    with torch.no_grad():
        pyr = module.pyramid(x, hw)
        w = torch.softmax(module.level_weight, 0)
        out = torch.zeros(2, HEADS, 96, DIM // HEADS)
        for lv in range(3):
            lepe = module.lepe[lv](pyr.value_maps[lv])  # (B, C, H_l, W_l)
            lepe = lepe.flatten(2).transpose(1, 2).reshape(2, -1, HEADS, DIM // HEADS).transpose(1, 2)
            term = w[lv] * (pyr.messages[lv] + lepe)  # (B, h, N_l, d)
            f = 2 ** (2 - lv)
            hl, wl = pyr.q_hw[lv]
            term = term.view(2, HEADS, hl, 1, wl, 1, -1).expand(-1, -1, -1, f, -1, f, -1)  # nearest upsampling
            out = out + term.reshape(2, HEADS, 96, -1)
        torch.testing.assert_close(module(x, hw), module.proj.output(out), rtol=1e-5, atol=1e-6)
        # value pyramid: each coarser level is the conv branch of the finer one
        torch.testing.assert_close(pyr.value_maps[1], module.value_branch[0](pyr.value_maps[2]))


# ---------------------------------------------------------------------- fast path
@pytest.mark.parametrize(
    ("knobs", "hw", "context_hw"),
    [
        (dict(variant="B", topk=4), (8, 12), None),
        (dict(variant="A", topk=4), (8, 12), None),
        (dict(variant="B", values="conv", lepe=True, topk=(4, 6, 8)), (12, 20), None),
        (dict(variant="A", topk=(6, 4, 4)), (12, 20), (16, 8)),
        (dict(variant="B", levels=2, topk=5), (12, 20), (8, 12)),
    ],
    ids=["B", "A", "B-conv-lepe-tuple", "A-cross", "B-2-levels-cross"],
)
def test_fast_matches_reference_in_float32(build, knobs, hw, context_hw):
    module = build(impl="fast", **knobs)
    assert_parity(module, "fast", torch.float32, inputs(module, hw, context_hw, batch=2))


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_refine_fast_matches_reference_on_the_same_candidates(variant, dtype):
    """The fine-level step a kernel replaces: same candidates in, same message and gradients out.

    Whole-module bf16 parity also depends on which keys win the top-K, and
    near-ties flip under bf16 rounding; here the candidates are fixed.
    """
    gen = torch.Generator().manual_seed(0)
    b, h, p, d, m, kp = 2, 2, 6, 8, 40, 3
    q = torch.randn(b, h, p, 4, d, generator=gen)
    k, v = torch.randn(b, h, m, d, generator=gen), torch.randn(b, h, m, d, generator=gen)
    idx = torch.stack([torch.randperm(m, generator=gen)[: 4 * kp] for _ in range(b * h * p)]).view(b, h, p, 4 * kp)
    parent = torch.rand(b, h, p, kp, generator=gen) if variant == "A" else None
    g = torch.randn(b, h, p, 4, d, generator=gen)

    def run(fn, dt):
        ts = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v) + ((parent,) if parent is not None else ())]
        msg, _, _ = fn(ts[0], ts[1], ts[2], idx, ts[3] if parent is not None else None, 0)
        (msg.float() * g).sum().backward()
        return [msg.detach()] + [t.grad for t in ts]

    want = run(refine_reference, torch.float32)
    got = run(refine, dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    names = ["message", "dq", "dk", "dv"] + (["dparent"] if variant == "A" else [])
    for name, a, e in zip(names, got, want, strict=True):
        err = float((a.double() - e.double()).norm() / e.double().norm())
        assert err <= tol, f"{name}: relative error {err:.2e}"


# ---------------------------------------------------------------------- cost
def test_macs_by_hand_two_levels_k2():
    # 4x4 map, C=8, 2 heads of 4, levels 2, K=2: coarsest 2x2.
    proj = 16 * 8 * 8 + 16 * 8 * 16 + 16 * 8 * 8  # q, kv, out projections
    pool = 3 * (2 * 2 * 8 * 4)  # q, k, v: 4 per output element of a 2x2x8 map
    coarse = 2 * 2 * 4 * 4 * 4  # heads * (q k^T + p v) over 4 x 4 pairs, d = 4
    fine = 2 * 2 * 16 * (4 * 2) * 4  # 16 queries against 4K = 8 candidates
    a = attentions.build("quadtree", dim=8, heads=2, variant="A", levels=2, topk=2)
    assert a.macs(1, (4, 4)) == proj + pool + coarse + fine == 6784
    assert a.macs(3, (4, 4)) == 3 * 6784
    # B with the conv value branch and LePE: the v pooling is replaced by
    # GroupNorm(16x8) + conv k2 (2x2x8x8x4) + GroupNorm(4x8) + conv 1x1 (2x2x8x8),
    # and a depthwise 3x3 runs on each level's values (16x8x9 + 4x8x9).
    b = attentions.build("quadtree", dim=8, heads=2, variant="B", levels=2, topk=2, values="conv", lepe=True)
    conv_branch = 5 * 16 * 8 + 2 * 2 * 8 * 8 * 4 + 5 * 4 * 8 + 2 * 2 * 8 * 8
    lepe = 16 * 8 * 9 + 4 * 8 * 9
    b.impl = "reference"
    assert b.macs(1, (4, 4)) == 6784 - 2 * 2 * 8 * 4 + conv_branch + lepe == 10176
    # B's fast path also computes the coarsest q k^T logits outside SDPA to pick the top-K.
    b.impl = "fast"
    assert b.macs(1, (4, 4)) == 10176 + 2 * 4 * 4 * 4
    # cross attention: queries on 4x4, keys on 8x4 (coarsest 4x2 = 8 keys)
    proj_x = 16 * 8 * 8 + 32 * 8 * 16 + 16 * 8 * 8
    pool_x = 4 * 8 * 4 + 2 * (8 * 8 * 4)
    assert a.macs(1, (4, 4), (8, 4)) == proj_x + pool_x + 2 * 2 * 4 * 8 * 4 + fine


def test_topk_as_int_and_as_per_level_tuple(build):
    base = build(impl="reference", topk=2)
    x, hw = inputs(base, (8, 8))
    same = build(impl="reference", topk=(2, 2, 2))
    torch.testing.assert_close(base(x, hw), same(x, hw), rtol=0, atol=0)
    assert base.topks() == same.topks() == (2, 2, 2)
    per_level = build(impl="reference", topk=(4, 3, 3))
    with torch.no_grad():
        pyr = per_level.pyramid(x, hw)
    assert [s.shape[-1] for s in pyr.selected] == [4, 3]  # coarsest entry first; the finest selects nothing
    assert not torch.allclose(per_level(x, hw), base(x, hw))
    # fine pairs: 16 level-1 queries x 4*4 candidates + 64 finest x 4*3, per head, scores and values
    d = DIM // HEADS
    extra = 2 * HEADS * d * (16 * 4 * (4 - 2) + 64 * 4 * (3 - 2))
    assert per_level.macs(1, (8, 8)) - base.macs(1, (8, 8)) == extra
    # the CLI spelling of a tuple
    assert attentions.get("quadtree").make_knobs(topk="16,8,8").topk == (16, 8, 8)
    assert attentions.get("quadtree").make_knobs(topk="8").topk == 8


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_attention_with_a_context_of_another_size(build, impl):
    module = build(impl=impl, topk=3)
    x, hw, ctx, chw = inputs(module, (8, 12), (16, 8), batch=2)
    out = module(x, hw, ctx, chw)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in module.parameters())
    # keys come from the context: changing it changes the output
    assert not torch.allclose(module(x, hw, ctx + 1, chw), out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("hw", "levels"), [((8, 12), 3), ((12, 20), 3), ((20, 12), 2), ((24, 8), 4)])
def test_non_square_and_non_power_of_two_maps(build, impl, hw, levels):
    module = build(impl=impl, levels=levels, topk=2, values="conv", lepe=True)
    assert module.unsupported(2, hw) == []
    x, _ = inputs(module, hw, batch=2)
    x.requires_grad_(True)
    out = module(x, hw)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        pyr = module.pyramid(x, hw)
    assert pyr.q_hw[0] == (hw[0] >> (levels - 1), hw[1] >> (levels - 1)) and pyr.q_hw[-1] == hw


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        (dict(variant="C"), "variant"),
        (dict(levels=0), "levels"),
        (dict(topk=0), "topk"),
        (dict(topk=(8, 0, 8)), "topk"),
        (dict(topk="many"), "topk"),
        (dict(variant="A", values="conv"), "values='avg'"),
        (dict(variant="A", lepe=True), "lepe=False"),
        (dict(values="pool"), "values"),
        (dict(top_k=8), "topk="),
    ],
)
def test_bad_knobs_say_what_to_change(knobs, match):
    with pytest.raises(attentions.KnobError, match=match):
        attentions.build("quadtree", dim=DIM, heads=HEADS, **knobs)


def test_unsupported_points_say_what_to_change(build):
    module = build(levels=3, topk=8)
    assert module.unsupported(1, (16, 12)) == []
    (reason,) = module.unsupported(1, (10, 12))
    assert "multiples of 2^(levels-1) = 4" in reason and "10x12" in reason and "levels <= 2" in reason
    (reason,) = module.unsupported(1, (16, 12), context_hw=(8, 6))
    assert "context map 8x6" in reason
    (reason,) = module.unsupported(1, (4, 8))  # coarsest 1x2: 2 keys
    assert "top-K 8 is larger than the 2 keys" in reason and "topk <= 2" in reason
    (reason,) = build(topk=(8, 8)).unsupported(1, (16, 16))
    assert "2 entries but levels=3" in reason
    (reason,) = build(topk=(2, 9, 4)).unsupported(1, (16, 16))
    assert "topk[1] = 9 is larger than the 8 candidates" in reason
    assert any("lepe=False" in r for r in build(lepe=True).unsupported(1, (8, 8), (8, 8)))
    assert any("values='avg'" in r for r in build(values="conv").unsupported(1, (8, 8), (8, 8)))
    x, hw = inputs(module, (4, 8))
    with pytest.raises(attentions.UnsupportedPoint, match="top-K"):
        module(x, hw)
