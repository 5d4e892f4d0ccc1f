"""Training end to end: it learns, resumes exactly, records to the results store,
and refuses bad input before it leaves anything on disk."""

from __future__ import annotations

import json

import pytest
import torch
from attnbench.bench.store import read_results
from attnbench.studies import train as train_mod
from attnbench.studies.loop import lr_at
from attnbench.studies.train import TrainConfig, TrainError, train
from PIL import Image
from typer.testing import CliRunner

FINAL_FIELDS = ("kind", "model", "resolution", "epochs", "accuracy", "macs", "params", "images_per_s", "peak_bytes")


def _cfg(out, **kw) -> TrainConfig:
    base = dict(model="pyramid_pvt", tiny=True, out=str(out), resolution=32, batch=32, lr=2e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] < 1e-3


def test_tiny_model_learns_the_synthetic_task(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path / "run", model="pyramid_full", epochs=3, train_size=2048, val_size=256)
    result = train(cfg, progress=False)
    losses = result["step_losses"]
    assert len(losses) == 3 * 64  # 192 steps of 32 images
    first, last = sum(losses[:16]) / 16, sum(losses[-16:]) / 16
    assert last < 0.85 * first, (first, last)
    assert result["accuracy"] >= 0.6, result["accuracy"]  # chance is 0.25 (four relations)
    rows = read_results(tmp_path / "run").records
    assert [r["kind"] for r in rows] == ["train_epoch"] * 3 + ["train"]
    final = rows[-1]
    for field in FINAL_FIELDS:
        assert final[field] is not None, field
    assert final["kind"] == "train" and final["resolution"] == 32 and final["epochs"] == 3
    assert final["mechanism"] == "full" and final["model"] == "pyramid_full-tiny"
    assert final["macs"] > 0 and final["params"] == sum(p.numel() for p in train_mod.zoo.create(
        "pyramid_full", tiny=True, num_classes=4).parameters())  # fmt: skip
    assert final["accuracy"] == rows[-2]["accuracy"]
    assert (tmp_path / "run" / "env.json").exists()
    assert json.loads((tmp_path / "run" / "train.json").read_text())["status"] == "complete"


class Stop(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    kw = dict(epochs=2, train_size=96, val_size=32, drop_path=0.1)  # drop-path: the RNG state must resume too
    torch.manual_seed(1)
    straight = train(_cfg(tmp_path / "a", **kw), progress=False)

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise Stop

    torch.manual_seed(1)
    with pytest.raises(Stop):
        train(_cfg(tmp_path / "b", **kw), progress=False, on_epoch_end=stop_after_first)
    assert json.loads((tmp_path / "b" / "train.json").read_text())["status"] == "interrupted"
    torch.manual_seed(123)  # the checkpoint's RNG state wins
    resumed = train(_cfg(tmp_path / "b", **kw), progress=False)  # the same command continues the run
    steps = len(straight["step_losses"]) // 2
    assert resumed["step_losses"] == straight["step_losses"][steps:]  # bit for bit, from the next step on
    assert resumed["accuracy"] == straight["accuracy"]
    assert json.loads((tmp_path / "b" / "train.json").read_text())["status"] == "complete"
    again = train(_cfg(tmp_path / "b", **kw), progress=False)  # complete: its final row, nothing trained
    assert again["reused"] and again["step_losses"] == [] and again["accuracy"] == straight["accuracy"]
    assert train(_cfg(tmp_path / "b", resume=True, **kw), progress=False)["reused"]  # --resume: the same
    with pytest.raises(TrainError, match="made with other options .*batch"):
        train(_cfg(tmp_path / "b", **{**kw, "epochs": 3}, batch=16), progress=False)
    with pytest.raises(TrainError, match="has trained 2 epochs; pass --epochs 2 or more"):
        train(_cfg(tmp_path / "b", **{**kw, "epochs": 1}), progress=False)
    ids = [r["point_id"] for r in read_results(tmp_path / "b").records]
    assert len(ids) == len(set(ids)) == 3  # two epoch rows and the final row, once each


def test_checkpoint_loads_with_weights_only(tmp_path):
    train(_cfg(tmp_path / "r", epochs=1, train_size=32, val_size=32), progress=False)
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 1 and "model" in ck and "optimizer" in ck


def test_amp_runs_on_cpu(tmp_path):
    result = train(_cfg(tmp_path / "amp", epochs=1, train_size=64, val_size=32, amp=True), progress=False)
    assert result["dtype"] == "bfloat16 autocast" and 0 <= result["accuracy"] <= 1


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(model="resnet50"), "unknown model 'resnet50'"),
        (dict(model="pyramid_swin", resolution=40), "cannot take 40 px: .*stage 2 block 1 \\(swin\\) sees a 5x5 map"),
        (dict(model="pyramid_quadtree", resolution=16), "cannot take 16 px"),
        (dict(model="crossvit_9", resolution=30), "multiple of 4"),
        (dict(device="cuda:7") if not torch.cuda.is_available() else dict(device="tpu"), "device"),
        (dict(epochs=0), "--epochs must be at least 1"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, kw, message):
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=message):
        train(_cfg(out, **kw), progress=False)
    assert not out.exists()


