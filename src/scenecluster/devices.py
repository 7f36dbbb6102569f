"""The one place that decides CPU or GPU.

Every stage asks here instead of probing CUDA itself, so a run's device choice is made once and can be
overridden by one setting (``auto``, ``cuda`` or ``cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_torch_device(device: str = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a ``torch.device``.

    ``auto`` picks CUDA when this process sees a GPU. Asking for ``cuda`` without one is an error with a
    clear message rather than a failure deep inside torch.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA GPU here")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', not {device!r}")


@dataclass(frozen=True)
class Resources:
    """What the driver decided once for the whole run."""

    use_gpu: bool
    device: torch.device
    dtype: torch.dtype


def resolve(device: str = "auto", *, cluster_has_gpu: bool | None = None) -> Resources:
    """Resolve the run's device. ``cluster_has_gpu`` lets a Ray driver without a GPU target GPU workers."""
    if device == "auto" and cluster_has_gpu is not None:
        use_gpu = cluster_has_gpu
    else:
        use_gpu = resolve_torch_device(device).type == "cuda" if device != "cuda" else True
    dev = torch.device("cuda") if use_gpu else torch.device("cpu")
    return Resources(use_gpu=use_gpu, device=dev, dtype=torch.bfloat16 if use_gpu else torch.float32)
