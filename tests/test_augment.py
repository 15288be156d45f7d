"""The batched training augmentation (fedlora_flwr.data.make_batched_augment): the paper's
RandomCrop(pad 4) + HFlip + RandomRotation(15) (FedDecomp's get_dataset.py) as tensor ops on a whole batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from fedlora_flwr import data as D

FILL = tuple(float(-m / s) for m, s in zip(D.CIFAR100_MEAN, D.CIFAR100_STD))


def _params(n: int, top=4, left=4, flip=False, angle=0.0) -> D.AugmentParams:
    return D.AugmentParams(
        top=torch.full((n,), top, dtype=torch.int64), left=torch.full((n,), left, dtype=torch.int64),
        flip=torch.full((n,), flip, dtype=torch.bool), angle=torch.full((n,), angle, dtype=torch.float32),
    )


def _ramp(n: int = 2, size: int = 8) -> torch.Tensor:
    """Pixel (c, r, k) of image i holds 1000 i + 100 c + 10 r + k: every position is recognisable."""
    i, c, r, k = torch.meshgrid(torch.arange(n), torch.arange(3), torch.arange(size), torch.arange(size), indexing="ij")
    return (1000 * i + 100 * c + 10 * r + k).to(torch.float32)


def test_rotation_by_zero_without_shift_or_flip_is_the_identity():
    x = torch.randn(5, 3, 32, 32)
    assert torch.equal(D.apply_augment(x, _params(5), FILL), x)


def test_flip_mirrors_the_columns():
    x = _ramp()
    assert torch.equal(D.apply_augment(x, _params(2, flip=True), FILL), x.flip(-1))


def test_crop_shifts_the_image_and_pads_with_the_fill_value():
    x = _ramp()
    out = D.apply_augment(x, _params(2, top=0, left=8), FILL)  # window 4 rows up, 4 columns right
    assert torch.equal(out[:, :, 4:, :4], x[:, :, :4, 4:])
    for c in range(3):
        assert (out[:, c, :4, :] == FILL[c]).all() and (out[:, c, :, 4:] == FILL[c]).all()


def test_crop_then_flip_in_that_order():
    x = _ramp()
    out = D.apply_augment(x, _params(2, top=4, left=6, flip=True), FILL)
    shifted = torch.cat([x[..., 2:], torch.tensor(FILL).view(1, 3, 1, 1).expand(2, 3, 8, 2)], dim=-1)
    assert torch.equal(out, shifted.flip(-1))


def test_rotation_fills_the_corners_and_keeps_the_centre():
    x = torch.full((1, 3, 32, 32), 5.0)
    out = D.apply_augment(x, _params(1, angle=15.0), FILL)
    for c in range(3):
        assert out[0, c, 0, 0] == FILL[c] and out[0, c, -1, -1] == FILL[c]
    assert (out[:, :, 8:24, 8:24] == 5.0).all()
    quarter = D.apply_augment(_ramp(1, 8), _params(1, angle=90.0), FILL)  # counter-clockwise, as torchvision
    assert torch.equal(quarter, torch.rot90(_ramp(1, 8), k=1, dims=(-2, -1)))


@pytest.mark.parametrize(("name", "size"), [("crop-flip-rotate", 32), ("flip-rotate", 64)])
def test_equals_torchvision_per_image_for_the_same_parameters(name, size):
    """pad + crop + horizontal_flip + rotate (nearest, fill) of torchvision v2, image by image."""
    x = torch.rand(24, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    params = D.draw_augment_params(name, 24, torch.Generator().manual_seed(1), "cpu")
    expected = []
    for i, img in enumerate(x):
        img = TF.crop(TF.pad(img, [D.CROP_PADDING], fill=list(FILL)), int(params.top[i]), int(params.left[i]), size, size)
        if params.flip[i]:
            img = TF.horizontal_flip(img)
        expected.append(TF.rotate(img, float(params.angle[i]), fill=list(FILL)))
    assert torch.equal(D.apply_augment(x, params, FILL), torch.stack(expected))


def test_parameters_are_drawn_per_sample_within_torchvision_ranges():
    params = D.draw_augment_params("crop-flip-rotate", 256, torch.Generator().manual_seed(3), "cpu")
    assert set(params.top.tolist()) == set(range(9)) and set(params.left.tolist()) == set(range(9))
    assert 0.35 < params.flip.float().mean() < 0.65
    assert params.angle.min() >= -15 and params.angle.max() < 15 and len(set(params.angle.tolist())) == 256
    assert params.top.dtype == torch.int64 and params.flip.dtype == torch.bool and params.angle.dtype == torch.float32
    no_crop = D.draw_augment_params("flip-rotate", 16, torch.Generator().manual_seed(3), "cpu")
    assert (no_crop.top == D.CROP_PADDING).all() and (no_crop.left == D.CROP_PADDING).all()


@pytest.mark.parametrize("name", D.AUGMENTATIONS)
def test_batched_augment_is_reproducible_from_the_generator_and_per_sample(name):
    augment = D.make_batched_augment(name, D.CIFAR100_MEAN, D.CIFAR100_STD)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(2)))
    same = augment(x[:1].repeat(8, 1, 1, 1), torch.Generator().manual_seed(1))
    assert len({tuple(img.flatten().tolist()) for img in same}) >= 6  # two close angles may round alike
    torch.manual_seed(5)
    assert augment(x).shape == x.shape  # without a generator: the global RNG


def test_the_backend_is_chosen_by_the_run_config_and_device():
    assert D.augment_backend("auto", torch.device("cpu")) == "per-sample"
    assert D.augment_backend("auto", torch.device("cuda")) == "batched"
    assert D.augment_backend("batched", torch.device("cpu")) == "batched"
    assert D.augment_backend("per-sample", torch.device("cuda")) == "per-sample"
    with pytest.raises(ValueError, match="augment-backend"):
        D.augment_backend("fast", torch.device("cpu"))
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    labels = np.zeros(4, dtype=np.int64)
    ds = D.ImageDataset(images, labels, images, labels, 2, D.CIFAR100_MEAN, D.CIFAR100_STD, train_augment="crop-flip-rotate")
    x, _ = D.client_tensors(ds, np.arange(4), train=True)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ds.augmentation("batched")(x, g), D.make_batched_augment("crop-flip-rotate", ds.mean, ds.std)(
        x, torch.Generator().manual_seed(0)))
    assert ds.augmentation("per-sample") is D.make_augment("crop-flip-rotate", ds.mean, ds.std, size=32)
    with pytest.raises(ValueError, match="neither"):
        ds.augmentation("auto")
