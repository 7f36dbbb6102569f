"""Augmentations for overhead imagery, on batches of decoded ``uint8`` images, in torch.

Overhead scenes have no canonical "up" and no left/right handedness, so all eight dihedral transforms
(flips and 90-degree rotations) are label-preserving, unlike in ImageNet photos. Crops keep at least half
of the tile (a scene label such as "airport" depends on context), and colour jitter is mild because
sensors and seasons shift colour but the class often depends on it (e.g. desert vs farmland).

Written in plain torch rather than torchvision, which cannot be installed beside the CPU torch build this
project uses; every random draw comes from an explicit ``torch.Generator`` so a batch is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scenecluster.models import IMAGENET_MEAN, IMAGENET_STD, normalize

# ``normalize`` lives in models (the embedder normalises with it too) and is re-exported here.
__all__ = ["augment_batch", "normalize", "random_dihedral", "to_tensor"]

# ITU-R 601 luma weights, the grey level that colour-jitter's saturation and contrast pull towards.
_LUMA = (0.299, 0.587, 0.114)


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 (n, H, W, 3)`` numpy or torch -> ``uint8 (n, 3, H, W)`` torch (channels first)."""
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (n, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    return x.permute(0, 3, 1, 2).contiguous()


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply a random horizontal flip, vertical flip and 90-degree rotation to each ``(n, C, H, W)`` image.

    Pixels are only moved, never interpolated, so each image keeps its exact multiset of values. Square
    images are assumed (``decode_batch`` makes them), since a 90-degree turn swaps height and width.
    """
    n = x.shape[0]
    hflip = torch.rand(n, generator=generator) < 0.5
    vflip = torch.rand(n, generator=generator) < 0.5
    turns = torch.randint(0, 4, (n,), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        img = x[i]
        if hflip[i]:
            img = img.flip(-1)
        if vflip[i]:
            img = img.flip(-2)
        out[i] = torch.rot90(img, int(turns[i]), dims=(-2, -1))
    return out


def _crop_box(size: int, scale: tuple[float, float], generator: torch.Generator) -> tuple[int, int, int, int]:
    """Draw a ``(top, left, height, width)`` box covering ``scale`` of the area, aspect ratio 3/4..4/3."""
    area = size * size * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator)))
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(torch.rand((), generator=generator))
    ratio = math.exp(log_ratio)
    w = min(size, max(1, round(math.sqrt(area * ratio))))
    h = min(size, max(1, round(math.sqrt(area / ratio))))
    top = int(torch.randint(0, size - h + 1, (), generator=generator))
    left = int(torch.randint(0, size - w + 1, (), generator=generator))
    return top, left, h, w


def _random_resized_crop(x: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Crop each image to a random box and resize it back to the input size (bilinear, antialiased)."""
    n, _, height, width = x.shape
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for i in range(n):
        top, left, h, w = _crop_box(min(height, width), scale, generator)
        crop = x[i : i + 1, :, top : top + h, left : left + w].float()
        out[i : i + 1] = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out


def _colour_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in ``1 +/- strength`` per image (float 0..255)."""
    n = x.shape[0]

    def factors() -> torch.Tensor:
        return (1.0 + strength * (2 * torch.rand(n, generator=generator) - 1)).view(n, 1, 1, 1).to(x.device)

    luma = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
    x = x * factors()  # brightness
    grey_mean = (x * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (x - grey_mean) * factors() + grey_mean  # contrast
    grey = (x * luma).sum(1, keepdim=True)
    x = (x - grey) * factors() + grey  # saturation
    return x.clamp_(0.0, 255.0)


def augment_batch(
    images: np.ndarray | torch.Tensor,
    generator: torch.Generator,
    *,
    crop_scale: tuple[float, float] | None = (0.5, 1.0),
    dihedral: bool = True,
    jitter: float = 0.2,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Augment and normalise a batch of decoded scenes for training.

    Parameters
    ----------
    images : ndarray or Tensor, uint8, shape (n_samples, H, W, 3)
        As produced by :func:`scenecluster.data.decode_batch` (square tiles).
    generator : torch.Generator
        Source of every random draw: the same generator state gives the same output.
    crop_scale : (float, float) or None
        Area fraction range of the random resized crop; None disables cropping.
    dihedral : bool
        Random flips and 90-degree rotations.
    jitter : float
        Strength of brightness/contrast/saturation jitter (factors in ``1 +/- jitter``); 0 disables it.
    mean, std : sequence of float
        Normalisation statistics in 0..1 units.

    Returns
    -------
    Tensor, float32, shape (n_samples, 3, H, W)
        Normalised pixels, ready for the backbone's ``pixel_values``.
    """
    x = to_tensor(images)
    if dihedral:
        x = random_dihedral(x, generator)
    x = _random_resized_crop(x, crop_scale, generator) if crop_scale is not None else x.float()
    if jitter > 0:
        x = _colour_jitter(x, jitter, generator)
    return normalize(x, mean, std)
