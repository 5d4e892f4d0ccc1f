"""The CIFAR reader on batches this test writes in the python format, and the imagenet: folder's check."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from attnbench.studies.data import DataError, build


def write_cifar10(root: Path, per_batch: int = 4) -> Path:
    """A tiny cifar-10-batches-py: five training batches and a test batch of ``per_batch`` images each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data[:, 0] = k  # the first red pixel says which batch an image came from
        labels = [(k + i) % 10 for i in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return folder


def write_cifar100(root: Path, n: int = 6) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        data = np.full((n, 3072), 200, dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return folder


def test_cifar10_shapes_labels_and_splits(tmp_path):
    folder = write_cifar10(tmp_path)
    train, val = build(f"cifar10:{tmp_path}", 32, "train"), build(f"cifar10:{folder}", 32, "val")  # either path
    assert len(train) == 20 and len(val) == 4 and len(train.classes) == 10
    x, y = train[5]  # batch 2, second image
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert y == (1 + 1) % 10
    assert x[0, 0, 0] == pytest.approx((1 / 255 - 0.5) / 0.5)
    assert [val[i][1] for i in range(4)] == [5, 6, 7, 8]
    assert build(f"cifar10:{tmp_path}", 48, "train")[0][0].shape == (3, 48, 48)  # resized


def test_cifar100_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    ds = build(f"cifar100:{tmp_path}", 32, "train")
    assert len(ds.classes) == 100 and [ds[i][1] for i in range(6)] == list(range(6))
    assert torch.allclose(ds[0][0], torch.full((3, 32, 32), (200 / 255 - 0.5) / 0.5))


def test_a_wrong_cifar_path_is_one_line_naming_the_layout(tmp_path):
    with pytest.raises(DataError) as err:
        build(f"cifar10:{tmp_path / 'nowhere'}", 32, "train")
    msg = str(err.value)
    assert "\n" not in msg and "cifar-10-batches-py/" in msg and "data_batch_1..5, test_batch, batches.meta" in msg
    with pytest.raises(DataError, match="cifar-100-python/ holding train, test, meta"):
        build(f"cifar100:{tmp_path}", 32, "val")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder = write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": print, b"labels": []}, f)  # noqa: S301
    with pytest.raises(DataError, match="may not hold builtins.print"):
        build(f"cifar10:{tmp_path}", 32, "val")


def test_imagenet_needs_train_and_val(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"lacks train/ or val/: expected .*/val/<class>/<images>"):
        build(f"imagenet:{tmp_path}", 32, "train")


def test_train_reads_cifar(tmp_path):
    from attnbench.studies.train import TrainConfig, train

    write_cifar10(tmp_path / "data", per_batch=8)
    cfg = TrainConfig(
        "pyramid_full", str(tmp_path / "run"), tiny=True, data=f"cifar10:{tmp_path / 'data'}", epochs=1, batch=8,
        lr=1e-3, recipe="deit",
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert result["classes"] == 10 and result["train_images"] == 40 and result["recipe"] == "deit"
    assert len(result["step_losses"]) == 5
