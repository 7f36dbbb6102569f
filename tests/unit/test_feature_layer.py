"""``embed.layer: 0`` (the default): the layer a model's config names for scene features, else its last.

The offline stand-in for ``facebook/dinov2-small`` names layer 8 (its last blocks were tuned for saliency and
probe far worse), a backbone fine-tuned from it keeps the name, and a stand-in converted before the key
existed gets it added in place.
"""

from __future__ import annotations

import json

import torch
from transformers import Dinov2Model

from scenecluster.features import resolve_feature_spec
from scenecluster.models import FEATURE_LAYER_KEY, load_backbone, save_backbone, tiny_dinov2_config
from scenecluster.offline_weights import _mark_feature_layer


def _tiny(folder, n_layers=4, **config):
    torch.manual_seed(0)
    cfg = tiny_dinov2_config(num_hidden_layers=n_layers)
    for key, value in config.items():
        setattr(cfg, key, value)
    return save_backbone(Dinov2Model(cfg), folder)


def test_layer_zero_is_the_last_without_a_named_layer(tmp_path):
    folder = _tiny(tmp_path / "plain")
    spec = resolve_feature_spec(str(folder), layer=0)
    assert spec.layer == 4 and spec.is_last_layer
    assert spec.identity()["layer"] == 4  # recorded as what it resolved to


def test_layer_zero_follows_the_named_layer_and_shares_its_identity(tmp_path):
    folder = _tiny(tmp_path / "named", **{FEATURE_LAYER_KEY: 2})
    auto, named, last = (resolve_feature_spec(str(folder), layer=k) for k in (0, 2, -1))
    assert (auto.layer, named.layer, last.layer) == (2, 2, 4)
    assert auto.identity() == named.identity() != last.identity()


def test_a_fine_tuned_copy_keeps_the_named_layer(tmp_path):
    source = _tiny(tmp_path / "source", **{FEATURE_LAYER_KEY: 3})
    tuned = save_backbone(load_backbone(str(source)), tmp_path / "tuned")  # what fine-tuning exports
    assert resolve_feature_spec(str(tuned), layer=0).layer == 3


def test_an_old_stand_in_is_marked_once(tmp_path):
    folder = _tiny(tmp_path / "old-stand-in", n_layers=12)
    _mark_feature_layer(folder)
    assert json.loads((folder / "config.json").read_text())[FEATURE_LAYER_KEY] == 8
    assert resolve_feature_spec(str(folder), layer=0).layer == 8
    before = (folder / "config.json").stat().st_mtime_ns
    _mark_feature_layer(folder)  # already marked: left as it is
    assert (folder / "config.json").stat().st_mtime_ns == before
