"""Test-time views of a scene: the feature of a scene can be averaged over its rotations and mirror images.

Why: an overhead scene has no "up". A field, a harbour or a runway photographed from the north or the east is
the same scene, but a vision transformer trained on ground photos embeds its rotations differently, and a
clustering may then split one class by orientation. Averaging the feature over the dihedral group's views makes
it invariant to those eight symmetries at the cost of eight forward passes (``"rot90"``: the four rotations).
"""

from __future__ import annotations

import torch

__all__ = ["VIEWS", "n_views", "scene_views"]

#: The choices of ``embed.views`` and how many forward passes each costs.
VIEWS: dict[str, int] = {"one": 1, "rot90": 4, "d4": 8}


def n_views(views: str) -> int:
    """Forward passes per scene for ``views``; raises ``ValueError`` naming the choices."""
    try:
        return VIEWS[views]
    except KeyError:
        raise ValueError(f"views must be one of {', '.join(VIEWS)}, not {views!r}") from None


def scene_views(images: torch.Tensor, views: str) -> list[torch.Tensor]:
    """The views of a batch ``(n, C, H, W)`` of square images: itself, then rotations, then their mirrors."""
    count = n_views(views)
    rotations = [images if k == 0 else torch.rot90(images, k, dims=(2, 3)) for k in range(min(count, 4))]
    mirrors = [torch.flip(r, dims=(3,)) for r in rotations] if count == 8 else []
    return rotations + mirrors
