"""A backbone kept in S3 (a real SeaweedFS on 127.0.0.1) is loaded like a local folder, keyed by its weights.

On clusters whose nodes share no disk a fine-tuned backbone lives in object storage; ``--model s3://...`` is
fetched once per machine into the cache (:mod:`scenecluster.model_store`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Model

from scenecluster.model_store import SOURCE_RECORD, fetch_model_folder
from scenecluster.models import (
    ModelLoadError,
    load_backbone,
    resolve_backbone,
    save_backbone,
    tiny_dinov2_config,
)

pytestmark = pytest.mark.integration


def test_a_backbone_in_s3_loads_and_is_fetched_again_when_uploaded_again(
    s3_env, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("SCENECLUSTER_CACHE", str(tmp_path / "cache"))
    s3_env.create_bucket("models")
    s3_env.upload_folder(tiny_model_dir, "models", "runs/ft/backbone")
    uri = "s3://models/runs/ft/backbone"

    resolved = resolve_backbone(uri)
    local = resolve_backbone(tiny_model_dir)
    # the URI stays the source, so that each node's workers fetch their own copy
    assert resolved.source == uri and resolved.hidden_size == local.hidden_size
    assert resolved.weights == local.weights  # the same bytes: the same feature as the local folder
    pixels = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        fetched = load_backbone(uri)(pixel_values=pixels).pooler_output
        expected = load_backbone(tiny_model_dir)(pixel_values=pixels).pooler_output
    torch.testing.assert_close(fetched, expected)

    copy = fetch_model_folder(uri)
    assert (copy / SOURCE_RECORD).is_file() and copy.is_relative_to(tmp_path / "cache")
    kept = (copy / "model.safetensors").stat().st_mtime_ns
    assert fetch_model_folder(uri) == copy and (copy / "model.safetensors").stat().st_mtime_ns == kept

    torch.manual_seed(3)  # a fine-tune saved over the same prefix: fetched again, another feature
    retrained = tmp_path / "retrained"
    save_backbone(Dinov2Model(tiny_dinov2_config()), retrained)
    s3_env.upload_folder(retrained, "models", "runs/ft/backbone")
    assert resolve_backbone(uri).weights == resolve_backbone(retrained).weights != local.weights

    with pytest.raises(ModelLoadError, match=r"s3://models/runs/none.*no config.json"):
        resolve_backbone("s3://models/runs/none")
