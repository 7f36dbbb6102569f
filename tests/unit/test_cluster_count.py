"""The default mixture finds the same number of clusters at any sample size (the prior scales with it)."""

from __future__ import annotations

import numpy as np
import pytest

from scenecluster.cluster import make_clusterer
from scenecluster.config import ClusterConfig


def crescents(n: int, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` half rings far apart in 5-d: each class one curved, non-Gaussian blob, like UMAP's."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    theta = rng.uniform(0, np.pi, size=n)
    X = np.zeros((n, 5), np.float32)
    X[:, 0] = 3 * np.cos(theta) + rng.normal(0, 0.2, n) + 12 * labels
    X[:, 1] = 3 * np.sin(theta) + rng.normal(0, 0.2, n) + 6 * (labels % 2)
    X[:, 2:] = rng.normal(0, 0.2, (n, 3))
    return X, labels


def n_clusters(cfg: ClusterConfig, X: np.ndarray) -> int:
    return len(np.unique(make_clusterer(cfg, X, device="cpu").fit_predict(X)))


@pytest.mark.parametrize("n", [500, 2000, 8000])
def test_default_prior_finds_the_true_count_at_every_size(n):
    X, _ = crescents(n)
    assert n_clusters(ClusterConfig(), X) == 5


def test_a_fixed_prior_scale_splits_more_as_the_sample_grows():
    # why the default scales the prior with the sample: at a fixed scale more scenes mean more clusters
    counts = [n_clusters(ClusterConfig(covariance_prior_scale=2.0), crescents(n)[0]) for n in (500, 8000)]
    assert counts[0] == 5 and counts[1] > 7