def test_bad_image_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="holds no class folders"):
        train(_cfg(out, data=str(tmp_path / "empty")), progress=False)
    assert not out.exists()
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(bad / "a.png")
    (bad / "b.jpg").write_text("text, not a JPEG")
    with pytest.raises(TrainError, match="not images PIL can read: cat/b.jpg"):
        train(_cfg(out, data=str(tmp_path / "bad")), progress=False)
    assert not out.exists()


def test_trains_on_an_image_folder(tmp_path):
    for k, name in enumerate(("red", "blue")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 20), (255 * (1 - k), 20 * i, 255 * k)).save(tmp_path / "imgs" / name / f"{i}.png")
    result = train(_cfg(tmp_path / "run", data=str(tmp_path / "imgs"), epochs=1, batch=4), progress=False)
    assert result["classes"] == 2 and result["train_images"] == 10 and result["val_images"] == 2


def test_failure_before_the_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(train_mod, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train(_cfg(tmp_path / "run", epochs=1, train_size=32, val_size=32), progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_train_and_models(tmp_path):
    from attnbench.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--model", "nope", "--out", str(out)])
    assert res.exit_code == 2 and "unknown model 'nope'" in res.output
    assert not out.exists()
    res = runner.invoke(
        app,
        ["train", "--model", "pyramid_linear", "--tiny", "--epochs", "1", "--batch", "16", "--train-size", "32",
         "--val-size", "16", "--out", str(out), "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["kind"] == "train"
    res = runner.invoke(app, ["models", "pvt_v2_b0", "--tiny", "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)
    assert row["model"] == "pvt_v2_b0" and row["resolution"] == 32 and row["macs"] > 0 and row["uncovered"] == {}
    res = runner.invoke(app, ["models", "pvt_v3"])
    assert res.exit_code != 0 and "unknown model(s) pvt_v3" in res.output


def test_ema_is_evaluated_beside_the_weights_and_resumes(tmp_path):
    kw = dict(model="pyramid_full", epochs=2, train_size=64, val_size=32, batch=16, ema=0.9)
    straight = train(_cfg(tmp_path / "a", **kw), progress=False)
    rows = [r for r in read_results(tmp_path / "a").records if r["kind"] == "train_epoch"]
    assert all(0 <= r["ema_accuracy"] <= 1 and r["ema_val_loss"] > 0 for r in rows)
    assert "ema" in torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(_cfg(tmp_path / "b", **kw), progress=False, on_epoch_end=stop_after_first)
    resumed = train(_cfg(tmp_path / "b", **kw), progress=False)  # continues with the EMA state
    assert resumed["step_losses"] == straight["step_losses"][4:]
    again = [r for r in read_results(tmp_path / "b").records if r["kind"] == "train_epoch"]
    assert again[-1]["ema_accuracy"] == rows[-1]["ema_accuracy"]
