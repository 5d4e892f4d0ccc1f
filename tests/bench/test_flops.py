"""FLOP accounting: fvcore with our handles against the analytic counts, coverage, hand counts."""

from __future__ import annotations

import json
import typing

import pytest
import torch
import torch.nn.functional as F
from attnbench.bench import flops
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnbench import attentions

DIM, HEADS, BATCH = 32, 2, 1
RESOLUTIONS = [(8, 8), (8, 16)]


def knob_sets(name: str) -> list[dict]:
    """Knob sets from the registry: the defaults fitted to RESOLUTIONS, each choice knob (bool, Literal) at
    its other values, one more value of the cost knob that fits, and the mechanism's declared examples."""
    cls = attentions.get(name)
    base = attentions.fit_knobs(name, RESOLUTIONS, dim=DIM, heads=HEADS)
    sets = [base]
    for knob, tp in cls.knob_types().items():
        if tp is bool or typing.get_origin(tp) is typing.Literal:
            sets += [{**base, knob: v} for v in attentions.base.knob_candidates(name, knob, RESOLUTIONS)[1:]]
    if cls.cost_knob:
        values = attentions.fitting_values(name, cls.cost_knob, RESOLUTIONS, dim=DIM, heads=HEADS, knobs=base)
        sets += [{**base, cls.cost_knob: v} for v in values[1:2]]
    sets += [dict(example) for example in cls.examples]
    unique: list[dict] = []
    for knobs in sets:
        try:
            cls.make_knobs(**knobs)
        except attentions.KnobError:  # a value that needs another knob changed with it (pooling's mode 'none')
            continue
        if knobs not in unique:
            unique.append(knobs)
    return unique


def _modes(cls: type[attentions.Attention]) -> list[bool]:
    if cls.requires_context:
        return [True]
    return [False, True] if cls.supports_cross else [False]


def _cases(full: bool = False) -> list[tuple]:
    """The counting cases of every mechanism.

    The rule (covering, not the product): every knob set is counted once and every (impl, self/cross)
    pair at least once, assigned round-robin (case j: knob set j mod K, pair j mod P), so that a
    mechanism has max(K, P) cases, not K x P. A count depends on the modules a knob set builds and on
    the ops an impl and a context call; the impl picks the attention kernel and the context the key
    source whatever the knobs, so the product adds no op that the covering cases do not meet. The full
    product (``full``) runs in ``test_counter_full_product`` under the slow marker (``nox -s slow``).
    """
    cases = []
    for name in attentions.available():
        cls = attentions.get(name)
        knob_list = knob_sets(name)
        pairs = [(impl, cross) for impl in cls.impls for cross in _modes(cls)]
        if full:
            combos = [(k, c, i) for k in knob_list for i, c in pairs]
        else:
            combos = [
                (knob_list[j % len(knob_list)], pairs[j % len(pairs)][1], pairs[j % len(pairs)][0])
                for j in range(max(len(knob_list), len(pairs)))
            ]
        for knobs, cross, impl in combos:
            case_id = f"{name}-{knobs}-{'cross' if cross else 'self'}-{impl}"
            cases.append(pytest.param(name, knobs, cross, impl, id=case_id))
    return cases


def test_covering_cases_meet_every_knob_set_and_every_impl_context_pair():
    """The covering rule holds: each mechanism's knob sets and (impl, self/cross) pairs all appear."""
    covering = [c.values for c in _cases()]
    for name in attentions.available():
        cls = attentions.get(name)
        mine = [(k, c, i) for n, k, c, i in covering if n == name]
        assert all(k in [m[0] for m in mine] for k in knob_sets(name)), name
        assert {(i, c) for _, c, i in mine} == {(i, c) for i in cls.impls for c in _modes(cls)}, name


@pytest.mark.slow
@pytest.mark.parametrize(("name", "knobs", "cross", "impl"), _cases(full=True))
def test_counter_full_product(name, knobs, cross, impl):
    """Every knob set x impl x self/cross (slow: the covering cases below are the default)."""
    test_counter_matches_analytic_with_nothing_uncovered(name, knobs, cross, impl)


