"""timm's equivalents of our mechanisms, as peers to time beside ours (where timm is importable).

    ATTNBENCH_PLUGINS=attentions.peers attnbench sweep --mechanism timm_swin --impl timm ...
    python -m attnbench.attentions.peers --device cuda --out parity.json     # the parity check, first

Each peer is registered under ``timm_<ours>`` with our mechanism's knobs, and
runs the module that timm users run: ViT's ``Attention`` (full), Swin's
``WindowAttention`` (swin, windows without shift), PVTv2's ``Attention`` (pvt, v1
spatial reduction or v2 linear SRA), MViTv2's ``MultiScaleAttention`` (pooling)
and CrossViT's ``CrossAttention`` inside our CrossViT fusion (cross). A peer is
built by building ours first and copying its weights into timm's module, so a
peer and ours built from the same seed compute the same function: the parity
check builds both and compares them. Counts (``macs``), refusals and inputs are
ours (a twin of our mechanism held beside the peer, not a submodule), plus the
peer's own refusals (a knob timm's module lacks). Importing this module without
timm registers nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Any, ClassVar

import torch
from torch import nn

from .base import _REGISTRY, HW, Attention, TimeAxis, build, get, register


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # an import error, or a timm whose own imports fail (torchvision)
        return False
    return True


class Peer(Attention):
    """A timm module behind our interface; subclasses name ``ours`` and build and fill ``self.peer``."""

    ours: ClassVar[str]
    peer: Any  # timm's module
    knobs: Any  # our mechanism's knob dataclass
    impls = ("timm",)
    default_impl = "timm"
    supports_cross = False
    time = TimeAxis(why_not="timm's modules take images only")

    def __init__(self, dim: int, heads: int, knobs: Any, impl: str | None = None):
        twin = build(self.ours, dim=dim, heads=heads, **knobs.as_dict())  # built first: the weights to copy
        object.__setattr__(self, "_twin", twin)  # not a submodule: its parameters are not the peer's
        super().__init__(dim, heads, knobs, impl)
        self.peer = self.make_peer()
        with torch.no_grad():
            self.copy_weights(twin)

    def make_peer(self) -> nn.Module:
        raise NotImplementedError

    def copy_weights(self, ours: Any) -> None:
        raise NotImplementedError

    def peer_reasons(self, hw: HW) -> list[str]:
        """What timm's module cannot do at this point (beyond our own refusals)."""
        return []

    # Ours decides counts, shapes and refusals.
    @property
    def twin(self) -> Any:
        return self.__dict__["_twin"]

    @property
    def output_dim(self) -> int:
        return self.twin.output_dim

    @property
    def context_dim(self) -> int:
        return self.twin.context_dim

    @property
    def context_prefix_tokens(self) -> int:
        return self.twin.context_prefix_tokens

    def default_context_hw(self, hw: HW) -> HW:
        return self.twin.default_context_hw(hw)

    def output_hw(self, hw: HW) -> HW:
        return self.twin.output_hw(hw)

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        return self.twin.macs(batch, hw, context_hw)

    def _unsupported(
        self, batch: int, hw: HW, context_hw: HW | None, *, dtype: torch.dtype | None, device: Any
    ) -> list[str]:
        reasons = self.twin._unsupported(batch, hw, context_hw, dtype=dtype, device=device)
        return reasons + [f"{self.name}: {r}" for r in self.peer_reasons(hw)]


def _peer_class(ours: str, doc: str) -> Any:
    """The class attributes a peer shares with our mechanism."""
    cls = get(ours)

    def decorate(peer: type[Peer]) -> type[Peer]:
        peer.ours = ours
        peer.name = f"timm_{ours}"
        peer.Knobs = cls.Knobs
        peer.cost_knob = cls.cost_knob
        peer.complexity = cls.complexity
        peer.requires_context = cls.requires_context
        peer.supports_cross = cls.requires_context
        peer.prefix_tokens = cls.prefix_tokens
        peer.summary = f"timm's {doc}, beside our {ours} (weights copied from ours)"
        return peer

    return decorate


