"""Controls and measured power (issue 21): the verdict of a twin and of a positive control, the smallest
detectable difference, and a ranking that is withheld when the controls fail. Torch-free."""

from __future__ import annotations

import json
import math

import pytest
from attnbench.bench.store import ResultsStore
from attnbench.reports.controls import checks, detectable, ranking, verdict_html
from attnbench.reports.experiments import build_page

# Five seeds of one configuration, and five of its twin on other seeds: the same spread, other draws.
FULL = [0.81, 0.79, 0.80, 0.82, 0.80]
TWIN = [0.80, 0.82, 0.79, 0.81, 0.81]
LOCAL = [0.52, 0.50, 0.51, 0.53, 0.50]  # a positive control: what is studied taken away
OTHER = [0.78, 0.80, 0.79, 0.81, 0.78]


def test_a_twin_on_other_seeds_passes_and_a_separated_pair_is_detected():
    [neg] = checks({"full": FULL, "full_twin": TWIN}, {"full_twin": "full"}, {})
    assert neg.kind == "negative" and neg.held is True
    [bad] = checks({"full": FULL, "full_twin": LOCAL}, {"full_twin": "full"}, {})
    assert bad.held is False and "do not overlap" in bad.text
    [pos] = checks({"full": FULL, "local": LOCAL}, {}, {"local": "full"})
    assert pos.held is True
    [weak] = checks({"full": FULL, "local": TWIN}, {}, {"local": "full"})
    assert weak.held is False and "not separated" in weak.text
    [above] = checks({"full": LOCAL, "local": FULL}, {}, {"local": "full"})
    assert above.held is False and "above" in above.text
    [one] = checks({"full": [0.8], "local": [0.5]}, {}, {"local": "full"})
    assert one.held is None


def test_smallest_detectable_difference_is_the_half_width_of_a_difference_of_two_means():
    p = detectable({"a": [0.0, 2.0], "b": [1.0, 3.0], "c": [5.0]})  # c: one seed, no spread to pool
    # pooled sd sqrt((2 + 2) / 2), df 2, n 2: t(0.975, 2) * sqrt(2) * sqrt(2 / 2)
    assert p.df == 2 and p.seeds == 2 and p.pooled_sd == pytest.approx(math.sqrt(2))
    assert p.half_width == pytest.approx(4.3027 * math.sqrt(2), rel=1e-4)
    assert detectable({"a": [1.0]}) is None


def test_ranking_calls_every_overlapping_pair_a_tie():
    rows = dict(ranking({"full": FULL, "other": OTHER, "local": LOCAL}))
    assert list(rows) == ["full", "other", "local"]
    assert rows["full"] == ["other"] and rows["other"] == ["full"] and rows["local"] == []


def test_failing_controls_suppress_the_ranking():
    samples = {"full": FULL, "full_twin": TWIN, "local": LOCAL, "other": OTHER}
    html, ok = verdict_html(samples, {"full_twin": "full"}, {"local": "full"})
    assert ok and "Both controls held" in html and "Ranking" in html and "tie with" in html
    assert "Smallest detectable difference" in html
    bad = {**samples, "local": TWIN}  # the positive control does not separate
    html, ok = verdict_html(bad, {"full_twin": "full"}, {"local": "full"})
    assert not ok and "Controls failed" in html and "Ranking" not in html
    html, ok = verdict_html(samples, {}, {})
    assert not ok and "No controls declared" in html and "Ranking" not in html


def _store(out, accs, variants):
    store = ResultsStore(out)
    store.open({"cpu_model": "test"})
    for variant, values in accs.items():
        for seed, a in enumerate(values):
            store.append({
                "point_id": f"exp:e:quick:{variant}:seed{seed}", "kind": "experiment", "status": "ok",
                "experiment": "e", "mode": "quick", "variant": variant, "seed": seed, "accuracy": a,
                "params": 1000, "macs": 1e6, "resolution": 32, "published": {"top1": 80.0 - len(variant)},
            })  # fmt: skip
    raw = {"name": "e", "title": "t", "variants": variants}
    (out / "experiment.json").write_text(json.dumps({"quick": {"experiment": raw, "data": "synthetic"}}))
    return out


def test_the_reproduce_page_states_the_verdict_before_ranking(tmp_path):
    variants = [{"name": "full"}, {"name": "full_twin", "twin_of": "full"},
                {"name": "local", "positive_control_of": "full"}, {"name": "other"}]  # fmt: skip
    good = _store(tmp_path / "good", {"full": FULL, "full_twin": TWIN, "local": LOCAL, "other": OTHER}, variants)
    page = build_page([good])
    assert page.index("Both controls held") < page.index("Smallest detectable difference") < page.index("Ranking")
    assert "order vs paper" in page
    bad = _store(tmp_path / "bad", {"full": FULL, "full_twin": LOCAL, "local": LOCAL, "other": OTHER}, variants)
    page = build_page([bad])
    assert "Controls did not hold at quick" in page and "Ranking" not in page and "order vs paper" not in page
