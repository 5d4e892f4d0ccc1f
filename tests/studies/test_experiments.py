"""attnbench reproduce: every shipped experiment end to end (smoke), resumption, and bad files refused
before anything trains, with the field named."""

from __future__ import annotations

import json
import textwrap

import pytest
from attnbench.bench.store import read_results
from attnbench.studies import experiments as E
from typer.testing import CliRunner

SHIPPED = [p.stem for p in E.shipped()]


def _rows(out, kind):
    return [r for r in read_results(out).records if r.get("kind") == kind]


def test_four_papers_are_shipped_and_listed():
    from attnbench.cli import app

    assert {"quadtree_mechanisms", "dat_placement", "mvitv2_pooling", "crossvit_fusion"} <= set(SHIPPED)
    res = CliRunner().invoke(app, ["reproduce", "--list"])
    assert res.exit_code == 0, res.output
    for name in SHIPPED:
        assert name in res.output


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_experiment_runs_end_to_end_in_smoke_mode(tmp_path, name):
    from attnbench.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["reproduce", name, "--smoke", "--out", str(out)])
    assert res.exit_code == 0, res.output
    exp = E.load(name)
    names = [v.name for v in exp.variants_in("smoke")]  # the quick ones (a variant may be --full only)
    acc = _rows(out, "experiment")
    assert sorted(r["variant"] for r in acc) == sorted(names)  # one seed per variant
    assert all(0 <= r["accuracy"] <= 1 and r["params"] > 0 and r["macs"] > 0 for r in acc)
    cost = _rows(out, "experiment_cost")
    assert sorted(r["variant"] for r in cost) == sorted(names)
    assert all(
        r["latency_ms_median"] > 0 and 0 < r["peak_bytes"] < r["train_peak_bytes"] and r["macs"] > 0 for r in cost
    )
    page = (out / "report.html").read_text()
    assert all(n in page for n in names) and "plot-0" in page
    # the published numbers of the file reach the rows (and the report)
    assert {r["variant"]: r["published"] for r in acc} == {v.name: v.published for v in exp.variants_in("smoke")}
    # every shipped file validates at --full too (the published configurations build and fit 224 px)
    E.validate(exp, "full")


TINY = """
name: tiny
title: two tiny variants
seeds: 2
modes:
  quick: {tiny: true, resolution: 32, epochs: 1, batch: 8, train_size: 16, val_size: 8, cost_resolutions: [32],
          cost_batch: 1}
variants:
  - name: full
    model: pyramid_full
  - name: swin
    model: pyramid_swin
    stages: [{attention: swin, knobs: [{window: 4}, {window: 4, shift: true}]}, null, null, null]
"""


def _write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_quick_run_resumes_and_reuses_finished_training(tmp_path):
    exp = E.load(str(_write(tmp_path, TINY)))
    out = tmp_path / "out"
    first = E.run(exp, "quick", out, log=lambda s: None)
    assert first["trained"] == 4 and first["measured"] == 2
    acc = _rows(out, "experiment")
    assert sorted((r["variant"], r["seed"]) for r in acc) == [("full", 0), ("full", 1), ("swin", 0), ("swin", 1)]
    again = E.run(exp, "quick", out, log=lambda s: None)
    assert again == {**again, "trained": 0, "measured": 0, "skipped": 4}
    # a run killed after a training finished but before its row was stored: the finished run is reused
    lines = (out / "results.jsonl").read_text().splitlines()
    keep = [ln for ln in lines if '"swin:seed1"' not in ln and ":swin:seed1" not in ln]
    (out / "results.jsonl").write_text("\n".join(keep) + "\n")
    third = E.run(exp, "quick", out, log=lambda s: None)
    assert third["trained"] == 0 and third["reused"] == 1
    (row,) = [r for r in _rows(out, "experiment") if r["variant"] == "swin" and r["seed"] == 1]
    assert row["accuracy"] == next(r for r in acc if r["variant"] == "swin" and r["seed"] == 1)["accuracy"]
    meta = json.loads((out / "experiment.json").read_text())
    assert meta["quick"]["seeds"] == 2


# case: (text replaced in TINY, its replacement, what the one-line error must say)
BAD = {
    "unknown top field": ("seeds: 2", "seeds: 2\nseedz: 3", "exp.yaml.seedz: unknown field"),
    "unknown variant field": ("model: pyramid_full", "model: pyramid_full\n    knob: {}", "variants[0].knob: unknown"),
    "unknown model": ("model: pyramid_full", "model: pyramid_nope", "variants[0] (full).model: unknown model"),
    "unknown mechanism": ("{attention: swin,", "{attention: swirl,", "variants[1] (swin).stages"),
    "unknown knob": ("{window: 4, shift: true}", "{windoww: 4}", "variants[1] (swin).stages"),
    "knob no mechanism has": (
        "model: pyramid_full", "model: pyramid_full\n    knobs: {topk: 4}",
        "variants[0] (full).knobs.topk: no mechanism of this model has that knob",
    ),
    "cannot run at the resolution": (
        "[{window: 4}, {window: 4, shift: true}]", "[{window: 3}]",
        "variants[1] (swin) cannot run at modes.quick.resolution 32 px",
    ),
    "cannot run at a cost resolution": (
        "cost_resolutions: [32]", "cost_resolutions: [32, 40]",
        "variants[1] (swin) cannot run at modes.quick.cost_resolutions 40 px",
    ),
    "bad mode field": ("epochs: 1", "epochs: 0", "modes.quick.epochs: must be a positive integer"),
    # numbers are checked for type, range and finiteness where they are read
    "lr infinite": ("epochs: 1,", "epochs: 1, lr: .inf,", "modes.quick.lr: must be a finite number, got inf"),
    "lr not a number": ("epochs: 1,", "epochs: 1, lr: .nan,", "modes.quick.lr: must be a finite number, got nan"),
    "lr zero": ("epochs: 1,", "epochs: 1, lr: 0,", "modes.quick.lr: must be above 0 and at most 10"),
    "weight decay negative": ("epochs: 1,", "epochs: 1, weight_decay: -1,", "quick.weight_decay: must be at least 0"),
    "tiny a string": ("tiny: true", 'tiny: "yes"', "modes.quick.tiny: must be true or false, got 'yes'"),
    "amp a number": ("tiny: true", "tiny: true, amp: 1", "modes.quick.amp: must be true or false, got 1"),
    "threads zero": ("tiny: true", "tiny: true, threads: 0", "modes.quick.threads: must be a positive integer"),
    "resolution huge": ("resolution: 32", "resolution: 100000000", "modes.quick.resolution: must be at most 4,096"),
    "seeds huge": ("seeds: 2", "seeds: 1000000", "seeds: must be at most 1,000"),
    "epochs a float": ("epochs: 1", "epochs: 1.5", "modes.quick.epochs: must be a positive integer, got 1.5"),
    "published infinite": (
        "model: pyramid_full", "model: pyramid_full\n    published: {top1: .inf}",
        "variants[0] (full).published.top1: must be a finite number",
    ),
    "name not a string": ("seeds: 2", "seeds: 2\nname: [a]", "name: must be a string"),
    "self alias": ("seeds: 2", "seeds: 2\nnotes: &n [*n]", "an alias refers to its own anchor"),
}  # fmt: skip


