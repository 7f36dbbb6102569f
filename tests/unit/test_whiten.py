"""PCA-whitening before the projection: a pipeline that fits, saves, loads and assigns like the bare projection."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.fitted import fit_clustering, load_clustering, save_clustering
from scenecluster.outputs import OutputFolder
from scenecluster.reduce import fit_settings, make_projection, reduce_embeddings


def stretched_blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three blobs told apart along weak directions, under one strong direction that every scene shares."""
    rng = np.random.default_rng(seed)
    means = np.zeros((3, 16))
    means[:, 1:4] = 6 * np.eye(3)
    X = np.concatenate([m + rng.normal(size=(100, 16)) for m in means])
    X[:, 0] *= 60  # a loud direction that says nothing about the groups
    return X.astype(np.float32), np.repeat(np.arange(3), 100)


def test_whitened_projection_is_a_pipeline_with_unit_variance_components():
    X, _ = stretched_blobs()
    plain = make_projection("pca", n_components=3)
    whitened = make_projection("pca", n_components=3, whiten=8)
    assert not hasattr(plain, "steps")
    assert len(whitened.steps) == 2
    Y = whitened.fit_transform(X)
    assert Y.shape == (300, 3)
    np.testing.assert_allclose(whitened.steps[0][1].transform(X).std(axis=0), 1.0, rtol=0.05)


def test_whitening_lets_cosine_neighbours_find_groups_that_a_loud_direction_hides():
    X, truth = stretched_blobs()
    cluster = ClusterConfig(method="kmeans", n_components=3)

    def ari(whiten: int) -> float:
        reduce = ReduceConfig(n_components=2, n_neighbors=15, whiten=whiten, backend="umap-learn")
        _, clusters, _ = fit_clustering(X, feature={}, reduce=reduce, cluster=cluster)
        return adjusted_rand_score(truth, clusters)

    assert ari(8) > 0.9
    assert ari(0) < 0.5


def test_whitened_clustering_saves_and_assigns_the_same(tmp_path):
    X, _ = stretched_blobs()
    reduce = ReduceConfig(n_components=3, n_neighbors=15, whiten=8, backend="umap-learn")
    fitted, clusters, _ = fit_clustering(X, feature={}, reduce=reduce, cluster=ClusterConfig(n_components=6))
    out = OutputFolder(str(tmp_path))
    save_clustering(fitted, out, run="test")
    loaded = load_clustering(out, device="cpu")
    np.testing.assert_array_equal(loaded.assign(X)["cluster"], fitted.assign(X)["cluster"])


@pytest.mark.parametrize(("n", "d", "expected"), [(1000, 384, 64), (20, 384, 19), (1000, 32, 32)])
def test_whitening_is_capped_at_the_sample_rank(n, d, expected):
    assert fit_settings({"whiten": 64, "n_neighbors": 10}, n, d)["whiten"] == expected


def test_a_tiny_sample_still_projects_with_whitening():
    X, _ = stretched_blobs()
    assert reduce_embeddings(X[:12], method="umap", n_components=2, n_neighbors=5, whiten=64).shape == (12, 2)


@pytest.mark.parametrize(
    ("n_fit", "share", "cap", "expected"),
    [
        (450, 0.011, 30, 10),
        (900, 0.011, 30, 10),
        (1800, 0.011, 30, 20),
        (2700, 0.011, 30, 30),
        (18000, 0.011, 30, 30),
        (18000, 0.011, 60, 60),
        (900, 0.011, 5, 5),
        (900, 0.0, 30, 30),
        (40, 0.011, 30, 10),
    ],
)
def test_umaps_neighbours_are_a_share_of_the_fitted_scenes_between_ten_and_the_setting(n_fit, share, cap, expected):
    """The measured points of the rule (10 at 900 fitted scenes, 20 at 1,800, 30 from 2,700), the cap, and 0."""
    settings = fit_settings({"n_neighbors": cap, "neighbors_share": share}, n_fit, 384)
    assert settings["n_neighbors"] == expected
    assert "neighbors_share" not in settings  # consumed here: the projection's factory never sees it


def test_a_fit_key_moves_with_the_share_only_where_it_changes_the_neighbour_count():
    """A run fitted on thousands of scenes keeps the key it had before ``neighbors_share`` existed, so an upgrade
    refits only the small runs whose projection actually changes."""
    from scenecluster.config import ClusterJobConfig
    from scenecluster.features import FeatureSpec
    from scenecluster.job import _fit_key

    def key(share: float, n_fit: int) -> str:
        cfg = ClusterJobConfig(data={"input": "scenes"}, output="out", reduce={"neighbors_share": share})
        spec = FeatureSpec("m", 0, "cls", 112, "m", 8, 12, 384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        return _fit_key(cfg, spec, n_fit)

    assert key(0.011, 18000) == key(0.0, 18000) == key(0.02, 18000)
    assert key(0.011, 900) != key(0.0, 900)
    assert key(0.011, 900) == key(0.01, 900)  # both give 10 neighbours: the same fit


def test_fit_settings_caps_the_default_neighbours_of_a_few_scenes():
    """Settings that name no ``n_neighbors`` get make_projection's default, capped below a small sample (this
    raised KeyError: the warning read the missing key)."""
    assert fit_settings({}, 12, 384)["n_neighbors"] == 11
    assert "n_neighbors" not in fit_settings({}, 500, 384)  # make_projection's own default stays in charge
    X = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    assert reduce_embeddings(X, n_components=2, random_state=0).shape == (12, 2)
