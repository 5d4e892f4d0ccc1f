"""Maps of any rank: (T, H, W) clips in the attention contract.

- a one-frame clip gives exactly the image output, for every mechanism that takes time;
- the mechanisms that do not take time refuse a clip with their reason;
- the 3-D pooling (MViTv2 video) and 3-D window attention (Video Swin) against small float64
  references written here from the papers' equations (dense, not decomposed or partitioned),
  outputs and gradients;
- the counters (fvcore with bench.flops' handles, FlopCounterMode) agree with the analytic counts
  on clips, with nothing uncovered.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from attnbench.bench.flops import count

from attnbench import attentions

TIME = [n for n in attentions.available() if attentions.get(n).time.supported]
# The (T, H, W) configurations checked below: knobs that reach every 3-D code path.
CLIP_CASES = [
    ("full", {}),
    ("linear", {}),
    ("pooling", {"stride_q": 2, "stride_kv": 2}),
    ("pooling", {"kernel_t": 3, "stride_q_t": 2, "stride_kv_t": 2, "rel_pos_frames": 4, "stride_kv": 2}),
    ("pooling", {"mode": "avg", "kernel_t": 3, "stride_kv_t": 2, "rel_pos": False}),
    ("swin", {"window": 4}),
    ("swin", {"window": 4, "window_t": 2, "shift": True}),
    ("swin", {"window": 3, "window_t": 2, "shift": True, "pad": True}),
    ("pvt", {"sr_ratio": 2}),
    ("pvt", {"sr_ratio": 2, "sr_ratio_t": 2}),
    ("pvt", {"version": "v2", "pool_size": 2}),
]


def test_the_time_declarations():
    assert {"full", "linear", "pooling", "swin", "pvt"} <= set(TIME)
    for name in ("quadtree", "deformable", "cross"):
        reasons = attentions.not_supported_reasons(name, dim=32, heads=2, hw=(4, 16, 16))
        assert reasons and "takes no time axis" in reasons[0], (name, reasons)
        assert attentions.get(name).time.why_not in reasons[0]
        assert attentions.not_supported_reasons(name, dim=32, heads=2, hw=(16, 16)) == []
    assert attentions.get("swin").describe()["time"].startswith("Video Swin")


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("full", {}),
        ("linear", {}),
        ("pooling", {}),
        ("pooling", {"stride_q": 2, "stride_kv": 2, "dim_out": 48}),
        ("swin", {"window": 4}),
        ("swin", {"window": 4, "shift": True}),
        ("swin", {"window": 3, "shift": True, "pad": True}),
        ("pvt", {}),
        ("pvt", {"version": "v2", "pool_size": 3}),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_a_one_frame_clip_is_the_image_exactly(name, knobs, impl):
    torch.manual_seed(0)
    m = attentions.build(name, dim=32, heads=2, impl=impl, **knobs)
    x, _ = m.example_inputs(2, (8, 8))
    assert torch.equal(m(x, (8, 8)), m(x, (1, 8, 8)))
    assert m.macs(2, (8, 8)) == m.macs(2, (1, 8, 8))


def test_a_one_frame_clip_of_a_video_swin_reads_the_centre_slice_of_its_table():
    torch.manual_seed(0)
    video = attentions.build("swin", dim=32, heads=2, window=4, window_t=3, shift=True, impl="reference")
    image = attentions.build("swin", dim=32, heads=2, window=4, shift=True, impl="reference")
    image.load_state_dict(video.state_dict() | {"table": video.table.view(5, 49, 2)[2]})  # dt = 0: row Wt - 1
    x, _ = image.example_inputs(2, (8, 8))
    torch.testing.assert_close(video(x, (1, 8, 8)), image(x, (8, 8)), rtol=0, atol=1e-6)


# (knobs, image): shifted by M // 2 and by shift_size, padded, and a window shrunk to the map (m = 4 < M = 5).
SWIN_IMAGES = [
    ({"window": 4}, (8, 8)),
    ({"window": 4, "shift": True}, (8, 8)),
    ({"window": 4, "shift": True, "shift_size": 1}, (8, 12)),
    ({"window": 3, "shift": True, "pad": True}, (7, 8)),
    ({"window": 5, "shift": True}, (4, 8)),
]


@pytest.mark.parametrize(("knobs", "hw"), SWIN_IMAGES, ids=[f"{k}-{h}x{w}" for k, (h, w) in SWIN_IMAGES])
@pytest.mark.parametrize("window_t", [1, 2, 4])
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_an_image_is_a_one_frame_clip_of_a_video_swin_outputs_and_gradients(knobs, hw, window_t, impl):
    m = _seeded("swin", impl=impl, window_t=window_t, **knobs)  # tables drawn at std 1: every time slice differs
    x, _ = m.example_inputs(2, hw, seed=1)
    image = _grads(lambda x: m(x, hw), m, x)
    clip = _grads(lambda x: m(x, (1, *hw)), m, x)
    assert torch.equal(image[0], clip[0])
    for name, a, b in zip(["x", *dict(m.named_parameters())], image[1], clip[1], strict=True):
        assert torch.equal(a, b), name
    # the table's gradient reaches the time-offset-0 slice and nothing else
    span = (2 * m.knobs.window - 1) ** 2
    table_grad = image[1][1 + list(dict(m.named_parameters())).index("table")].view(2 * window_t - 1, span, 2)
    assert table_grad[window_t - 1].abs().sum() > 0
    assert (table_grad[: window_t - 1] == 0).all() and (table_grad[window_t:] == 0).all()
    assert m.macs(2, hw) == m.macs(2, (1, *hw))


@pytest.mark.parametrize(("knobs", "hw"), SWIN_IMAGES, ids=[f"{k}-{h}x{w}" for k, (h, w) in SWIN_IMAGES])
@pytest.mark.parametrize("window_t", [2, 4])
def test_an_image_reads_the_time_offset_0_slice_of_a_video_swin_table(knobs, hw, window_t):
    torch.manual_seed(0)
    video = attentions.build("swin", dim=32, heads=2, window_t=window_t, **knobs)
    image = attentions.build("swin", dim=32, heads=2, **knobs)
    span = (2 * video.knobs.window - 1) ** 2
    with torch.no_grad():  # slice k (time offset k - Wt + 1) holds 10 k plus a pattern in [0, 1) of its own
        slices = 10.0 * torch.arange(2 * window_t - 1.0)[:, None, None] + torch.rand(2 * window_t - 1, span, 2)
        video.table.copy_(slices.reshape(-1, 2))  # ((2Wt-1)(2M-1)^2, h)
        image.table.copy_(slices[window_t - 1])  # ((2M-1)^2, h): the time-offset-0 slice
    cpu = torch.device("cpu")
    bias = video.window_bias(hw, cpu)  # (nW or 1, h, T, T): relative bias plus 0 or -100
    assert torch.equal(bias, image.window_bias(hw, cpu))
    unmasked = bias > -50
    assert unmasked.any()
    assert ((bias[unmasked] // 10) == window_t - 1).all()  # the slice's constant, dt = 0
    assert torch.equal(video.image_table, slices[window_t - 1])
    # and the clip's: on one frame every pair reads the same rows
    assert torch.equal(bias, video.clip_bias((1, *hw), cpu))


def test_a_one_frame_clip_of_a_video_pooling_is_the_image_with_the_centre_taps():
    torch.manual_seed(0)
    kn = {"stride_q": 2, "stride_kv": 2}
    video = attentions.build("pooling", dim=32, heads=2, kernel_t=3, impl="reference", **kn)
    image = attentions.build("pooling", dim=32, heads=2, impl="reference", **kn)
    state = {k: (v[:, :, 1] if k.startswith("pool_") else v) for k, v in video.state_dict().items()}
    image.load_state_dict(state)  # a padded 3-tap kernel on one frame reads its centre tap only
    x, _ = image.example_inputs(2, (8, 8))
    torch.testing.assert_close(video(x, (1, 8, 8)), image(x, (8, 8)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "knobs"), CLIP_CASES)
@pytest.mark.parametrize("frames", [1, 2, 4])
def test_counted_macs_equal_the_analytic_count_on_clips(name, knobs, frames):
    m = attentions.build(name, dim=16, heads=2, **knobs)
    thw = (frames, 8, 8)
    if m.unsupported(2, thw):
        pytest.skip("; ".join(m.unsupported(2, thw)))
    x, _ = m.example_inputs(2, thw)
    result = count(m, (x, thw))
    assert result.uncovered == {} and result.flop_counter_uncovered == {}
    assert result.macs == pytest.approx(result.analytic_macs, rel=0.01)
    assert result.flop_counter_macs == pytest.approx(result.analytic_macs, rel=0.01)
    assert result.backward_uncovered == {}
    out = m(x, thw)
    assert out.shape == (2, attentions.map_tokens(m.output_hw(thw)), m.output_dim)


def test_swin_refuses_a_clip_its_window_does_not_divide_and_pads_it_on_request():
    m = attentions.build("swin", dim=16, heads=2, window=4, window_t=2)
    assert "multiple of the window's 2" in " ".join(m.unsupported(1, (3, 8, 8)))
    assert attentions.build("swin", dim=16, heads=2, window=4, window_t=2, pad=True).unsupported(1, (3, 8, 8)) == []


# ---------------------------------------------------------------------- float64 references
def _grads(out_fn, module, x, seed=1):
    """Outputs and gradients of a weighted sum w.r.t. x and every parameter (float64)."""
    x = x.clone().requires_grad_(True)
    out = out_fn(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad((out * w).sum(), [x, *params])
    return out.detach(), grads


def _assert_same_function(m, x, thw, reference) -> None:
    """m on the clip and ``reference(m, x, thw)`` agree in float64: outputs, and gradients w.r.t. x and every
    parameter."""
    ours, g_ours = _grads(lambda t: m(t, thw), m, x)
    ref, g_ref = _grads(lambda t: reference(m, t, thw), m, x)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, a, r in zip(names, g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, msg=name)


def _axis_index(q_size: int, k_size: int) -> list[list[int]]:
    """MViTv2's table row of each (query, key) pair along one axis, from the paper: coordinates of the
    coarser axis stretched by the stride ratio, shifted to be non-negative."""
    rq, rk = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    return [[int(i * rq - j * rk + (k_size - 1) * rk) for j in range(k_size)] for i in range(q_size)]


def _pooling_reference(m, x: torch.Tensor, thw: tuple[int, int, int]) -> torch.Tensor:
    """MViTv2 video pooling attention, dense: the bias of every (query, key) pair is q . (R_t + R_h + R_w)
    gathered pair by pair, not decomposed per axis."""
    b, n, c = x.shape
    heads, d = m.heads, m.head_dim

    def split(t):  # (B, N, h*d) -> (B, h, N, d)
        return t.view(b, -1, heads, d).transpose(1, 2)

    q = split(F.linear(x, m.proj.q.weight, m.proj.q.bias))
    k, v = (split(t) for t in F.linear(x, m.proj.kv.weight, m.proj.kv.bias).chunk(2, dim=-1))

    def pool(t, conv, norm):
        maps = t.transpose(-2, -1).reshape(b * heads, d, *thw)  # (B*h, d, T, H, W)
        out = F.conv3d(maps, conv.weight, None, conv.stride, conv.padding, groups=d)
        size = tuple(out.shape[-3:])
        tokens = out.reshape(b, heads, d, -1).transpose(-2, -1)  # (B, h, T'H'W', d)
        return F.layer_norm(tokens, (d,), norm.weight, norm.bias, norm.eps), size

    q, (qt, qh, qw) = pool(q, m.pool_q, m.norm_q)
    k, (kt, kh, kw) = pool(k, m.pool_k, m.norm_k)
    v, _ = pool(v, m.pool_v, m.norm_v)
    it, ih, iw = _axis_index(qt, kt), _axis_index(qh, kh), _axis_index(qw, kw)
    qpos = list(itertools.product(range(qt), range(qh), range(qw)))
    kpos = list(itertools.product(range(kt), range(kh), range(kw)))
    rel = torch.stack(
        [
            torch.stack([m.rel_pos_t[it[a][e]] + m.rel_pos_h[ih[bb][f]] + m.rel_pos_w[iw[cc][g]] for e, f, g in kpos])
            for a, bb, cc in qpos
        ]
    )  # (Nq, Nk, d)
    bias = torch.einsum("bhqd,qkd->bhqk", q, rel)
    probs = torch.softmax(q @ k.transpose(-2, -1) * d**-0.5 + bias, dim=-1)
    o = probs @ v + q  # residual pooling
    return F.linear(o.transpose(1, 2).reshape(b, -1, heads * d), m.proj.out.weight, m.proj.out.bias)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_video_pooling_matches_a_float64_reference_with_gradients(impl):
    torch.manual_seed(0)
    knobs = {"kernel_t": 3, "stride_q": 2, "stride_kv": 2, "stride_kv_t": 2, "rel_pos_size": 8, "rel_pos_frames": 4}
    m = attentions.build("pooling", dim=16, heads=2, impl=impl, **knobs).double()
    for p in m.parameters():  # the tables and norms away from their inits, so every term matters
        torch.nn.init.normal_(p, std=0.3)
    thw = (4, 8, 8)
    x = torch.randn(2, 4 * 8 * 8, 16, dtype=torch.float64)
    _assert_same_function(m, x, thw, _pooling_reference)


def _swin_reference(m, x: torch.Tensor, thw: tuple[int, int, int]) -> torch.Tensor:
    """Video Swin's shifted 3-D windows as dense attention over the padded, rolled clip: a pair attends when
    both tokens lie in one window; the bias is the table row of their (dt, dh, dw); -100 across the regions
    the roll wrapped around (the official compute_mask) or on a padded key."""
    b, n, c = x.shape
    heads, d = m.heads, m.head_dim
    kn = m.knobs
    lay = m.clip_layout(thw)
    win, shift, padded = lay.window, lay.shift, lay.padded
    big_t, big = kn.window_t, kn.window
    q = F.linear(x, m.proj.q.weight, m.proj.q.bias)
    k, v = F.linear(x, m.proj.kv.weight, m.proj.kv.bias).chunk(2, dim=-1)
    rolled = list(itertools.product(*(range(p) for p in padded)))  # positions in the rolled frame
    source = [tuple((p + s) % size for p, s, size in zip(pos, shift, padded, strict=True)) for pos in rolled]
    real = [all(a < t for a, t in zip(src, thw, strict=True)) for src in source]
    flat = [(a * thw[1] + bb) * thw[2] + cc if ok else -1 for (a, bb, cc), ok in zip(source, real, strict=True)]

    def gather(t):  # (B, N, C) -> (B, h, P, d), zeros at padded positions
        t = torch.cat([t, t.new_zeros(b, 1, c)], dim=1)[:, flat]
        return t.view(b, -1, heads, d).transpose(1, 2)

    def region(p, w, s, size):
        return 0 if not s else (0 if p < size - w else (1 if p < size - s else 2))

    P = len(rolled)
    bias = torch.full((heads, P, P), float("-inf"), dtype=x.dtype)
    span = 2 * big - 1
    for i, pi in enumerate(rolled):
        wi = tuple(a // w for a, w in zip(pi, win, strict=True))
        ri = tuple(region(a, w, s, size) for a, w, s, size in zip(pi, win, shift, padded, strict=True))
        for j, pj in enumerate(rolled):
            if tuple(a // w for a, w in zip(pj, win, strict=True)) != wi:
                continue
            dt, dh, dw = (a % w - bb % w for a, bb, w in zip(pi, pj, win, strict=True))
            row = ((dt + big_t - 1) * span + dh + big - 1) * span + dw + big - 1
            rj = tuple(region(a, w, s, size) for a, w, s, size in zip(pj, win, shift, padded, strict=True))
            bias[:, i, j] = m.table[row] + (-100.0 if (ri != rj or not real[j]) else 0.0)
    qh, kh, vh = gather(q), gather(k), gather(v)
    probs = torch.softmax(qh @ kh.transpose(-2, -1) * d**-0.5 + bias, dim=-1)
    o = (probs @ vh).transpose(1, 2).reshape(b, P, c)  # rolled frame
    keep = [i for i in range(P) if real[i]]
    order = torch.tensor([flat[i] for i in keep]).argsort()
    o = o[:, torch.tensor(keep)[order]]  # back to the clip's row-major (t, h, w) order
    return F.linear(o, m.proj.out.weight, m.proj.out.bias)


@pytest.mark.parametrize(
    ("knobs", "thw"),
    [
        ({"window": 3, "window_t": 2, "shift": True}, (4, 6, 6)),
        ({"window": 3, "window_t": 2, "shift": True, "pad": True}, (3, 5, 7)),
        ({"window": 3, "window_t": 4}, (2, 6, 6)),  # a clip shorter than the window: one window of 2 frames
    ],
)
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_video_swin_matches_a_float64_reference_with_gradients(knobs, thw, impl):
    torch.manual_seed(0)
    m = attentions.build("swin", dim=12, heads=2, impl=impl, **knobs).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, attentions.map_tokens(thw), 12, dtype=torch.float64)
    _assert_same_function(m, x, thw, _swin_reference)


def test_the_video_swin_index_is_the_official_layout():
    # relative_coords[..., 0] *= (2Wh-1)(2Ww-1), [..., 1] *= (2Ww-1): the row of (dt, dh, dw) at table (2, 3)
    from attnbench.attentions.relpos import swin_index_3d

    idx = swin_index_3d((2, 3, 3), (2, 3))
    assert idx.shape == (18, 18) and idx.max() == 3 * 5 * 5 - 1 and idx.min() == 0
    assert idx[0, 0] == (1 * 5 + 2) * 5 + 2  # zero offset: the centre row
    assert idx[17, 0] == (2 * 5 + 4) * 5 + 4  # (1, 2, 2) - (0, 0, 0)


@pytest.mark.parametrize("name", ["full", "linear"])
def test_footprints_of_clips_cover_every_frame_and_one_frame_is_the_image(name):
    m = attentions.build(name, dim=16, heads=2)
    x, thw = m.example_inputs(1, (3, 4, 5))
    f = m.footprint(x, thw, (1, 2, 3))
    assert f.shape == (2, 3, 4, 5)
    torch.testing.assert_close(f.sum((1, 2, 3)), torch.ones(2))
    img, _ = m.example_inputs(1, (4, 5))
    assert torch.equal(m.footprint(img, (4, 5), (2, 3)), m.footprint(img, (1, 4, 5), (0, 2, 3))[:, 0])
    with pytest.raises(ValueError, match="0 <= t < 3"):
        m.footprint(x, thw, (3, 0, 0))


def test_every_mechanism_that_takes_time_draws_clip_footprints():
    assert all(attentions.get(n).clip_footprint for n in TIME)
    flat = type("FlatFull", (attentions.get("full"),), {"clip_footprint": False})  # a mechanism that opts out
    m = flat(16, 2, flat.Knobs())
    with pytest.raises(NotImplementedError, match="not of clips"):
        m.footprint(*m.example_inputs(1, (2, 4, 4)), (0, 0, 0))
    q = attentions.build("quadtree", dim=16, heads=2)
    with pytest.raises(attentions.UnsupportedPoint, match="takes no time axis"):
        q.footprint(*q.example_inputs(1, (2, 8, 8)), (0, 0, 0))


# ---------------------------------------------------------------------- footprints of pooled, windowed, reduced clips
def _seeded(name: str, impl: str = "reference", **knobs) -> attentions.Attention:
    """A module (the reference path unless told) with its relative-position tables drawn large enough to matter
    (inits are near 0)."""
    torch.manual_seed(0)
    m = attentions.build(name, dim=16, heads=2, impl=impl, **knobs)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if "table" in pname or "rel_pos" in pname:
                p.normal_()
    return m


def _output_row(m: attentions.Attention, x: torch.Tensor, thw: tuple[int, ...], index: int) -> torch.Tensor:
    """The input of the output projection for output token ``index`` in the forward pass, (h, d)."""
    seen = []
    handle = m.proj.out.register_forward_hook(lambda mod, a, o: seen.append(a[0]))
    with torch.no_grad():
        m(x, thw)
    handle.remove()
    return seen[-1][0, index].view(m.heads, -1)


# (name, knobs, clip): every clip path of the three mechanisms, time pooled, windowed, shifted, padded, reduced.
DRAWN_CLIPS = [
    ("pooling", {"stride_q": 2, "stride_kv": 2}, (3, 8, 8)),
    ("pooling", {"kernel_t": 3, "stride_q_t": 2, "stride_kv_t": 2, "rel_pos_frames": 4, "stride_kv": 2}, (5, 8, 8)),
    ("pooling", {"mode": "max", "kernel_t": 3, "stride_kv_t": 2}, (4, 6, 6)),
    ("pooling", {"mode": "avg", "kernel_t": 3, "stride_kv_t": 2, "stride_kv": 2}, (5, 6, 6)),
    ("swin", {"window": 4, "window_t": 2, "shift": True}, (4, 8, 8)),
    ("swin", {"window": 3, "window_t": 2, "shift": True, "pad": True}, (5, 7, 8)),
    ("pvt", {"sr_ratio": 2}, (3, 8, 8)),
    ("pvt", {"sr_ratio": 2, "sr_ratio_t": 2}, (5, 8, 8)),
    ("pvt", {"version": "v2", "pool_size": 3}, (3, 7, 8)),
]


@pytest.mark.parametrize(("name", "knobs", "clip"), DRAWN_CLIPS)
def test_clip_footprints_sum_to_what_the_weights_sum_to(name, knobs, clip):
    m = _seeded(name, **knobs)
    x, thw = m.example_inputs(1, clip, seed=1)
    fp = m.footprint(x, thw, (clip[0] - 1, 2, 3))
    assert fp.shape == (2, *clip) and (fp >= 0).all()
    total = fp.sum((1, 2, 3))
    if knobs.get("mode") == "avg":
        # AvgPool3d counts the padding: a key whose window hangs over the clip passes on only its pixels' share
        assert (total < 0.99).all() and (total > 0).all()
    else:  # softmax rows, each key spread over pixels by weights summing to 1
        torch.testing.assert_close(total, torch.ones(2))


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("pooling", {}),
        ("pooling", {"stride_q": 2, "stride_kv": 2, "mode": "avg"}),
        ("pooling", {"kernel_t": 3, "stride_q_t": 2, "stride_kv_t": 2, "rel_pos_frames": 4}),
        ("swin", {"window": 3, "shift": True, "pad": True}),
        ("swin", {"window": 4, "shift": True}),
        ("swin", {"window": 4, "window_t": 2, "shift": True}),
        ("swin", {"window": 3, "window_t": 4, "shift": True, "pad": True}),
        ("pvt", {"sr_ratio": 2}),
        ("pvt", {"version": "v2", "pool_size": 3}),
    ],
)
def test_a_one_frame_clip_footprint_is_the_image_footprint(name, knobs):
    m = _seeded(name, **knobs)
    hw = (7, 8) if knobs.get("pad") else (8, 8)
    x, _ = m.example_inputs(1, hw, seed=1)
    clip = m.footprint(x, (1, *hw), (0, 5, 3))
    assert clip.shape == (2, 1, *hw)
    assert torch.equal(clip[:, 0], m.footprint(x, hw, (5, 3)))


@pytest.mark.parametrize(
    ("name", "knobs", "clip"),
    [
        ("swin", {"window": 3, "window_t": 2, "shift": True, "pad": True}, (5, 7, 8)),
        ("pvt", {"sr_ratio": 1}, (4, 6, 6)),
        (
            "pooling",
            {"mode": "avg", "kernel_t": 3, "stride_kv_t": 2, "stride_kv": 2, "residual_pooling": False},
            (5, 6, 6),
        ),
    ],
)
def test_clip_footprints_over_the_pixel_values_give_the_forward(name, knobs, clip):
    # Values here are the pixels' projected values (pooled by an average, whose shares the footprint spreads by),
    # so the footprint applied to them is the query's output before the output projection.
    m = _seeded(name, **knobs)
    x, thw = m.example_inputs(1, clip, seed=1)
    query = (3, 2, 5)
    fp = m.footprint(x, thw, query)  # (h, T, H, W)
    _, v = m.proj.keys_values(x)  # (1, h, N, d)
    expected = torch.einsum("hn,hnd->hd", fp.flatten(1), v[0])
    row = _output_row(m, x, thw, (query[0] * clip[1] + query[1]) * clip[2] + query[2])
    torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-4)


def _window_axis(q: int, size: int, window: int, shift: int) -> torch.Tensor:
    """Positions of one axis in the query's window after rolling by -shift (no padding): (size,) bool."""
    cell = [((a - shift) % size) // window for a in range(size)]
    return torch.tensor([c == cell[q] for c in cell])


def test_video_swin_clip_footprint_lies_in_the_query_s_shifted_3d_window():
    m = _seeded("swin", window=3, window_t=2, shift=True)  # on 4x6x6: windows 2x3x3 rolled by (1, 1, 1)
    x, thw = m.example_inputs(1, (4, 6, 6), seed=1)
    for query in ((1, 1, 1), (0, 0, 0)):
        fp = m.footprint(x, thw, query)
        t, i, j = (_window_axis(a, n, w, 1) for a, n, w in zip(query, (4, 6, 6), (2, 3, 3), strict=True))
        inside = t[:, None, None] & i[None, :, None] & j[None, None, :]  # (T, H, W)
        assert inside.sum() == 18 and (fp[:, ~inside] == 0).all()
        if query == (1, 1, 1):  # frames 1-2, rows and columns 1-3: one region, no wrap-around
            assert (fp[:, inside] > 0).all()
            assert inside[1:3, 1:4, 1:4].all()
        else:  # the window wraps round on every axis; the mask leaves the query alone in its region
            torch.testing.assert_close(fp[:, 0, 0, 0], torch.ones(2))
            assert (fp[:, inside].sum(1) - fp[:, 0, 0, 0]).max() < 1e-30


@pytest.mark.parametrize("mode", ["avg", "conv"])
def test_pooling_clip_footprint_is_the_key_weights_times_the_pooling_kernel(mode):
    from attnbench.attentions.common import split_heads
    from attnbench.attentions.footprint import reference_probs

    kn = {"kernel_t": 3, "stride_q_t": 2, "stride_kv_t": 2, "stride_kv": 2}
    if mode == "avg":
        kn |= {"mode": "avg", "rel_pos": False}
    else:
        kn |= {"rel_pos_frames": 4}
    m = _seeded("pooling", **kn)
    x, thw = m.example_inputs(1, (5, 6, 6), seed=1)
    heads, d, query = m.heads, m.head_dim, (3, 2, 5)

    def pool(grid: torch.Tensor, stride_t: int, stride: int, counted: bool = True) -> torch.Tensor:
        return F.avg_pool3d(grid, 3, stride=(stride_t, stride, stride), padding=1, count_include_pad=counted)

    with torch.no_grad():
        if mode == "avg":  # the weights from the pooled q and k, written out here
            q, (k, _) = split_heads(m.proj.q(x), heads)[0], m.proj.keys_values(x)  # (h, N, d), (1, h, N, d)
            q = pool(q.transpose(1, 2).reshape(heads, d, *thw), 2, 1)[:, :, query[0] // 2, query[1], query[2]]
            k = pool(k[0].transpose(1, 2).reshape(heads, d, *thw), 2, 2).flatten(2)  # (h, d, M)
            weights = torch.softmax(torch.einsum("hd,hdm->hm", q, k) * d**-0.5, dim=-1)  # (h, M)
        else:  # the module's own weights; the pooling is a convolution, spread evenly over pixels inside the clip
            q_thw = m.output_hw(thw)
            probs = reference_probs(m, x, thw, None, None)  # (1, h, Nq, M)
            weights = probs[0, :, (query[0] // 2 * q_thw[1] + query[1]) * q_thw[2] + query[2]]
    # the share of every pixel in every key, by autograd through torch's own pooling
    pixels = torch.zeros(heads, 1, *thw, requires_grad=True)
    (pool(pixels, 2, 2, counted=mode == "avg").flatten(1) * weights).sum().backward()
    fp = m.footprint(x, thw, query)
    torch.testing.assert_close(fp, pixels.grad[:, 0], atol=1e-6, rtol=1e-5)
    assert (fp[:, 0] > 0).any() and (fp[:, 4] > 0).any()  # a 3-frame kernel of stride 2 reaches both ends


def test_pvt_clip_footprint_stays_in_the_frames_each_key_is_reduced_from():
    from attnbench.attentions.footprint import reference_probs

    for rt in (1, 2):
        m = _seeded("pvt", sr_ratio=2, sr_ratio_t=rt)
        x, thw = m.example_inputs(1, (5, 8, 8), seed=1)
        fp = m.footprint(x, thw, (4, 3, 5))  # (h, 5, 8, 8)
        probs = reference_probs(m, x, thw, None, None)[0, :, (4 * 8 + 3) * 8 + 5]  # (h, M): 16 keys a key frame
        per_key_frame = probs.view(2, -1, 16).sum(-1)  # (h, T')
        cells = fp.view(2, 5, 4, 2, 4, 2)
        assert torch.equal(cells, cells[:, :, :, :1, :, :1].expand_as(cells))  # a key is a whole 2x2 cell
        if rt == 1:  # frames reduced one by one: each frame holds its own keys' weight
            torch.testing.assert_close(fp.sum((2, 3)), per_key_frame)
            assert (fp > 0).all()
        else:  # pairs of frames reduced together; frame 4 is past the last pair, no key reads it
            assert (fp[:, 4] == 0).all() and (fp[:, :4] > 0).all()
            assert torch.equal(fp[:, 0], fp[:, 1]) and torch.equal(fp[:, 2], fp[:, 3])
            torch.testing.assert_close(fp[:, :4].sum((2, 3)).view(2, 2, 2).sum(-1), per_key_frame)
