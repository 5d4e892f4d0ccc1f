"""Registry-driven tests: every mechanism, every implementation, self and cross."""

from __future__ import annotations

import math

import pytest
import torch
from attnbench.attentions.testing import TOLERANCE, assert_parity

from attnbench import attentions

DIM, HEADS, BATCH = 32, 2, 2
# Candidate maps, non-square and not powers of two first; the first one a
# mechanism's defaults accept is used.
CANDIDATE_HW = [(12, 20), (14, 21), (24, 40), (28, 42), (28, 28), (56, 56)]
DTYPES = [torch.float32, torch.bfloat16]


def supported_point(name: str) -> tuple[dict, tuple[int, int]]:
    """Knobs and map of a mechanism's example point: its defaults on the first candidate map they accept,
    else the knobs the registry fits to the first candidate map it can (attentions.fit_knobs)."""
    for hw in CANDIDATE_HW:
        if not attentions.not_supported_reasons(name, dim=DIM, heads=HEADS, hw=hw, batch=BATCH):
            return {}, hw
    for hw in CANDIDATE_HW:
        try:
            return attentions.fit_knobs(name, [hw], dim=DIM, heads=HEADS), hw
        except attentions.KnobError:
            continue
    raise AssertionError(f"{name} refuses every candidate map {CANDIDATE_HW}, whatever its knobs")


def example_module(name: str, **overrides) -> tuple[attentions.Attention, tuple[int, int]]:
    knobs, hw = supported_point(name)
    return attentions.build(name, dim=DIM, heads=HEADS, **{**knobs, **overrides}), hw


def modes(name: str) -> list[str]:
    cls = attentions.get(name)
    if cls.requires_context:
        return ["cross"]
    return ["self", "cross"] if cls.supports_cross else ["self"]


CASES = [(name, mode) for name in attentions.available() for mode in modes(name)]
IDS = [f"{n}-{m}" for n, m in CASES]


def make(name: str, mode: str, seed: int = 0) -> tuple[attentions.Attention, tuple]:
    torch.manual_seed(seed)
    module, hw = example_module(name)
    args = module.example_inputs(BATCH, hw, cross=(mode == "cross"), seed=seed)
    return module, args


def test_registration_order_is_the_listing_order_and_names_are_unique():
    names = attentions.available()
    assert names[: len(attentions.MECHANISMS)] == list(attentions.MECHANISMS)
    with pytest.raises(ValueError, match="registered twice"):
        attentions.register(attentions.get(names[0]))
    assert attentions.available() == names


@pytest.mark.parametrize("name", attentions.available())
def test_declarations(name):
    cls = attentions.get(name)
    d = cls.describe()
    assert d["name"] == name and d["summary"] and d["complexity"]
    assert "reference" in cls.impls and cls.default_impl in cls.impls
    if cls.cost_knob is not None:
        assert cls.cost_knob in d["knobs"]
    module, hw = example_module(name)
    assert module.output_dim == DIM  # widening the tokens is opt-in (pooling's dim_out)
    assert module.macs(BATCH, hw) > 0
    # doubling the batch doubles the analytic count
    assert module.macs(2 * BATCH, hw) == 2 * module.macs(BATCH, hw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "mode"), CASES, ids=IDS)
def test_forward_backward(name, mode, dtype):
    module, args = make(name, mode)
    module = module.to(dtype)
    args = tuple(a.to(dtype).requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
    out = module(*args)
    oh, ow = module.output_hw(args[1])
    assert out.shape == (args[0].shape[0], module.prefix_tokens + oh * ow, module.output_dim)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None, f"{name}: parameter {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname} has a non-finite gradient"
    assert args[0].grad is not None and torch.isfinite(args[0].grad).all()


FAST_CASES = [
    (name, mode, impl) for (name, mode) in CASES for impl in attentions.get(name).impls if impl != "reference"
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "mode", "impl"), FAST_CASES, ids=[f"{n}-{m}-{i}" for n, m, i in FAST_CASES])
def test_fast_path_matches_reference(name, mode, impl, dtype):
    module, args = make(name, mode)
    context_hw = args[3] if len(args) > 3 else None
    overrides = module.tie_free_knobs(args[1], context_hw)
    if dtype != torch.float32 and overrides is not None:
        # A discrete choice (top-K) flips on rounded near-ties: compare where there is none.
        torch.manual_seed(0)
        module = attentions.build(name, dim=DIM, heads=HEADS, **{**module.knobs.as_dict(), **overrides})
    module.impl = impl
    reasons = module.unsupported(BATCH, args[1], context_hw, dtype=dtype, device="cpu")
    if reasons:
        pytest.skip("; ".join(reasons))
    assert_parity(module, impl, dtype, args)


