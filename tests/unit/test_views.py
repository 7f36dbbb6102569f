"""Test-time views: a scene's feature averaged over its rotations (and mirrors) does not depend on its heading."""

import numpy as np
import pytest
import torch

from scenecluster.data import decode_image
from scenecluster.embed import Embedder
from scenecluster.errors import ConfigError
from scenecluster.features import resolve_feature_spec
from scenecluster.views import VIEWS, scene_views


def _images(sample_dir, n, size=28):
    files = sorted(sample_dir.glob("*/*.jpg"))[:n]
    return np.stack([decode_image(f.read_bytes(), size) for f in files])


@pytest.mark.parametrize("views", list(VIEWS))
def test_views_are_distinct_symmetries_of_the_batch(views):
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)  # no symmetry of its own
    got = scene_views(x, views)
    assert len(got) == VIEWS[views]
    assert torch.equal(got[0], x)
    flat = {tuple(v.flatten().tolist()) for v in got}
    assert len(flat) == len(got)  # each view is a different arrangement of the same pixels
    assert all(torch.equal(torch.sort(v.flatten()).values, torch.sort(x.flatten()).values) for v in got)


@pytest.mark.parametrize(("views", "turn"), [("rot90", "rotate"), ("d4", "rotate"), ("d4", "mirror")])
def test_averaged_feature_ignores_the_heading(tiny_model_dir, sample_dir, views, turn):
    images = _images(sample_dir, 3)
    moved = np.rot90(images, 1, axes=(1, 2)) if turn == "rotate" else images[:, :, ::-1]
    moved = np.ascontiguousarray(moved)
    single = Embedder.for_model(str(tiny_model_dir), device="cpu")
    averaged = Embedder.for_model(str(tiny_model_dir), views=views, device="cpu")
    # one view sees the rotated scene as another scene; the average over the group does not
    assert not np.allclose(single.embed(images), single.embed(moved), atol=1e-3)
    np.testing.assert_allclose(averaged.embed(images), averaged.embed(moved), atol=1e-4)


def test_rot90_views_do_not_cover_mirror_images(tiny_model_dir, sample_dir):
    images = _images(sample_dir, 3)
    averaged = Embedder.for_model(str(tiny_model_dir), views="rot90", device="cpu")
    assert not np.allclose(averaged.embed(images), averaged.embed(np.ascontiguousarray(images[:, :, ::-1])), atol=1e-3)


def test_views_setting_is_checked_and_named_in_the_identity(tiny_model_dir):
    with pytest.raises(ConfigError, match="embed.views"):
        resolve_feature_spec(str(tiny_model_dir), views="flips")
    plain = resolve_feature_spec(str(tiny_model_dir))
    assert "views" not in plain.identity()  # runs made before the setting keep their identity
    assert resolve_feature_spec(str(tiny_model_dir), views="d4").identity() == {**plain.identity(), "views": "d4"}
