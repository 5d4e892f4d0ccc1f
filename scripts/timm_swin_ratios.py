"""Our swin fast path against timm's Swin window attention with the same weights (docs/performance.md).

timm is optional (not a dependency of attnbench): without it this script says so and exits with status 0.

For each map side, window shift (off, on) and pass, ours (``attentions.build("swin", impl="fast")``) and
timm's attention part of a Swin block are built with the same weights: timm's ``SwinTransformerBlock``
(roll by -S, partition, ``WindowAttention`` with the region mask, reverse, roll back; the block's norms and
MLP are built but not run) with its ``WindowAttention``'s qkv, projection and bias table copied from ours.
Both are first checked to compute the same function in float64 (output, input gradient and every weight
gradient); then they are timed in float32 at one thread in alternating blocks of calls (A B, B A, ...) by
the harness's CPU timer (``bench.measure.block_seconds``, as ``scripts/fast_ratios.py``), ``--rounds``
times, each round giving one ratio ours/timm. Printed: the median ratio, the p20..p80 spread of the rounds'
ratios, both medians in ms and the load average. Below 1: ours is faster.

timm's ``WindowAttention`` computes softmax(q k^T + bias + mask) v by hand unless its ``fused_attn`` flag is
set (timm sets it for this module only when ``TIMM_FUSED_ATTN=2``); ``--timm-fused`` times timm's SDPA path.

    python scripts/timm_swin_ratios.py [--sizes 16,24,32,48,64] [--window 8] [--rounds 9] [--block-s 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: fast_ratios' interleaved ratio


def timm_window_attention() -> tuple[Any, str] | str:
    """timm's Swin block class and version, or why timm cannot be imported here."""
    try:
        import timm
        from timm.models.swin_transformer import SwinTransformerBlock
    except Exception as exc:  # not installed, or its own imports (torchvision) fail
        return f"{type(exc).__name__}: {exc}"
    return SwinTransformerBlock, timm.__version__