def _with_tie_free_knobs() -> list[str]:
    """Mechanisms that declare tie-free knobs at their example point (those that make a discrete choice)."""
    out = []
    for name in attentions.available():
        module, args = make(name, modes(name)[0])
        if module.tie_free_knobs(args[1], args[3] if len(args) > 3 else None) is not None:
            out.append(name)
    return out


@pytest.mark.parametrize("name", _with_tie_free_knobs())
def test_tie_free_knobs_remove_the_discrete_choice(name):
    module, args = make(name, modes(name)[0])
    context_hw = args[3] if len(args) > 3 else None
    overrides = module.tie_free_knobs(args[1], context_hw)
    torch.manual_seed(0)
    rebuilt = attentions.build(name, dim=DIM, heads=HEADS, impl="reference", **{**module.knobs.as_dict(), **overrides})
    assert not rebuilt.unsupported(BATCH, args[1], context_hw)
    # no choice left: a small perturbation moves the output in proportion (a flipped selection would jump)
    x = args[0].double()
    rebuilt = rebuilt.double()
    step = 1e-3 * torch.randn_like(x)
    rest = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args[1:])
    base, moved, twice = (rebuilt(x + k * step, *rest) for k in (0, 1, 2))
    torch.testing.assert_close(twice - base, 2 * (moved - base), rtol=0.05, atol=1e-6)


def test_parity_catches_a_fast_path_off_by_more_than_the_tolerance(monkeypatch):
    module, args = make("full", "self")
    assert_parity(module, "fast", torch.float32, args)
    real = attentions.common.F.scaled_dot_product_attention
    # 1e-3 relative: ten times the float32 gradient tolerance, far below what eyeballing an output shows
    monkeypatch.setattr(attentions.common.F, "scaled_dot_product_attention", lambda *a, **k: real(*a, **k) * 1.001)
    with pytest.raises(AssertionError):
        assert_parity(module, "fast", torch.float32, args)
    assert TOLERANCE[torch.float32] < 1e-3


@pytest.mark.parametrize("name", attentions.available())
def test_tiny_map_runs_or_is_refused_with_a_reason(name):
    module = attentions.build(name, dim=DIM, heads=HEADS)
    for hw in [(7, 7), (1, 1), (5, 9), (30, 18)]:
        reasons = module.unsupported(1, hw)
        if reasons:
            assert all(isinstance(r, str) and len(r) > 10 for r in reasons)
            args = module.example_inputs(1, hw)
            with pytest.raises(attentions.UnsupportedPoint):
                module(*args)
        else:
            out = module(*module.example_inputs(1, hw))
            assert torch.isfinite(out).all()


def test_a_point_is_checked_once_and_a_refused_point_every_time(monkeypatch):
    # forward asks unsupported() once per (impl, batch, maps, dtype, device): a second call of the same point
    # does not, another batch or impl does, and a point that is refused is refused on every call
    module = attentions.build("swin", dim=DIM, heads=HEADS, window=4)
    asked = []
    real = module.unsupported
    monkeypatch.setattr(module, "unsupported", lambda *a, **k: asked.append(a) or real(*a, **k))
    x = torch.randn(2, 64, DIM)
    module(x, (8, 8))
    module(x, (8, 8))
    assert len(asked) == 1
    module(x[:1], (8, 8))
    module.impl = "reference"
    module(x, (8, 8))
    assert len(asked) == 3
    for _ in range(2):  # 6x6 is not a multiple of the window 4 (pad is off)
        with pytest.raises(attentions.UnsupportedPoint):
            module(torch.randn(1, 36, DIM), (6, 6))
    assert len(asked) == 5


