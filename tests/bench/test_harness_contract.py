"""The harness refuses exactly what a mechanism refuses, with the same reasons (property-based).

A point is drawn over mechanisms, knobs (values the registry proposes for each),
widths, heads, impls, maps, cross attention and the pass. The mechanism's own
verdict comes from building it and asking the module; the harness's from
``expand`` and ``precheck``. Accepted points must then run, refused ones must
refuse to run.
"""

from __future__ import annotations

import pytest
import torch
from attnbench.attentions.base import knob_candidates
from attnbench.bench.measure import precheck
from attnbench.bench.points import Grid, GridError, expand
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from attnbench import attentions


@st.composite
def points(draw: st.DrawFn) -> dict:
    name = draw(st.sampled_from(attentions.available()))
    cls = attentions.get(name)
    knobs = {}
    for knob in cls.knob_types():
        if draw(st.booleans()):
            knobs[knob] = draw(st.sampled_from(knob_candidates(name, knob, [(12, 12)])[:8]))
    return {
        "name": name,
        "knobs": knobs,
        "dim": draw(st.sampled_from([8, 12, 16, 24, 30, 32])),
        "heads": draw(st.sampled_from([1, 2, 3, 4])),
        "impl": draw(st.sampled_from(cls.impls)),
        "hw": (draw(st.integers(1, 12)), draw(st.integers(1, 12))),
        "cross": draw(st.booleans()),
        "grad": draw(st.booleans()),
    }


def mechanism_verdict(p: dict) -> tuple[str, list[str], attentions.Attention | None]:
    """("knob", message) for a knob value wrong anywhere, else ("point", reasons) with the built module."""
    cls = attentions.get(p["name"])
    try:
        cls.make_knobs(**p["knobs"])
    except attentions.KnobError as exc:
        return "knob", [str(exc)], None
    try:
        module = attentions.build(p["name"], dim=p["dim"], heads=p["heads"], impl=p["impl"], **p["knobs"])
    except attentions.KnobError as exc:  # the constructor refuses: its message joins the reasons
        return "point", [str(exc)], None
    cross = p["cross"] or cls.requires_context
    context_hw = module.default_context_hw(p["hw"]) if cross and cls.supports_cross else None
    if cross and not cls.supports_cross:
        context_hw = p["hw"]
    reasons = module.unsupported(1, p["hw"], context_hw, dtype=torch.float32, device="cpu", grad=p["grad"])
    return "point", reasons, module


def harness_verdict(p: dict) -> tuple[str, list[str]]:
    grid = Grid(
        mechanisms=[p["name"]],
        resolutions=[f"{p['hw'][0]}x{p['hw'][1]}"],
        dims=[p["dim"]],
        heads=[p["heads"]],
        impls=[p["impl"]],
        knobs={k: [v] for k, v in p["knobs"].items()},
        cross=[p["cross"]],
        passes=["fwd+bwd" if p["grad"] else "fwd"],
        devices=["cpu"],
    )
    try:
        exp = expand(grid)
    except (attentions.KnobError, GridError) as exc:
        return "knob", [str(exc)]
    (point,) = exp.points
    return "point", exp.refused.get(point) or precheck(point)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points())
def test_harness_accepts_and_refuses_what_the_mechanism_does(p):
    kind, reasons, module = mechanism_verdict(p)
    harness_kind, harness_reasons = harness_verdict(p)
    assert (harness_kind, "; ".join(harness_reasons)) == (kind, "; ".join(reasons))
    event(f"{kind}: {'refused' if reasons else 'accepted'}")
    if module is None:
        return
    cls = attentions.get(p["name"])
    cross = p["cross"] or cls.requires_context
    if cross and not cls.supports_cross:
        x, hw = module.example_inputs(1, p["hw"])
        with pytest.raises(ValueError, match="cross"):
            module(x, hw, x.clone(), hw)
        return
    args = module.example_inputs(1, p["hw"], cross=cross)
    if reasons:
        with pytest.raises(attentions.UnsupportedPoint):
            module(*args)
        return
    out = module(*args)  # an accepted point runs
    assert torch.isfinite(out).all()
    if p["grad"]:
        out.square().mean().backward()


def test_refusals_are_not_all_alike():
    # the property above is over points of both kinds: the harness refuses some and accepts others
    accept = dict(name="swin", knobs={"window": 4}, dim=16, heads=2, impl="fast", hw=(8, 8), cross=False, grad=True)
    refuse = {**accept, "hw": (8, 6)}
    assert harness_verdict(accept) == ("point", [])
    kind, reasons = harness_verdict(refuse)
    assert kind == "point" and "multiples of the window 4" in reasons[0]