def _bad_text(case: str) -> str:
    old, new, _ = BAD[case]
    text = textwrap.dedent(TINY)
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_experiment_file_is_refused_before_anything_trains(tmp_path, case):
    from attnbench.cli import app

    path = _write(tmp_path, _bad_text(case))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["reproduce", str(path), "--quick", "--out", str(out)])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert BAD[case][2] in text, text
    assert res.output.strip().startswith("error:") and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 or len(res.output.strip()) > 80  # one (soft-wrapped) line
    assert not out.exists()  # nothing was written


def test_unknown_mechanism_and_knob_messages_name_the_valid_ones(tmp_path):
    with pytest.raises(E.ExperimentError, match="swirl"):
        E.validate(E.load(str(_write(tmp_path, _bad_text("unknown mechanism")))), "quick")
    with pytest.raises(E.ExperimentError, match="windoww"):
        E.validate(E.load(str(_write(tmp_path, _bad_text("unknown knob")))), "quick")


def test_cli_needs_an_experiment_and_out_and_one_mode(tmp_path):
    from attnbench.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["reproduce", "crossvit_fusion"]).exit_code == 2
    res = runner.invoke(app, ["reproduce", "nope", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no experiment 'nope'" in res.output
    res = runner.invoke(app, ["reproduce", "crossvit_fusion", "--quick", "--full", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2


def test_an_edited_definition_never_reuses_older_rows_or_runs(tmp_path):
    path = _write(tmp_path, TINY)
    out, work = tmp_path / "out", tmp_path / "work"
    E.run(E.load(str(path)), "smoke", out, work=work, log=lambda s: None)
    path.write_text(textwrap.dedent(TINY).replace("epochs: 1", "epochs: 1, lr: 0.01"))
    edited = E.load(str(path))
    with pytest.raises(E.ExperimentError, match="as it was defined before"):
        E.run(edited, "smoke", out, work=work, log=lambda s: None)
    other = r"holds a training run made with other options \(lr: 0.002 there, 0.01 now"
    with pytest.raises(E.ExperimentError, match=other):
        E.run(edited, "smoke", tmp_path / "out2", work=work, log=lambda s: None)
    assert E.run(edited, "smoke", tmp_path / "out3", work=tmp_path / "work3", log=lambda s: None)["trained"] == 2


def test_experiment_files_are_read_with_limits_before_anything_is_validated(tmp_path):
    import time

    text = textwrap.dedent(TINY)
    anchored = text.replace("seeds: 2", "seeds: 2\nnotes: {a: &q [1, 2], b: *q}")
    assert E.load(str(_write(tmp_path, anchored))).raw["notes"] == {"a": [1, 2], "b": [1, 2]}  # a few aliases: fine
    levels = "".join(f"  l{i + 1}: &l{i + 1} [{', '.join([f'*l{i}'] * 10)}]\n" for i in range(9))
    bomb = text + "notes:\n  l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + levels  # 10**10 values written out
    start = time.perf_counter()
    with pytest.raises(E.ExperimentError, match="more than 100,000 values with its aliases written out"):
        E.load(str(_write(tmp_path, bomb)))
    assert time.perf_counter() - start < 2.0
    with pytest.raises(E.ExperimentError, match="nested deeper than 32 levels"):
        E.load(str(_write(tmp_path, text + "notes: " + "[" * 40 + "]" * 40 + "\n")))
    with pytest.raises(E.ExperimentError, match="nested deeper than 32 levels"):  # nesting through aliases
        deep = "".join(f"  d{i + 1}: &d{i + 1} [*d{i}]\n" for i in range(40))
        E.load(str(_write(tmp_path, text + "notes:\n  d0: &d0 [1]\n" + deep)))
    with pytest.raises(E.ExperimentError, match="more than an experiment file may hold"):
        E.load(str(_write(tmp_path, text + "#" * E.MAX_FILE_BYTES)))
    (tmp_path / "bin.yaml").write_bytes(b"name: x\n\x00\x01\xff")
    with pytest.raises(E.ExperimentError, match=r"not a text file \(byte 8"):
        E.load(str(tmp_path / "bin.yaml"))