def _qkv(ours: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our q and kv projections as one fused qkv weight (and bias): rows [q | k | v], each heads-major."""
    p = ours.proj
    weight = torch.cat([p.q.weight, p.kv.weight])
    bias = None if p.q.bias is None else torch.cat([p.q.bias, p.kv.bias])
    return weight, bias


def _copy(dst: nn.Module, src: nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


def _load_qkv(linear: nn.Linear, ours: Any) -> None:
    weight, bias = _qkv(ours)
    linear.weight.copy_(weight)
    if linear.bias is not None and bias is not None:
        linear.bias.copy_(bias)


class TimmFull(Peer):
    def make_peer(self) -> nn.Module:
        from timm.layers import Attention as VitAttention

        return VitAttention(self.dim, num_heads=self.heads, qkv_bias=self.knobs.qkv_bias)

    def copy_weights(self, ours: Any) -> None:
        _load_qkv(self.peer.qkv, ours)
        _copy(self.peer.proj, ours.proj.out)

    def peer_reasons(self, hw: HW) -> list[str]:
        if self.knobs.bias_table:
            return ["timm's ViT Attention has no relative-position bias: set bias_table=0"]
        return []

    def _forward(self, x: torch.Tensor, hw: HW, context: Any, context_hw: Any) -> torch.Tensor:
        return self.peer(x)  # (B, N, C)


class TimmSwin(Peer):
    def make_peer(self) -> nn.Module:
        from timm.models.swin_transformer import WindowAttention

        m = self.knobs.window
        return WindowAttention(self.dim, num_heads=self.heads, window_size=(m, m), qkv_bias=self.knobs.qkv_bias)

    def copy_weights(self, ours: Any) -> None:
        self.peer.relative_position_bias_table.copy_(ours.image_table)  # the rows an image reads (any window_t)
        _load_qkv(self.peer.qkv, ours)
        _copy(self.peer.proj, ours.proj.out)

    def peer_reasons(self, hw: HW) -> list[str]:
        m, reasons = self.knobs.window, []
        if self.knobs.shift or self.knobs.pad:
            reasons.append("the peer runs timm's windows without shift or padding: set shift=false and pad=false")
        if min(hw) < m:
            reasons.append(f"timm's window {m} is larger than the {hw[0]}x{hw[1]} map")
        return reasons

    def _forward(self, x: torch.Tensor, hw: HW, context: Any, context_hw: Any) -> torch.Tensor:
        b, _, c = x.shape
        (h, w), m = hw, self.knobs.window
        win = x.view(b, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5)  # (B, gh, gw, m, m, C)
        out = self.peer(win.reshape(-1, m * m, c))  # (B*gh*gw, m*m, C)
        out = out.view(b, h // m, w // m, m, m, c).permute(0, 1, 3, 2, 4, 5)  # (B, gh, m, gw, m, C)
        return out.reshape(b, h * w, c)


class TimmPVT(Peer):
    def make_peer(self) -> nn.Module:
        from timm.models.pvt_v2 import Attention as PvtAttention

        v2 = self.knobs.version == "v2"
        sr = 1 if v2 else self.knobs.sr_ratio
        return PvtAttention(self.dim, num_heads=self.heads, sr_ratio=sr, linear_attn=v2, qkv_bias=self.knobs.qkv_bias)

    def copy_weights(self, ours: Any) -> None:
        _copy(self.peer.q, ours.proj.q)
        _copy(self.peer.kv, ours.proj.kv)
        _copy(self.peer.proj, ours.proj.out)
        if self.peer.sr is not None:
            _copy(self.peer.sr, ours.sr)
            _copy(self.peer.norm, ours.norm)
            self.peer.norm.eps = ours.norm.eps

    def peer_reasons(self, hw: HW) -> list[str]:
        if self.knobs.version == "v2" and self.knobs.pool_size != 7:
            return ["timm's PVTv2 linear SRA pools to 7x7: set pool_size=7"]
        return []

    def _forward(self, x: torch.Tensor, hw: HW, context: Any, context_hw: Any) -> torch.Tensor:
        return self.peer(x, list(hw))  # (B, N, C)


class TimmPooling(Peer):
    """MViTv2's attention from timm. timm sizes its relative-position tables for one map at construction; the
    peer keeps ours (sized for ``rel_pos_size``) and hands timm's module the tables resized for each map, as
    MViTv2's official code and ours do."""

    def make_peer(self) -> nn.Module:
        from timm.models.mvitv2 import MultiScaleAttention

        k = self.knobs
        size = k.rel_pos_size
        peer = MultiScaleAttention(
            self.dim, self.output_dim, feat_size=(size, size), num_heads=self.heads, qkv_bias=k.qkv_bias,
            mode=k.mode if k.mode != "none" else "conv", kernel_q=(3, 3), kernel_kv=(3, 3),
            stride_q=(k.stride_q, k.stride_q), stride_kv=(k.stride_kv, k.stride_kv), has_cls_token=False,
            rel_pos_type="spatial" if k.rel_pos else "none", residual_pooling=k.residual_pooling,
            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        )  # fmt: skip
        if k.rel_pos:
            del peer.rel_pos_h, peer.rel_pos_w  # replaced at each call by self.rel_pos_h/w resized to the map
        return peer

    def copy_weights(self, ours: Any) -> None:
        _load_qkv(self.peer.qkv, ours)
        _copy(self.peer.proj, ours.proj.out)
        for part in ("q", "k", "v"):
            pool, norm = getattr(ours, f"pool_{part}"), getattr(ours, f"norm_{part}")
            if isinstance(pool, nn.Conv2d):
                _copy(getattr(self.peer, f"pool_{part}"), pool)
            if norm is not None:
                target = getattr(self.peer, f"norm_{part}")
                target.weight.copy_(norm.weight)
                # our keys' norm has no additive bias (softmax ignores it); timm's is zero then
                target.bias.copy_(norm.bias if norm.bias is not None else torch.zeros_like(target.bias))
        if self.knobs.rel_pos:
            self.rel_pos_h = nn.Parameter(ours.rel_pos_h.detach().clone())  # (L, d)
            self.rel_pos_w = nn.Parameter(ours.rel_pos_w.detach().clone())  # (L, d)

    def peer_reasons(self, hw: HW) -> list[str]:
        if self.knobs.mode == "none":
            return ["timm's MViTv2 attention always pools: choose mode 'conv', 'avg' or 'max'"]
        return []

    def _forward(self, x: torch.Tensor, hw: HW, context: Any, context_hw: Any) -> torch.Tensor:
        if self.knobs.rel_pos:
            from .relpos import resize_table

            (qh, qw), (kh, kw) = self.output_hw(hw), self.twin.kv_hw(hw)
            self.peer.rel_pos_h = resize_table(self.rel_pos_h, 2 * max(qh, kh) - 1)  # (2 max(qh, kh) - 1, d)
            self.peer.rel_pos_w = resize_table(self.rel_pos_w, 2 * max(qw, kw) - 1)  # (2 max(qw, kw) - 1, d)
        out, _ = self.peer(x, list(hw))  # (B, Nq, C_out)
        return out


class TimmCross(Peer):
    """CrossViT's CrossAttention from timm as the attention of our CrossViT fusion: the CLS projected to the other
    branch's width, LayerNorm over [CLS, patches], timm's attention of the CLS, residual, projected back."""

    def make_peer(self) -> nn.Module:
        from timm.models.crossvit import CrossAttention

        return CrossAttention(self.context_dim, num_heads=self.heads, qkv_bias=self.knobs.qkv_bias)

    def copy_weights(self, ours: Any) -> None:
        self.to_context = ours.to_context
        self.norm = ours.norm
        self.from_context = ours.from_context
        cd = self.context_dim
        _copy(self.peer.wq, ours.proj.q)
        self.peer.wk.weight.copy_(ours.proj.kv.weight[:cd])
        self.peer.wv.weight.copy_(ours.proj.kv.weight[cd:])
        if self.peer.wk.bias is not None:
            self.peer.wk.bias.copy_(ours.proj.kv.bias[:cd])
            self.peer.wv.bias.copy_(ours.proj.kv.bias[cd:])
        _copy(self.peer.proj, ours.proj.out)

    def _forward(self, x: torch.Tensor, hw: HW, context: Any, context_hw: Any) -> torch.Tensor:
        c = self.to_context(x[:, :1])  # (B, 1, Cc)
        t = self.norm(torch.cat([c, context[:, 1:]], dim=1))  # (B, 1 + M, Cc)
        cls = self.from_context(c + self.peer(t))  # (B, 1, dim)
        return torch.cat([cls, x[:, 1:]], dim=1)  # (B, 1 + H*W, dim)


PEER_CLASSES: dict[str, tuple[type[Peer], str]] = {
    "full": (TimmFull, "ViT Attention (timm.layers.Attention)"),
    "swin": (TimmSwin, "Swin WindowAttention (timm.models.swin_transformer)"),
    "pvt": (TimmPVT, "PVTv2 Attention (timm.models.pvt_v2)"),
    "pooling": (TimmPooling, "MViTv2 MultiScaleAttention (timm.models.mvitv2)"),
    "cross": (TimmCross, "CrossViT CrossAttention (timm.models.crossvit)"),
}
PEERS: dict[str, type[Peer]] = {}


def register_peers() -> list[str]:
    """Register every peer (importing this module does it, where timm imports); their names."""
    if not timm_available():
        return []
    for ours, (cls, doc) in PEER_CLASSES.items():
        name = f"timm_{ours}"
        if name not in PEERS:
            PEERS[name] = _peer_class(ours, doc)(cls)
        if name not in _REGISTRY:
            register(PEERS[name])
    return list(PEERS)


def unregister_peers() -> None:
    """Take the peers out of the registry again (tests that must not leave them to the next module)."""
    for name in PEERS:
        _REGISTRY.pop(name, None)


def registered() -> list[str]:
    """The peers now in the registry (none without timm)."""
    return [name for name in PEERS if name in _REGISTRY]


register_peers()


# Where each peer's parity is checked: a small map every one of them runs, with its knobs.
PARITY_POINTS: dict[str, tuple[HW, dict[str, Any]]] = {
    "full": ((12, 12), {}),
    "swin": ((16, 16), {"window": 8}),
    "pvt": ((16, 16), {"sr_ratio": 4}),
    "pooling": ((16, 12), {"stride_kv": 4}),  # tables resized from rel_pos_size 56, a non-square map
    "cross": ((12, 12), {}),
}
PARITY_TOL = 1e-4  # float32, relative to the output's norm


def parity(name: str, device: str = "cpu", dim: int = 64, heads: int = 4, seed: int = 0) -> dict[str, Any]:
    """Build ours and the peer from one seed (the peer copies ours' weights) and compare outputs and input grads."""
    ours_name = PEERS[name].ours
    hw, knobs = PARITY_POINTS[ours_name]
    torch.manual_seed(seed)
    ours = build(ours_name, dim=dim, heads=heads, impl="reference", **knobs).to(device)
    torch.manual_seed(seed)
    peer = build(name, dim=dim, heads=heads, **knobs).to(device)
    args = ours.example_inputs(2, hw, device=device, seed=seed)
    errors = {}
    outs = []
    for module in (ours, peer):
        inputs = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
        out = module(*inputs)
        out.square().sum().backward()
        outs.append((out.detach(), inputs[0].grad))
    for label, (a, b) in zip(("output", "input_grad"), zip(outs[0], outs[1], strict=True), strict=True):
        errors[label] = float((b.double() - a.double()).norm() / a.double().norm().clamp_min(1e-30))
    return {
        "peer": name,
        "ours": ours_name,
        "hw": list(hw),
        "knobs": knobs,
        "device": device,
        "dtype": "float32",
        "rel_error": errors,
        "tolerance": PARITY_TOL,
        "ok": all(e <= PARITY_TOL for e in errors.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Parity of timm's modules against ours, weights copied.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not PEERS:
        print("timm is not importable here: no peers", file=sys.stderr)
        return 2
    results = []
    for name in PEERS:
        try:
            results.append(parity(name, args.device))
        except Exception as exc:  # a peer that fails to run is recorded, not timed
            results.append(
                {"peer": name, "ours": PEERS[name].ours, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            )
        r = results[-1]
        print(f"{name:<14} {'ok  ' if r['ok'] else 'FAIL'} {r.get('rel_error', r.get('error'))}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
