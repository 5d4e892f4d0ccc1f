"""FlexAttention paths (impl="flex") of swin and pooling against their float32 references.

On CUDA flex attention is one compiled kernel. On the CPU torch 2.13 runs its
unfused reference and its public entry refuses a backward pass, so the modules
declare the CPU unsupported; the CPU parity tests below lift that refusal
(``allow_cpu_backward``) to run torch's own dense backward of flex attention,
which checks what attnbench writes: the window layout, the block mask, the
score_mods reading the bias table and MViTv2's decomposed terms, and the
gradients that reach the table and the terms through them.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from attnbench.attentions.testing import OUTPUT_TOLERANCE, TOLERANCE, assert_parity, outputs_and_grads, rel_error

from attnbench import attentions

flex_api = pytest.importorskip("torch.nn.attention.flex_attention")
from attnbench.attentions.kernels import flex  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def allow_cpu_backward(monkeypatch):
    """Let flex attention differentiate on the CPU through torch's dense reference backward."""
    monkeypatch.setattr(flex_api, "_validate_device", lambda *tensors: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        yield


BUILD = dict(dim=32, heads=2)


# ---------------------------------------------------------------------- swin
SWIN = [
    ((8, 12), dict(window=4)),  # 6 windows, no mask
    ((8, 12), dict(window=4, shift=True)),  # region mask of the shifted windows
    ((7, 10), dict(window=3, shift=True, pad=True)),  # padded keys and shifted regions
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("hw", "knobs"), SWIN, ids=[f"{h}x{w}-{k}" for (h, w), k in SWIN])
def test_swin_flex_matches_reference(build, allow_cpu_backward, hw, knobs, dtype):
    module = build("swin", **knobs)
    args = module.example_inputs(2, hw, device=DEVICE)
    assert_parity(module.to(DEVICE), "flex", dtype, args)


@pytest.mark.parametrize(("hw", "knobs"), [((5, 9), dict(window=7, pad=True)), ((12, 6), dict(window=6, shift=True))])
def test_swin_flex_small_map_and_single_column_of_windows(build, allow_cpu_backward, hw, knobs):
    # (5, 9) shrinks the window to 5 (central rows of the table) and pads W to 10
    module = build("swin", **knobs)
    args = module.example_inputs(2, hw, device=DEVICE)
    assert_parity(module.to(DEVICE), "flex", torch.float32, args)


@pytest.mark.parametrize(("hw", "knobs"), SWIN, ids=[f"{h}x{w}-{k}" for (h, w), k in SWIN])
@pytest.mark.parametrize("window_t", [2, 4])
def test_swin_flex_on_an_image_is_the_reference_on_a_one_frame_clip(build, allow_cpu_backward, hw, knobs, window_t):
    # The flex path takes images only: with a Video Swin table it must read the time-offset-0 slice, as the
    # reference does on a (1, H, W) clip. Tables drawn at std 1 so that a wrong slice shows above the tolerance.
    module = build("swin", window_t=window_t, **knobs).to(DEVICE)
    with torch.no_grad():
        module.table.normal_()
    ref = copy.deepcopy(module)
    module.impl, ref.impl = "flex", "reference"
    x, _ = module.example_inputs(2, hw, device=DEVICE)
    actual = outputs_and_grads(module, (x.clone().requires_grad_(True), hw))
    expected = outputs_and_grads(ref, (x.clone().requires_grad_(True), (1, *hw)))
    assert actual.keys() == expected.keys() and "grad table" in expected
    errors = {name: rel_error(actual[name], expected[name]) for name in expected}
    assert errors.pop("output") <= OUTPUT_TOLERANCE[torch.float32]
    assert max(errors.values()) <= TOLERANCE[torch.float32], errors


def test_swin_flex_never_builds_the_bias(build, allow_cpu_backward, monkeypatch):
    module = build("swin", window=4, shift=True, impl="flex")

    def forbidden(*args, **kwargs):
        raise AssertionError("the flex path must not materialise the (nW, h, T, T) bias")

    monkeypatch.setattr(module, "window_bias", forbidden)
    x, hw = module.example_inputs(1, (8, 8), device=DEVICE)
    module.to(DEVICE)(x, hw).sum().backward()
    assert module.table.grad is not None and module.table.grad.abs().sum() > 0


def test_swin_block_masks_are_cached_per_resolution(build, allow_cpu_backward):
    module = build("swin", window=4, impl="flex")
    for hw in [(8, 8), (8, 12), (8, 8)]:
        module(*module.example_inputs(1, hw))
    assert len(module._flex_cache) == 2
    first = module._flex_cache[((8, 8), "cpu")][0]
    module(*module.example_inputs(1, (8, 8)))
    assert module._flex_cache[((8, 8), "cpu")][0] is first


@pytest.mark.parametrize(("windows", "tokens"), [(1, 49), (6, 16), (64, 49), (30, 9), (3, 200), (16, 64)])
def test_window_block_pairs_are_the_pairs_of_the_visited_blocks(windows, tokens):
    from attnbench.bench.flops import flex_attention_macs

    mask = flex.window_block_mask(windows, tokens, torch.device("cpu"))
    length = windows * tokens
    counted = flex_attention_macs((1, 1, length, 1), (1, 1, length, 1), mask) // 2
    assert flex.window_block_pairs(windows, tokens) == counted
    assert counted >= windows * tokens * tokens  # every pair of every window, and more across block edges


def test_swin_flex_macs_count_the_visited_blocks(build):
    module = build("swin", window=7, impl="flex")
    exact = build("swin", window=7).macs(2, (56, 56))
    # 64 windows of 49 tokens: 3136 tokens in 25 query blocks, each visiting 1 or 2 key blocks
    pairs = flex.window_block_pairs(64, 49)
    projections = 2 * 4 * 3136 * 32 * 32
    assert module.macs(2, (56, 56)) == projections + 2 * 2 * pairs * 2 * 16
    assert module.macs(2, (56, 56)) > exact


# ---------------------------------------------------------------------- pooling
POOLING = [
    ((8, 12), dict(rel_pos_size=16)),  # MViTv2 defaults: conv pooling, stride_kv 4, decomposed relative position
    ((9, 14), dict(stride_q=2, stride_kv=2, rel_pos_size=16)),  # odd map, strided queries, stretched coordinates
    ((8, 12), dict(mode="avg", rel_pos_size=8)),  # tables resized to the map
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("hw", "knobs"), POOLING, ids=[f"{h}x{w}-{k}" for (h, w), k in POOLING])
def test_pooling_flex_matches_reference(build, allow_cpu_backward, hw, knobs, dtype):
    module = build("pooling", **knobs)
    args = module.example_inputs(2, hw, device=DEVICE)
    assert_parity(module.to(DEVICE), "flex", dtype, args)


def test_pooling_flex_without_relative_position(build, allow_cpu_backward):
    module = build("pooling", mode="max", stride_kv=2, rel_pos=False)
    args = module.example_inputs(2, (7, 10), device=DEVICE)
    assert_parity(module.to(DEVICE), "flex", torch.float32, args)


def test_pooling_flex_never_builds_the_bias(build, allow_cpu_backward, monkeypatch):
    import attnbench.attentions.pooling as pooling_module

    def forbidden(*args, **kwargs):
        raise AssertionError("the flex path must not materialise the (Nq, Nk) bias")

    monkeypatch.setattr(pooling_module, "mvit_bias", forbidden)
    module = build("pooling", rel_pos_size=16, impl="flex")
    x, hw = module.example_inputs(1, (8, 8), device=DEVICE)
    module.to(DEVICE)(x, hw).sum().backward()
    assert module.rel_pos_h.grad.abs().sum() > 0 and module.rel_pos_w.grad.abs().sum() > 0


def test_pooling_flex_macs_are_the_reference_pairs(build):
    module = build("pooling", rel_pos_size=16, impl="flex")
    assert module.macs(2, (16, 16)) == build("pooling", rel_pos_size=16).macs(2, (16, 16))


# ---------------------------------------------------------------------- full attention with a bias
FULL = [
    ((6, 9), dict(bias_table=9)),  # relative-position bias read by the score_mod, non-square map
    ((5, 5), dict(bias_table=7)),  # a map smaller than the table: its centre offsets only
    ((4, 6), dict()),  # no bias: plain flex attention
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("hw", "knobs"), FULL, ids=[f"{h}x{w}-{k}" for (h, w), k in FULL])
def test_full_flex_matches_reference(build, allow_cpu_backward, hw, knobs, dtype):
    module = build("full", **knobs)
    args = module.example_inputs(2, hw, device=DEVICE)
    assert_parity(module.to(DEVICE), "flex", dtype, args)


def test_full_flex_never_builds_the_bias(build, allow_cpu_backward, monkeypatch):
    module = build("full", bias_table=8, impl="flex")
    x, hw = module.example_inputs(1, (8, 8))
    expected = build("full", bias_table=8, impl="reference")(x, hw)

    def refuse(*args, **kwargs):
        raise AssertionError("the flex path built the (h, N, N) bias")

    monkeypatch.setattr(type(module), "bias", refuse)
    torch.testing.assert_close(module(x, hw), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", ["swin", "pooling", "full"])
def test_cpu_is_refused_with_the_fix(build, name):
    if flex.cpu_backward():
        pytest.skip("this torch differentiates flex attention on the CPU")
    module = build(name, impl="flex")
    x, hw = module.example_inputs(1, (8, 8))
    (reason,) = [r for r in module.unsupported(1, hw, device="cpu") if "flex" in r]
    assert "CUDA" in reason and "impl='fast'" in reason
    with pytest.raises(attentions.UnsupportedPoint, match="CUDA"):
        module(x, hw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("name", "hw", "knobs"),
    [
        ("swin", (56, 56), dict(window=7, shift=True)),
        ("pooling", (56, 56), dict()),
        ("full", (32, 32), dict(bias_table=32)),
    ],
)
def test_gpu_compiled_flex_matches_reference(build, name, hw, knobs):
    module = build(name, **knobs)
    args = module.example_inputs(2, hw, device="cuda")
    assert_parity(module.cuda(), "flex", torch.bfloat16, args)
