"""The tiny random DINOv2 the benchmarks run when the model's speed or quality is not what they measure."""

from __future__ import annotations

from pathlib import Path


def tiny_model(folder: Path) -> Path:
    """Save a seeded tiny random DINOv2 to ``folder`` (kept if one is there) through the real weights' path."""
    import torch
    from transformers import Dinov2Model

    from scenecluster.models import save_backbone, tiny_dinov2_config

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        save_backbone(Dinov2Model(tiny_dinov2_config()), folder)
    return folder