@pytest.mark.parametrize("name", attentions.available())
def test_bad_inputs_say_what_to_change(name):
    module, args = make(name, modes(name)[0])
    x, hw = args[0], args[1]
    rest = args[2:]
    with pytest.raises(ValueError, match="hw"):
        module(x, None, *rest)
    with pytest.raises(ValueError, match="tokens"):
        module(x[:, :-1], hw, *rest)
    with pytest.raises(ValueError, match="shape"):
        module(x[..., :-1], hw, *rest)
    with pytest.raises(ValueError, match="shape"):
        module(x[0], hw, *rest)


@pytest.mark.parametrize("name", attentions.available())
def test_unknown_knob_lists_the_valid_ones(name):
    with pytest.raises(attentions.KnobError) as info:
        attentions.build(name, dim=DIM, heads=HEADS, no_such_knob=3)
    for knob in attentions.get(name).knob_defaults():
        assert knob in str(info.value)


def test_unknown_mechanism_lists_the_available_ones():
    with pytest.raises(KeyError, match="quadtree"):
        attentions.build("quadtre", dim=DIM, heads=HEADS)


def test_bad_dim_heads_and_impl():
    with pytest.raises(attentions.KnobError, match="divisible"):
        attentions.build("full", dim=30, heads=4)
    with pytest.raises(attentions.KnobError, match="implementations"):
        attentions.build("full", dim=32, heads=2, impl="warp-speed")


@pytest.mark.parametrize("name", [n for n in attentions.available() if attentions.get(n).supports_cross])
def test_cross_with_context_equal_to_x_is_self_attention(name):
    cls = attentions.get(name)
    if cls.requires_context or cls.prefix_tokens:
        pytest.skip("cross-only mechanism: its own test covers this")
    module, (x, hw) = make(name, "self")
    module.impl = "reference"
    torch.testing.assert_close(module(x, hw, x.clone(), hw), module(x, hw), rtol=1e-5, atol=1e-5)


def test_cross_is_refused_where_unsupported():
    for name in attentions.available():
        cls = attentions.get(name)
        if cls.supports_cross:
            continue
        module, hw = example_module(name)
        x, hw = module.example_inputs(1, hw)
        with pytest.raises(ValueError, match="cross"):
            module(x, hw, x.clone(), hw)


@pytest.mark.parametrize("name", attentions.available())
def test_example_inputs_are_distinct_tensors(name):
    module, args = make(name, modes(name)[0])
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    assert len({t.data_ptr() for t in tensors}) == len(tensors)


def test_full_macs_by_hand():
    # 8x8 tokens, C=32, 2 heads of 16: projections 4*64*32*32, scores and AV 2*64*64*32.
    m = attentions.build("full", dim=32, heads=2)
    assert m.macs(1, (8, 8)) == 4 * 64 * 32 * 32 + 2 * 64 * 64 * 32
    assert math.isclose(m.macs(3, (8, 8)), 3 * m.macs(1, (8, 8)))


def test_full_bias_table_equals_swin_with_one_window_over_the_map():
    """Full attention's relative-position bias is Swin's table read for a window the size of the map."""
    torch.manual_seed(0)
    swin = attentions.build("swin", dim=DIM, heads=HEADS, window=6)
    full = attentions.build("full", dim=DIM, heads=HEADS, bias_table=6)
    full.load_state_dict(swin.state_dict())
    x, hw = swin.example_inputs(2, (6, 6))
    for impl in ("reference", "fast"):
        swin.impl = full.impl = impl
        torch.testing.assert_close(full(x, hw), swin(x, hw), rtol=1e-5, atol=1e-5)


