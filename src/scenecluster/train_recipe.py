"""The fine-tuning recipe: the model trained and how it is optimised, apart from Ray.

A DINOv2 backbone shared by one linear head per source (:class:`SceneClassifier`), its early blocks frozen
(:func:`freeze_layers`), AdamW with layer-wise learning-rate decay (:func:`param_groups`), a warm-up then cosine
schedule (:func:`warmup_cosine`) and a label-smoothed cross-entropy on each row's own head
(:func:`classification_loss`). The Ray Train worker (:mod:`scenecluster.train_loop`) and the one-process GPU
benchmark (``benchmarks/gpu_transfer.py``) both build their training from these pieces, so a figure measured there
is this recipe's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scenecluster.models import pool_tokens, pooled_width

__all__ = ["SceneClassifier", "classification_loss", "freeze_layers", "param_groups", "warmup_cosine"]


class SceneClassifier(nn.Module):
    """A DINOv2 backbone shared by one linear head per source.

    ``forward`` returns every head's logits for every row (heads are tiny), so all parameters take part
    in each step and DDP needs no ``find_unused_parameters``; the loss picks each row's own head.
    """

    def __init__(self, backbone: nn.Module, n_classes: list[int], pooling: str = "cls") -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        width = pooled_width(backbone.config.hidden_size, pooling)
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in n_classes)
        for head in self.heads:
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = pool_tokens(self.backbone(pixel_values=pixel_values).last_hidden_state, self.pooling)
        return tuple(head(feats) for head in self.heads)


def freeze_layers(model: SceneClassifier, n_blocks: int) -> None:
    """Freeze the patch embedding (with CLS and position tokens) and the first ``n_blocks`` blocks.

    Early blocks hold generic low-level filters that a small source set would only disturb. The mask
    token is always frozen: it is used only in masked pre-training, and DDP refuses parameters without
    gradients.
    """
    emb = model.backbone.embeddings
    if getattr(emb, "mask_token", None) is not None:
        emb.mask_token.requires_grad_(False)
    if n_blocks > 0:
        emb.requires_grad_(False)
        for layer in model.backbone.encoder.layer[:n_blocks]:
            layer.requires_grad_(False)


def _layer_id(name: str, n_layers: int) -> int:
    """0 for the embeddings, i + 1 for block i, n_layers + 1 for the final norm and the heads."""
    if name.startswith("backbone.embeddings."):
        return 0
    if name.startswith("backbone.encoder.layer."):
        return int(name.split(".")[3]) + 1
    return n_layers + 1


def param_groups(model: SceneClassifier, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise LR decay (BEiT/DINOv2 fine-tuning recipe).

    Block ``i`` of ``L`` gets ``lr * layer_decay ** (L - i)``, so the later, more task-specific blocks and the
    heads move most. Biases, norms and the embedding tokens get no weight decay, since shrinking them
    towards zero has no regularising meaning.
    """
    n_layers = model.backbone.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = _layer_id(name, n_layers)
        no_decay = p.ndim == 1 or name.endswith(("cls_token", "position_embeddings", "register_tokens"))
        key = (lid, no_decay)
        if key not in groups:
            scale = layer_decay ** (n_layers + 1 - lid)
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up from 0 to 1 over ``warmup_steps``, then cosine decay to 0 at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def classification_loss(
    logits: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    sources: torch.Tensor,
    weight: torch.Tensor,
    smoothing: float,
) -> torch.Tensor:
    """Sum over rows of the cross-entropy of each row's own source head, rows weighted (0 = dropped)."""
    total = logits[0].new_zeros(())
    for s, head_logits in enumerate(logits):
        mask = sources == s
        ce = F.cross_entropy(head_logits[mask].float(), labels[mask], label_smoothing=smoothing, reduction="none")
        total = total + (ce * weight[mask]).sum()
    return total
