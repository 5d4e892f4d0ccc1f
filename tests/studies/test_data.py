"""The synthetic relations task and the image-folder loader."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from attnbench.studies.data import DataError, ImageFolder, SyntheticRelations, build
from PIL import Image


@pytest.mark.parametrize("res", [16, 33, 64, 100])
def test_synthetic_any_resolution_and_deterministic(res):
    a, b = SyntheticRelations(8, res, seed=3), SyntheticRelations(8, res, seed=3)
    for i in range(8):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert xa.shape == (3, res, res) and xa.dtype == torch.float32
        assert torch.equal(xa, xb) and ya == yb
        assert xa.min() >= -1 and xa.max() <= 1
    assert not torch.equal(SyntheticRelations(1, res, seed=4)[0][0], a[0][0])


def test_synthetic_label_is_the_relation_of_the_two_distant_shapes():
    ds = SyntheticRelations(200, 48)
    s, gap = ds.shape, 48 // 4
    counts = Counter()
    for i in range(len(ds)):
        img, label = ds[i]
        ya, xa, yb, xb = ds.layout(i)
        assert abs(xa - xb) >= gap and abs(ya - yb) >= gap  # far apart on both axes
        assert label == 2 * (xa < xb) + (ya < yb)
        counts[label] += 1
        filled = img[:, ya : ya + s, xa : xa + s]
        assert torch.equal(filled, filled[:, :1, :1].expand_as(filled))  # A: one colour throughout
        t = max(1, s // 4)
        ring, hole = img[:, yb, xb + s // 2], img[:, yb + s // 2, xb + s // 2]
        assert torch.allclose(ring, filled[:, 0, 0]) and not torch.allclose(hole, ring)  # B: hollow
        assert t < s // 2
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 25  # every relation is common


def test_synthetic_splits_are_disjoint():
    train, val = SyntheticRelations(50, 32, "train"), SyntheticRelations(50, 32, "val")
    train_imgs = {train[i][0].numpy().tobytes() for i in range(50)}
    assert not any(val[i][0].numpy().tobytes() in train_imgs for i in range(50))


def test_synthetic_bad_arguments():
    with pytest.raises(DataError, match="at least 16 px"):
        SyntheticRelations(4, 8)
    with pytest.raises(DataError, match="split must be one of train, val"):
        SyntheticRelations(4, 32, "test")


def _folder(root, classes=("cat", "dog"), per_class=5, size=(20, 12)):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * k, 10 * i, 200)).save(root / name / f"{i}.png")
    return root


def test_image_folder_loads_and_holds_out(tmp_path):
    root = _folder(tmp_path / "imgs")
    train, val = ImageFolder(root, 24, "train"), ImageFolder(root, 24, "val")
    assert train.classes == ["cat", "dog"]
    assert len(train) == 8 and len(val) == 2  # one of five per class held out
    assert {p for p, _ in train.items}.isdisjoint({p for p, _ in val.items})
    img, label = train[0]
    assert img.shape == (3, 24, 24) and label in (0, 1)
    assert torch.allclose(img[2], torch.full((24, 24), 200 / 255 * 2 - 1))  # blue channel, normalised to [-1, 1]


def test_image_folder_with_train_and_val_folders(tmp_path):
    _folder(tmp_path / "train", per_class=3)
    _folder(tmp_path / "val", per_class=2)
    assert len(build(str(tmp_path), 16, "train")) == 6
    assert len(build(str(tmp_path), 16, "val")) == 4


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no class folders"):
        ImageFolder(tmp_path / "empty", 16)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="cat .*hold no images"):
        ImageFolder(tmp_path / "noimg", 16)
    root = _folder(tmp_path / "mixed")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / "fake.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"not images PIL can read: cat/fake.png, dog/notes.txt"):
        ImageFolder(root, 16)


def test_synthetic_detail_label_is_the_quadrant_of_the_hollow_square():
    from attnbench.studies.data import SyntheticDetail

    ds = build("synthetic-detail", 32, "train", size=64, seed=3)
    assert isinstance(ds, SyntheticDetail) and len(ds.classes) == 4
    labels = set()
    for i in range(64):
        img, label = ds[i]
        _, _, yb, xb = ds.layout(i)
        centre_y, centre_x = yb + ds.shape / 2, xb + ds.shape / 2
        assert label == 2 * int(centre_x > 16) + int(centre_y > 16)
        labels.add(label)
        # the same image as the relations task: only the label differs
        assert torch.equal(img, build("synthetic", 32, "train", size=64, seed=3)[i][0])
    assert labels == {0, 1, 2, 3}
