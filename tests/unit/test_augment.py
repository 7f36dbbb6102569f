"""Augmentations: shapes, label-preserving geometry, normalisation and determinism under a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scenecluster.augment import augment_batch, normalize, random_dihedral, to_tensor
from scenecluster.models import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)


def test_shapes_and_dtype(images):
    out = augment_batch(images, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 28, 28)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_accepts_torch_input(images):
    a = augment_batch(images, torch.Generator().manual_seed(3))
    b = augment_batch(torch.from_numpy(images), torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_dihedral_keeps_each_images_pixel_multiset(images):
    x = to_tensor(images)
    out = random_dihedral(x, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8
    for before, after in zip(x, out, strict=True):
        assert torch.equal(before.flatten(1).sort(dim=1).values, after.flatten(1).sort(dim=1).values)
    assert not torch.equal(out, x)  # 6 images: some transform other than identity is all but certain


def test_dihedral_covers_all_eight_transforms():
    img = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3).repeat(200, 1, 1, 1)
    out = random_dihedral(img, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8


def test_geometry_only_matches_normalised_pixel_multiset(images):
    out = augment_batch(images, torch.Generator().manual_seed(2), crop_scale=None, jitter=0.0)
    ref = normalize(to_tensor(images))
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a.flatten(1).sort(dim=1).values, b.flatten(1).sort(dim=1).values)


def test_same_seed_same_output_and_other_seed_differs(images):
    a = augment_batch(images, torch.Generator().manual_seed(42))
    b = augment_batch(images, torch.Generator().manual_seed(42))
    c = augment_batch(images, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_normalize_uses_imagenet_statistics():
    grey = torch.full((1, 3, 2, 2), 255.0)
    out = normalize(grey)
    expected = [(1.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(expected))


def test_jitter_stays_in_pixel_range(images):
    out = augment_batch(images, torch.Generator().manual_seed(5), jitter=0.9, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.min() >= 0 and out.max() <= 255


def test_rejects_channels_first_input():
    with pytest.raises(ValueError, match="uint8 images"):
        to_tensor(np.zeros((2, 3, 8, 8), dtype=np.uint8))