@pytest.mark.parametrize(("name", "knobs", "cross", "impl"), _cases())
def test_counter_matches_analytic_with_nothing_uncovered(name, knobs, cross, impl):
    torch.manual_seed(0)
    module = attentions.build(name, dim=DIM, heads=HEADS, impl=impl, **knobs)
    ran = 0
    refused: dict[tuple[int, int], list[str]] = {}
    for hw in RESOLUTIONS:
        context_hw = None
        if cross:
            # a context map of another size, so self and cross are told apart
            context_hw = module.default_context_hw(hw) if module.requires_context else (hw[0] // 2 * 2, hw[1] * 2)
        reasons = module.unsupported(BATCH, hw, context_hw, device="cpu")
        if reasons:
            refused[hw] = reasons
            continue
        args = module.example_inputs(BATCH, hw, cross=cross, context_hw=context_hw)
        result = flops.count(module, args, backward=False)
        where = f"{name} {knobs} impl={impl} hw={hw} context_hw={context_hw}"
        assert result.uncovered == {}, f"{where}: ops nothing counted: {result.uncovered}"
        assert result.analytic_macs is not None
        assert result.macs == pytest.approx(result.analytic_macs, rel=0.01), (
            f"{where}: fvcore+handles {result.macs} MACs vs analytic {result.analytic_macs} MACs; by op {result.by_op}"
        )
        assert result.flop_counter_error is None, f"{where}: {result.flop_counter_error}"
        assert result.flop_counter_uncovered == {}, f"{where}: FlopCounterMode missed {result.flop_counter_uncovered}"
        assert result.flop_counter_macs == pytest.approx(result.analytic_macs, rel=0.01), where
        ran += 1
    if not ran and cross:
        pytest.skip(f"{name} {knobs} refuses cross attention: {module.unsupported(BATCH, (8, 8), (8, 8))}")
    reference = attentions.build(name, dim=DIM, heads=HEADS, impl="reference", **knobs)
    if not ran and impl != "reference" and any(not reference.unsupported(BATCH, hw) for hw in refused):
        pytest.skip(f"impl={impl} cannot run on the CPU: {next(iter(refused.values()))}")
    assert ran, f"{name} {knobs}: no resolution in {RESOLUTIONS} was accepted: {refused}"


# ---------------------------------------------------------------------- hand-computed counts
def test_full_attention_8x8_by_hand():
    module = attentions.build("full", dim=16, heads=2)
    args = module.example_inputs(1, (8, 8))
    n, c, h, d = 64, 16, 2, 8
    projections = n * c * c + n * c * 2 * c + n * c * c  # q, kv, out = 65536
    attention = h * (n * n * d + n * n * d)  # scores and weighted sum = 131072
    expected = projections + attention
    assert expected == 196608
    for impl in ("reference", "fast"):
        module.impl = impl
        result = flops.count(module, args)
        assert result.complete
        assert result.macs == expected
        assert result.flops == 2 * expected
        assert result.flop_counter_macs == expected
        assert result.analytic_macs == expected
        assert result.backward_macs_rule == 2 * expected
    # The reference path's backward is exactly the rule: two products per forward product.
    module.impl = "reference"
    assert flops.count(module, args).backward_macs_measured == 2 * expected
    # The fused CPU kernel recomputes the scores: 2x for the projections, 2.5x for the attention.
    module.impl = "fast"
    assert flops.count(module, args).backward_macs_measured == 2 * projections + 5 * attention // 2


def test_swin_shifted_windows_by_hand():
    module = attentions.build("swin", dim=16, heads=2, window=4, shift=True)
    n, c, h, d, windows, t = 64, 16, 2, 8, 4, 16
    projections = 4 * n * c * c  # q, kv (2C) and out
    attention = h * windows * 2 * t * t * d  # pairs inside each of the four 4x4 windows only
    result = flops.count(module, module.example_inputs(1, (8, 8)), backward=False)
    assert result.complete
    assert result.macs == projections + attention == 65536 + 32768
    dense = h * 2 * n * n * d
    assert result.macs < projections + dense
    # one window covering the whole 4x4 map, shifted
    module = attentions.build("swin", dim=16, heads=2, window=4, shift=True)
    result = flops.count(module, module.example_inputs(1, (4, 4)), backward=False)
    assert result.macs == 4 * 16 * c * c + h * 2 * 16 * 16 * d == 16384 + 8192


def test_quadtree_two_levels_k2_by_hand():
    module = attentions.build("quadtree", dim=16, heads=2, levels=2, topk=2)
    n, c, h, d, k = 64, 16, 2, 8, 2
    projections = 4 * n * c * c  # 65536
    pooling = 3 * 4 * (n // 4) * c  # q, k and v pooled 2x2: 4 MACs per output element = 3072
    coarse = h * 2 * (n // 4) * (n // 4) * d  # 16 x 16 pairs = 8192
    fine = h * 2 * n * (4 * k) * d  # each fine query sees the 4K = 8 children of its parent's top-2 = 16384
    dense_fine = h * 2 * n * n * d
    module.impl = "reference"
    result = flops.count(module, module.example_inputs(1, (8, 8)), backward=False)
    assert result.complete
    assert result.macs == projections + pooling + coarse + fine == 93184
    assert result.analytic_macs == 93184
    assert fine < dense_fine


# ---------------------------------------------------------------------- coverage
class _Uncounted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self.fc(x), x)  # cdist has no rule and is not zero on purpose


def test_an_op_nothing_counts_is_reported_and_marks_the_count_incomplete():
    result = flops.count(_Uncounted(), (torch.randn(2, 5, 6),))
    assert not result.complete
    assert result.uncovered == {"aten::cdist": 1}
    assert "INCOMPLETE" in result.status() and "cdist" in result.status()
    assert result.flop_counter_uncovered  # FlopCounterMode sees what it cannot count too
    assert result.as_dict()["complete"] is False


def test_zero_on_purpose_ops_are_reported_apart_from_uncovered():
    class Zero(nn.Module):
        def forward(self, x):
            top = torch.topk(x, 2, dim=-1).values
            return (
                torch.softmax(x, -1).sum()
                + torch.gather(x, -1, torch.zeros_like(x, dtype=torch.long)).sum()
                + top.sum()
            )

    result = flops.count(Zero(), (torch.randn(3, 4),))
    assert result.complete and result.macs == 0
    assert {"aten::topk", "aten::softmax", "aten::gather"} <= set(result.zero_ops)


def test_rule_book_ops_by_hand():
    class Ops(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.gn = nn.GroupNorm(2, 4, affine=False)

        def forward(self, x, grid):
            return (
                F.grid_sample(x, grid, align_corners=True).sum()  # (1, 4, 3, 5) out: 4 * 60
                + F.avg_pool2d(x, 2).sum()  # (1, 4, 4, 4) out: 4 * 64
                + F.max_pool2d(x, 3, stride=1).sum()  # (1, 4, 6, 6) out: 9 * 144
                + F.adaptive_avg_pool2d(x, 2).sum()  # input 256 elements: 256
                + F.interpolate(x, size=(5, 5), mode="bilinear").sum()  # 4 * 100
                + F.interpolate(x, size=(5, 5), mode="nearest").sum()  # data movement: 0
                + F.interpolate(x[:, :, 0], size=5, mode="linear").sum()  # 1-D: 2 * 20
                + self.ln(x).sum()  # affine: 5 * 256
                + self.gn(x).sum()  # no affine: 4 * 256
                + torch.baddbmm(x[0], x[0], x[0]).sum()  # 4 * 8 * 8 * 8
            )

    args = (torch.randn(1, 4, 8, 8), torch.rand(1, 3, 5, 2) * 2 - 1)
    expected = 4 * 60 + 4 * 64 + 9 * 144 + 256 + 4 * 100 + 0 + 2 * 20 + 5 * 256 + 4 * 256 + 4 * 8 * 8 * 8
    result = flops.count(Ops(), args)
    assert result.complete, result.uncovered
    assert result.macs == expected
    assert result.flop_counter_macs == expected
    assert result.flop_counter_uncovered == {}


def test_sdpa_with_mask_and_causal():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    bias = torch.randn(5, 7)

    class Sdpa(nn.Module):
        def __init__(self, causal: bool, mask: torch.Tensor | None):
            super().__init__()
            self.causal, self.mask = causal, mask

        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)

    dense = 2 * 3 * 5 * 7 * (4 + 6)
    for mask in (None, bias, bias > 0):
        result = flops.count(Sdpa(False, mask), (q, k, v))
        assert result.complete and result.macs == dense and result.flop_counter_macs == dense
    causal_pairs = 1 + 2 + 3 + 4 + 5  # query i sees keys 0..i
    result = flops.count(Sdpa(True, None), (q, k, v))
    assert result.macs == 2 * 3 * causal_pairs * (4 + 6)


def test_custom_op_registered_once_counts_in_both_counters():
    lib = "attnbench_flops_test"

    @torch.library.custom_op(f"{lib}::outer", mutates_args=())
    def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a[:, :, None] * b[:, None, :]

    @outer.register_fake
    def _(a, b):
        return a.new_empty(a.shape[0], a.shape[1], b.shape[1])

    class UsesOuter(nn.Module):
        def forward(self, a, b):
            return outer(a, b)

    args = (torch.randn(2, 3), torch.randn(2, 5))
    before = flops.count(UsesOuter(), args)
    assert before.uncovered == {f"{lib}::outer": 1} and not before.complete
    flops.register_op(outer, lambda inputs, outputs, kwargs: outputs[0].numel)
    after = flops.count(UsesOuter(), args)
    assert after.complete and after.macs == 30 and after.flop_counter_macs == 30
    with FlopCounterMode(display=False) as plain:  # torch's own counter, outside bench.flops
        outer(*args)
    assert plain.get_total_flops() == 2 * 30
    with pytest.raises(ValueError, match="already registered"):
        flops.register_op(outer, lambda inputs, outputs, kwargs: 0)


def test_flex_attention_counts_visited_blocks():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    mask = flex.create_block_mask(lambda b, h, qi, ki: qi // 128 == ki // 128, None, None, 256, 200, device="cpu")
    # query block 0 visits key block 0 (128 keys); block 1 visits key block 1 (72 keys, clipped)
    expected_pairs = 128 * 128 + 128 * 72
    assert flops.flex_attention_macs((2, 3, 256, 8), (2, 3, 200, 4), mask) == 2 * 3 * expected_pairs * (8 + 4)
    assert flops.flex_attention_macs((1, 1, 16, 8), (1, 1, 9, 8), None) == 16 * 9 * 16


def test_units_are_in_every_json_key():
    module = attentions.build("full", dim=16, heads=2)
    data = flops.count(module, module.example_inputs(1, (4, 4))).as_dict()
    assert data["fvcore_flops"] == 2 * data["fvcore_macs"]
    assert data["analytic_flops"] == 2 * data["analytic_macs"]
    numeric = [k for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)]
    assert numeric and all(
        k.endswith(("_macs", "_flops", "_macs_rule", "_macs_measured", "_flops_measured")) for k in numeric
    )


def test_op_base_name():
    assert flops.op_base_name("aten::add_") == "add"
    assert flops.op_base_name(torch.ops.aten.add.Tensor) == "add"
    assert flops.op_base_name(torch.ops.aten._softmax) == "_softmax"
    assert flops.op_base_name("ns::my_op") == "ns::my_op"
    assert flops.op_base_name("aten::__and__") == "__and__"


# ---------------------------------------------------------------------- the command
def test_cli_flops_json_for_a_mechanism():
    import json

    from typer.testing import CliRunner

    from attnbench.cli import app

    argv = ["flops", "-m", "full", "-r", "8", "--dim", "16", "--heads", "2", "--knob", "qkv_bias=false", "--json"]
    out = CliRunner().invoke(app, argv)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["complete"] and data["fvcore_macs"] == data["analytic_macs"] == data["flop_counter_macs"]
    assert data["fvcore_flops"] == 2 * data["fvcore_macs"]
    table = CliRunner().invoke(app, ["flops", "-m", "full", "-r", "4", "--dim", "16", "--heads", "2"])
    assert table.exit_code == 0 and "FLOPs = 2 x MACs" in table.output


def test_cli_flops_refuses_clearly():
    from typer.testing import CliRunner

    from attnbench.cli import app

    runner = CliRunner()
    both = runner.invoke(app, ["flops", "-m", "full", "--model", "x"])
    assert both.exit_code != 0 and "exactly one" in both.output
    bad = runner.invoke(app, ["flops", "--model", "torch.nn:NoSuchFactory"])
    assert bad.exit_code != 0 and "NoSuchFactory" in bad.output
    knob = runner.invoke(app, ["flops", "-m", "full", "--knob", "nope"])
    assert knob.exit_code == 2 and "NAME=" in knob.output


def test_einsum_is_counted_exactly():
    class Einsums(nn.Module):
        def forward(self, q, r, a, b, c):
            return torch.einsum("bnyxd,ykd->bnyxk", q, r).sum() + torch.einsum("ij,jk,kl->il", a, b, c).sum()

    args = (torch.randn(2, 3, 4, 5, 6), torch.randn(4, 7, 6), torch.randn(2, 3), torch.randn(3, 4), torch.randn(4, 5))
    expected = 2 * 3 * 4 * 5 * 6 * 7 + (2 * 3 * 4 + 2 * 4 * 5)  # one contraction; then (ij,jk)->ik, (ik,kl)->il
    result = flops.count(Einsums(), args)
    assert result.complete and result.macs == expected
    assert result.flop_counter_macs == expected  # torch lowers einsum to bmm and counts the same products


@pytest.mark.parametrize("name", attentions.available())
def test_backward_is_measured_with_nothing_uncovered(name):
    module = attentions.build(name, dim=DIM, heads=HEADS, **knob_sets(name)[0])
    hw = next(hw for hw in RESOLUTIONS if not module.unsupported(BATCH, hw))
    result = flops.count(module, module.example_inputs(BATCH, hw))
    assert result.backward_error is None, result.backward_error
    assert result.backward_uncovered == {}, f"{name}: backward ops nothing counted: {result.backward_uncovered}"
    assert result.backward_macs_rule == 2 * result.macs
    # every product of the forward pass has at least one product in the backward pass
    assert result.backward_macs_measured >= result.macs


def test_cli_flops_model_tells_its_steps_as_they_finish():
    """Not a terminal: one line per finished step (building, each counter, each model) on stderr."""
    from typer.testing import CliRunner

    from attnbench import cli

    res = CliRunner().invoke(cli.app, ["flops", "--model", "pyramid_full", "--tiny", "--no-backward"])
    assert res.exit_code == 0, res.output
    err = res.stderr
    assert "building pyramid_full done in" in err and "fvcore done in" in err and "FlopCounterMode done in" in err
    res = CliRunner().invoke(cli.app, ["models", "pyramid_full", "--tiny"])
    assert res.exit_code == 0, res.output
    assert "[1/1] pyramid_full done in" in res.stderr and "pyramid_full" in res.stdout
    # --json is for programs: the JSON alone, no progress lines
    res = CliRunner().invoke(cli.app, ["models", "pyramid_full", "--tiny", "--json"])
    assert res.exit_code == 0 and res.stderr == "" and json.loads(res.output)[0]["model"] == "pyramid_full"
