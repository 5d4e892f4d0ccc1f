"""Controls in experiment files: a twin takes its twin's configuration and trains on its own seeds; control
fields naming no variant are refused before anything trains."""

from __future__ import annotations

import textwrap

import pytest
from attnbench.bench.store import read_results
from attnbench.studies import experiments as E
from attnbench.studies.controls import TWIN_SEED_OFFSET

HEAD = """
name: ctl
seeds: 2
modes:
  quick: {tiny: true, resolution: 32, epochs: 1, batch: 8, train_size: 8, val_size: 8, cost_resolutions: [32]}
variants:
  - name: full
    model: pyramid_full
    knobs: {}
"""


def _load(tmp_path, tail):
    path = tmp_path / "ctl.yaml"
    path.write_text(textwrap.dedent(HEAD) + tail)
    return E.load(str(path))


def test_a_twin_repeats_its_twin_on_its_own_seeds(tmp_path):
    exp = _load(
        tmp_path,
        """
  - name: full_twin
    twin_of: full
  - name: local
    model: pyramid_full
    stages: [{attention: swin, knobs: {window: 1}}, null, null, null]
    positive_control_of: full
""",
    )
    full, twin, _ = exp.variants
    assert E._variant_spec(full, "quick") == E._variant_spec(twin, "quick")
    E.validate(exp, "smoke")
    out = tmp_path / "out"
    E.run(exp, "smoke", out, log=lambda s: None)
    seeds = {r["variant"]: r["seed"] for r in read_results(out).records if r.get("kind") == "experiment"}
    assert seeds == {"full": 0, "full_twin": TWIN_SEED_OFFSET, "local": 0}
    acc = {r["variant"]: r["accuracy"] for r in read_results(out).records if r.get("kind") == "experiment"}
    assert acc["full"] is not None and acc["full_twin"] is not None


@pytest.mark.parametrize(
    "tail, words",
    [
        ("  - {name: t, twin_of: nope}\n", "twin_of: 'nope' is not another variant"),
        ("  - {name: t, positive_control_of: t, model: pyramid_full}\n", "positive_control_of: 't' is not another"),
        ("  - {name: t, twin_of: full, model: pyramid_swin}\n", ".model: a twin takes 'full'"),
        ("  - {name: t, twin_of: full}\n  - {name: u, twin_of: t}\n", "'t' is itself a twin"),
    ],
)
def test_bad_control_fields_are_refused_with_the_field_named(tmp_path, tail, words):
    with pytest.raises(E.ExperimentError, match="variants\\[\\d\\] \\(\\w\\)") as err:
        _load(tmp_path, tail)
    assert words in str(err.value)


def test_a_variant_can_be_left_out_of_quick(tmp_path):
    exp = _load(tmp_path, "  - {name: big, model: pyramid_swin, modes: [full]}\n")
    assert [v.name for v in exp.variants_in("quick")] == ["full"]
    assert [v.name for v in exp.variants_in("smoke")] == ["full"]
    assert [v.name for v in exp.variants_in("full")] == ["full", "big"]
    assert list(E.validate(exp, "quick")) == ["full"]
    with pytest.raises(E.ExperimentError, match=r"variants\[1\] \(big\)\.modes: must list some of quick, full"):
        _load(tmp_path, "  - {name: big, model: pyramid_swin, modes: [fast]}\n")


def test_synthetic_same_labels_whether_the_two_squares_share_a_colour():
    import numpy as np
    from attnbench.studies.data import SyntheticSame, build

    ds = build("synthetic-same", 32, "train", size=200, seed=3)
    assert isinstance(ds, SyntheticSame) and len(ds.classes) == 2
    labels = []
    for i in range(200):
        img, label = ds[i]
        img = img.numpy() * 0.5 + 0.5  # back to [0, 1]
        bright = img.max(axis=0) > 0.6  # the squares; the background is dark
        left, right = bright[:, :16], bright[:, 16:]
        assert left.sum() == right.sum() == 100  # one 10 x 10 square in each half
        ca = img[:, :, :16][:, left].mean(axis=1)
        cb = img[:, :, 16:][:, right].mean(axis=1)
        assert (np.abs(ca - cb).max() < 1e-6) == bool(label)
        labels.append(label)
    assert 0.4 < np.mean(labels) < 0.6
