"""timm's modules as peers of ours: weights copied, the same function, refusals where timm's module lacks a knob.

Skipped where timm is not importable (it is not a dependency of attnbench; the GPU image has it)."""

from __future__ import annotations

import pytest
import torch
from attnbench.attentions import peers

from attnbench import attentions

if not peers.timm_available():
    pytest.skip("timm is not importable here", allow_module_level=True)

from attnbench.bench.measure import Settings, measure  # noqa: E402
from attnbench.bench.points import Grid, expand  # noqa: E402

NAMES = peers.registered()
# The test modules collected after this one iterate over the registry: they must not meet the peers.
peers.unregister_peers()


@pytest.fixture(autouse=True, scope="module")
def _peers_registered():
    peers.register_peers()
    yield
    peers.unregister_peers()


def test_every_peer_is_registered_beside_ours_with_our_knobs():
    assert sorted(NAMES) == sorted(f"timm_{n}" for n in peers.PEER_CLASSES)
    for name in NAMES:
        cls = attentions.get(name)
        ours = attentions.get(cls.ours)
        assert cls.impls == ("timm",) and cls.Knobs is ours.Knobs and cls.cost_knob == ours.cost_knob


@pytest.mark.parametrize("name", NAMES)
def test_peer_matches_ours_with_copied_weights(name):
    result = peers.parity(name)
    assert result["ok"], result


@pytest.mark.parametrize("name", NAMES)
def test_peer_counts_and_parameters_are_ours(name):
    cls = attentions.get(name)
    hw, knobs = peers.PARITY_POINTS[cls.ours]
    torch.manual_seed(0)
    ours = attentions.build(cls.ours, dim=64, heads=4, **knobs)
    torch.manual_seed(0)
    peer = attentions.build(name, dim=64, heads=4, **knobs)
    assert peer.macs(2, hw) == ours.macs(2, hw)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_peer = sum(p.numel() for p in peer.parameters())
    # the same parameters, not ours and timm's together (timm's MViTv2 key norm has a bias ours drops)
    assert n_ours <= n_peer <= n_ours + 64


def test_a_wrong_weight_copy_fails_parity(monkeypatch):
    def copy_without_the_table(self, ours):
        peers._load_qkv(self.peer.qkv, ours)
        peers._copy(self.peer.proj, ours.proj.out)

    monkeypatch.setattr(peers.TimmSwin, "copy_weights", copy_without_the_table)
    result = peers.parity("timm_swin")
    assert not result["ok"] and result["rel_error"]["output"] > peers.PARITY_TOL


def test_peer_refusals_name_the_knob():
    swin = attentions.build("timm_swin", dim=32, heads=2, window=4, shift=True)
    (reason,) = swin.unsupported(1, (8, 8))
    assert "shift=false" in reason
    full = attentions.build("timm_full", dim=32, heads=2, bias_table=8)
    assert "bias_table=0" in full.unsupported(1, (8, 8))[0]
    assert attentions.build("timm_pooling", dim=32, heads=2).unsupported(1, (16, 12)) == []


def test_the_harness_measures_a_peer_like_any_mechanism():
    grid = Grid.from_dict(
        {
            "mechanisms": ["timm_swin"],
            "resolutions": ["16"],
            "dims": [32],
            "heads": [2],
            "impls": ["timm"],
            "passes": ["fwd+bwd"],
            "devices": ["cpu"],
            "knobs": {"window": [8]},
        }
    )
    (point,) = expand(grid).points
    rec = measure(point, Settings(cpu_min_run_time=0.01, min_samples=2, count_flops=False, threads=1))
    assert rec["status"] == "ok", rec["reason"]
    ours = attentions.build("swin", dim=32, heads=2, window=8)
    assert rec["impl"] == "timm" and rec["macs"] == ours.macs(1, (16, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_gpu_peer_matches_ours(name):
    result = peers.parity(name, device="cuda")
    assert result["ok"], result
