"""Each augmentation of the DeiT recipe does what it should: crops stay in the image, mixup and cutmix
targets sum to 1, evaluation transforms are deterministic."""

from __future__ import annotations

import pytest
import torch
from attnbench.studies import augment as A


def _batch(n: int = 8, res: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.rand(n, 3, res, res) * 2 - 1, torch.arange(n) % 4


def test_random_resized_crop_stays_in_bounds_and_keeps_the_size():
    import kornia.augmentation as K

    crop = K.RandomResizedCrop((32, 32), scale=(0.08, 1.0))
    x, _ = _batch(16)
    out = crop(x)
    assert out.shape == x.shape
    boxes = crop._params["src"]  # (B, 4, 2) corners in pixels
    assert (boxes >= 0).all() and (boxes[..., 0] <= 31).all() and (boxes[..., 1] <= 31).all()
    assert out.min() >= x.min() - 1e-5 and out.max() <= x.max() + 1e-5  # bilinear: no value outside the input's


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_box_is_inside_the_image(seed):
    torch.manual_seed(seed)
    for lam in (0.0, 0.3, 0.9, 1.0):
        y0, y1, x0, x1 = A.cutmix_box(20, 30, lam)
        assert 0 <= y0 <= y1 <= 20 and 0 <= x0 <= x1 <= 30


@pytest.mark.parametrize("which", ["mixup", "cutmix"])
def test_mixed_targets_sum_to_one_and_mix_the_pair(which):
    recipe = A.Recipe("t", mixup=0.8 if which == "mixup" else 0.0, cutmix=1.0 if which == "cutmix" else 0.0,
                      label_smoothing=0.1)  # fmt: skip
    x, y = _batch()
    torch.manual_seed(1)
    mixed, target = A.mix(x, y, 4, recipe)
    assert mixed.shape == x.shape and target.shape == (8, 4)
    assert torch.allclose(target.sum(-1), torch.ones(8))
    assert (target >= 0).all()
    if which == "mixup":  # image 0 is lam of itself and 1 - lam of image 7 (labels 0 and 3)
        share = (target[0, y[0]] - 0.1 / 4) / 0.9
        assert torch.allclose(mixed[0], share * x[0] + (1 - share) * x[-1], atol=1e-5)
    if which == "cutmix":  # every pixel is the image's own or its partner's
        own, other = (mixed == x).all(1), (mixed == x.flip(0)).all(1)
        assert (own | other).all()


def test_label_smoothing_rows_sum_to_one():
    t = A.smooth(torch.tensor([0, 3]), 4, 0.1)
    assert torch.allclose(t.sum(-1), torch.ones(2)) and t[0, 0] == pytest.approx(0.925)


def test_random_erasing_erases_a_box_with_p_one():
    import kornia.augmentation as K

    x = torch.ones(4, 3, 32, 32)
    out = K.RandomErasing(p=1.0)(x)
    erased = (out == 0).all(1)
    assert erased.any(dim=(1, 2)).all() and not erased.all(dim=(1, 2)).any()


def test_the_deit_recipe_changes_training_images_and_keeps_shape_and_range():
    aug = A.TrainAugment(A.RECIPES["deit"], 32)
    x, y = _batch()
    torch.manual_seed(0)
    out, target = aug(x, y, 4)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5
    assert target is not None and torch.allclose(target.sum(-1), torch.ones(8))
    loss = A.soft_cross_entropy(torch.zeros(8, 4), target)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-5)


def test_eval_transform_is_deterministic_resize_and_centre_crop():
    ev = A.eval_transform(224)
    x = torch.rand(2, 3, 224, 224)
    a, b = ev(x), ev(x)
    assert a.shape == (2, 3, 224, 224) and torch.equal(a, b)
    ev32 = A.eval_transform(32)
    centre = torch.zeros(1, 3, 32, 32)
    centre[..., 8:24, 8:24] = 1.0
    out = ev32(centre)  # resized to 37, cropped to 32: the centre square grows by 37/32
    assert out[0, 0, 16, 16] == 1 and out[0, 0, 0, 0] == 0