def test_full_bias_reads_the_offset_rows_by_hand():
    full = attentions.build("full", dim=DIM, heads=HEADS, bias_table=5)
    hw = (3, 4)
    bias = full.bias(hw, "cpu")  # (h, N, N)
    assert bias.shape == (HEADS, 12, 12)
    span = 2 * 5 - 1
    for i, j in [(0, 0), (0, 11), (7, 2), (5, 6)]:
        dy, dx = i // 4 - j // 4, i % 4 - j % 4
        row = (dy + 4) * span + (dx + 4)
        assert torch.equal(bias[:, i, j], full.table[row])
    assert full.unsupported(1, (6, 5)) and not full.unsupported(1, (5, 5))


def test_reference_attend_is_float64_in_float64():
    from attnbench.attentions.common import attend

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    out = attend(q, k, v, bias, math=True)
    by_hand = torch.softmax(q @ k.transpose(-2, -1) / 2.0 + bias, dim=-1) @ v  # scale 4 ** -0.5
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, by_hand, rtol=1e-15, atol=1e-15)
    assert torch.autograd.gradcheck(lambda *t: attend(*t, math=True), (q, k, v, bias))


def test_fast_takes_the_explicit_path_where_sdpa_would_not_fuse(monkeypatch):
    # On the CPU SDPA has no fused kernel for a bias that needs a gradient: fast must not call it then
    # (its unfused math kernel is slower than attend's explicit path), and must call it otherwise.
    from attnbench.attentions import common

    calls = []
    real = common.F.scaled_dot_product_attention
    monkeypatch.setattr(common.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    module = attentions.build("swin", dim=DIM, heads=HEADS, window=4, shift=True)  # its bias table needs a grad
    x, hw = module.example_inputs(1, (8, 8))
    module(x, hw).sum().backward()
    assert calls == [] and module.table.grad is not None
    with torch.no_grad():
        module(x, hw)
    assert calls == [1]
    monkeypatch.setitem(common.SDPA_FUSES_BIAS_GRAD, "cpu", True)  # a device whose kernels fuse it
    module(x, hw).sum().backward()
    assert calls == [1, 1]


def test_fitting_values_are_exactly_the_values_that_run_on_every_map():
    maps = [(8, 8), (12, 12)]
    values = attentions.fitting_values("swin", "window", maps, dim=DIM, heads=HEADS)
    for window in range(1, 13):
        module = attentions.build("swin", dim=DIM, heads=HEADS, window=window)
        assert (window in values) == all(not module.unsupported(1, hw) for hw in maps), window
    assert values[0] == 4  # the default 7 does not fit: the nearest smaller value that does comes first
    budget = attentions.build("swin", dim=DIM, heads=HEADS, window=2).macs(1, (12, 12))
    cheap = attentions.fitting_values("swin", "window", maps, dim=DIM, heads=HEADS, budget=budget)
    assert 2 in cheap and 4 not in cheap
    assert attentions.fitting_values("swin", "window", maps, dim=DIM, heads=HEADS, limit=2) == values[:2]


def test_fit_knobs_keeps_what_fits_and_says_when_nothing_does():
    assert attentions.fit_knobs("swin", [(14, 14)], dim=DIM, heads=HEADS) == {}
    fitted = attentions.fit_knobs("swin", [(8, 8)], dim=DIM, heads=HEADS, knobs={"window": 7, "shift": True})
    assert fitted == {"window": 4, "shift": True}
    with pytest.raises(attentions.KnobError, match="divisible by heads"):
        attentions.fit_knobs("full", [(8, 8)], dim=30, heads=4)  # no knob changes the widths


@pytest.mark.parametrize("name", attentions.available())
def test_reference_is_exact_in_float64(name):
    # float64 inputs stay float64 on the reference path (no float32 step inside), so gradcheck holds
    hw = (4, 4)
    knobs = attentions.fit_knobs(name, [hw], dim=8, heads=2, knobs=supported_point(name)[0])
    torch.manual_seed(0)
    module = attentions.build(name, dim=8, heads=2, impl="reference", **knobs).double()
    x, *rest = module.example_inputs(1, hw, dtype=torch.float64, cross=modes(name)[0] == "cross")
    assert module(x, *rest).dtype == torch.float64
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: module(t, *rest), (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