class TimmShiftedWindows:
    """timm's attention part of a Swin block on our token layout: (B, H*W, C) in and out."""

    def __init__(self, block_cls: Any, ours: Any, hw: tuple[int, int], fused: bool):
        import torch

        m = ours.knobs.window
        shift = (ours.knobs.shift_size or m // 2) if ours.knobs.shift else 0
        self.block = block_cls(ours.dim, input_resolution=hw, num_heads=ours.heads, window_size=m, shift_size=shift)
        self.block.attn.fused_attn = fused
        self.hw = hw
        attn = self.block.attn
        with torch.no_grad():
            attn.relative_position_bias_table.copy_(ours.table)
            attn.qkv.weight.copy_(torch.cat([ours.proj.q.weight, ours.proj.kv.weight]))
            attn.qkv.bias.copy_(torch.cat([ours.proj.q.bias, ours.proj.kv.bias]))
            attn.proj.load_state_dict(ours.proj.out.state_dict())

    def parameters(self) -> list[Any]:
        return list(self.block.attn.parameters())

    def to(self, dtype: Any) -> TimmShiftedWindows:
        self.block.to(dtype=dtype)
        return self

    def __call__(self, x: Any, hw: tuple[int, int]) -> Any:
        b, n, c = x.shape
        return self.block._attn(x.view(b, hw[0], hw[1], c)).reshape(b, n, c)


def _grads(module: Any, params: list[Any], x: Any, hw: tuple[int, int], g: Any) -> list[Any]:
    x = x.detach().clone().requires_grad_(True)
    for p in params:
        p.grad = None
    out = module(x, hw)
    out.backward(g)
    return [out.detach(), x.grad, *[p.grad for p in params]]


def parity(block_cls: Any, hw: tuple[int, int], window: int, shift: bool, fused: bool) -> float:
    """The largest relative difference between ours and timm in float64: output, input and weight gradients."""
    import torch

    from attnbench import attentions

    torch.manual_seed(0)
    ours = attentions.build("swin", dim=96, heads=3, window=window, shift=shift, impl="fast").double()
    peer = TimmShiftedWindows(block_cls, ours, hw, fused).to(torch.float64)
    x = torch.randn(2, hw[0] * hw[1], 96, dtype=torch.float64)
    g = torch.randn_like(x)
    theirs_params = [peer.block.attn.qkv.weight, peer.block.attn.qkv.bias, peer.block.attn.proj.weight]
    theirs_params += [peer.block.attn.proj.bias, peer.block.attn.relative_position_bias_table]
    a = _grads(ours, [ours.proj.q.weight, ours.proj.kv.weight, ours.proj.q.bias, ours.proj.kv.bias], x, hw, g)
    a += [ours.proj.out.weight.grad, ours.proj.out.bias.grad, ours.table.grad]
    b = _grads(peer, theirs_params, x, hw, g)
    pairs = [
        (a[0], b[0]),  # output
        (a[1], b[1]),  # input gradient
        (torch.cat([a[2], a[3]]), b[2]),  # qkv weight
        (torch.cat([a[4], a[5]]), b[3]),  # qkv bias
        (a[6], b[4]),  # projection weight
        (a[7], b[5]),  # projection bias
        (a[8], b[6]),  # bias table
    ]
    return max(float((q - p).norm() / p.norm().clamp_min(1e-300)) for p, q in pairs)


class _Work:
    """One pass of a module on fixed inputs, as the harness runs it: fwd under no_grad, fwd+bwd from a fixed
    output gradient into the parameters and the input."""

    def __init__(self, module: Any, params: list[Any], x: Any, hw: tuple[int, int], train: bool):
        import torch

        self.leaves = [*params, x] if train else []
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

        def step() -> Any:
            if not train:
                with torch.no_grad():
                    return module(x, hw)
            out = module(x, hw)
            out.backward(g)
            return out

        self.step = step

    def zero_grads(self) -> None:
        for t in self.leaves:
            t.grad = None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,24,32,48,64")
    ap.add_argument("--window", type=int, default=8, help="the window side M (it must divide every map side)")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--block-s", type=float, default=0.05)
    ap.add_argument("--timm-fused", action="store_true", help="time timm's SDPA path (fused_attn) instead")
    ap.add_argument("--json")
    args = ap.parse_args()
    found = timm_window_attention()
    if isinstance(found, str):
        print(f"skipped: timm is not importable here ({found}); pip install timm to compare", file=sys.stderr)
        return 0
    block_cls, version = found

    import torch
    from fast_ratios import ratio

    from attnbench import attentions

    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    bad = [s for s in sizes if s % args.window]
    if bad:
        ap.error(f"--window {args.window} does not divide the map sides {bad}")
    print(f"timm {version}, timm fused_attn {args.timm_fused}, window {args.window}, dim 96, 3 heads, 1 thread")
    print(f"load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}  (1 and 5 min)", flush=True)
    rows = []
    for side in sizes:
        hw = (side, side)
        for shift in (False, True):
            error = parity(block_cls, hw, args.window, shift, args.timm_fused)
            if error > 1e-10:
                print(f"{side}x{side} shift {shift}: ours and timm differ (relative {error:.2e}); not timed")
                return 1
            for pass_ in args.passes.split(","):
                train = pass_ == "fwd+bwd"
                torch.manual_seed(0)
                ours = attentions.build("swin", dim=96, heads=3, window=args.window, shift=shift, impl="fast")
                peer = TimmShiftedWindows(block_cls, ours, hw, args.timm_fused)
                ours.train(train)
                peer.block.train(train)
                x = torch.randn(1, side * side, 96, generator=torch.Generator().manual_seed(0))
                x.requires_grad_(train)
                a = _Work(peer, peer.parameters(), x, hw, train)
                b = _Work(ours, list(ours.parameters()), x, hw, train)
                r = ratio(a, b, args.rounds, args.block_s)  # b over a: ours / timm
                row = {"hw": f"{side}x{side}", "shift": shift, "pass": pass_, "parity": error, **r}
                row["load"] = os.getloadavg()[0]
                rows.append(row)
                print(
                    f"{row['hw']:6s} shift {str(shift):5s} {pass_:8s} ours/timm {r['ratio']:.3f} "
                    f"[{r['p20']:.3f}..{r['p80']:.3f}]  timm {r['a_ms']:.3f} ms, ours {r['b_ms']:.3f} ms  "
                    f"parity {error:.1e}  load {row['load']:.2f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
