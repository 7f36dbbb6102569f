"""The mixture finds the same number of clusters at any sample size: both priors scale with the scenes fitted.

The default prior (``prior_covariance: neighbourhoods``) is scaled to the grain of the clusters found; the data
prior (``prior_covariance: data``, the default before) to the whole layout."""

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


DATA_PRIOR = ClusterConfig(prior_covariance="data")


@pytest.mark.parametrize("n", [500, 2000, 8000])
def test_the_data_prior_finds_the_true_count_at_every_size(n):
    X, _ = crescents(n)
    assert n_clusters(DATA_PRIOR, X) == 5


def test_a_fixed_prior_scale_splits_more_as_the_sample_grows():
    # why the priors scale with the sample: at a fixed scale more scenes mean more clusters
    fixed = DATA_PRIOR.model_copy(update={"covariance_prior_scale": 2.0})
    counts = [n_clusters(fixed, crescents(n)[0]) for n in (500, 8000)]
    assert counts[0] == 5 and counts[1] > 7


def blobs(k: int, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` round unit blobs in 5-d, in a box that widens slowly with ``k`` (more classes spread the layout)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 12 * k ** (1 / 5), (k, 5))
    labels = np.repeat(np.arange(k), per_class)
    return (centres[labels] + rng.normal(0, 1, (len(labels), 5))).astype(np.float32), labels


def test_neighbourhood_covariance_is_the_mean_covariance_of_each_points_nearest_neighbours():
    from sklearn.neighbors import NearestNeighbors

    from scenecluster.neighbourhood_prior import neighbourhood_covariance

    X = np.random.default_rng(1).normal(size=(700, 5)).astype(np.float32) * [1, 2, 3, 0.5, 0.1]
    _, idx = NearestNeighbors(n_neighbors=25).fit(X).kneighbors(X)
    local = X[idx] - X[idx].mean(axis=1, keepdims=True)
    expected = np.einsum("nki,nkj->ij", local, local) / (len(X) * 24)
    np.testing.assert_allclose(neighbourhood_covariance(X, 25, chunk_size=128), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [5, 10, 20])
def test_the_default_prior_finds_the_count_at_two_sizes(k):
    assert ClusterConfig().prior_covariance == "neighbourhoods"
    for per_class in (50, 200):  # the count holds from 4x fewer scenes to 4x more
        X, _ = blobs(k, per_class)
        model = make_clusterer(ClusterConfig(), X, device="cpu").fit(X)
        assert len(np.unique(model.labels_)) in (k - 1, k), (k, per_class, model.counts_)
        assert model.counts_[-1] in model.counts_[:-1] and model.neighbours_ >= 10


def test_the_default_count_does_not_grow_with_the_sample():
    # 10 classes from 500 to 8,000 scenes: the neighbourhood is a share of a cluster, so it grows with the sample
    for n in (500, 2000, 8000):
        X, _ = blobs(10, n // 10)
        model = make_clusterer(ClusterConfig(), X, device="cpu").fit(X)
        assert len(np.unique(model.labels_)) in (9, 10), (n, model.counts_)


@pytest.mark.parametrize("n", [500, 2000, 8000])
def test_the_default_prior_on_curved_classes(n):
    # half rings: one more cluster than classes at most, at every size (a weight per archive scene gave 8 for 5
    # at 8,000: once a first fit over-splits, its clusters' own scatter no longer outweighs a prior of K x the
    # neighbourhood covariance)
    X, _ = crescents(n)
    assert n_clusters(ClusterConfig(), X) in (5, 6)


def test_many_classes_are_counted_within_a_fifth():
    # 40 round classes of 50: the prior weighs per scene of a mean cluster, so it does not grow 40-fold on each
    # (a weight per archive scene found 31 of 40, the data prior 35)
    X, _ = blobs(40, 50)
    assert 36 <= n_clusters(ClusterConfig(), X) <= 44


@pytest.mark.parametrize("per_class", [150, 40])
def test_the_refit_prior_is_the_weight_per_scene_of_a_mean_cluster(per_class):
    # 150 a class: neighbourhoods of a tenth of a cluster (15); 40 a class: a tenth is 4, the neighbourhoods hold 10,
    # and the weight is scaled by 4 / 10, the share they were meant to hold over the share they hold
    from scenecluster.neighbourhood_prior import neighbourhood_covariance

    X, _ = blobs(10, per_class)
    cfg = ClusterConfig(neighbourhood_weight=3.0)
    model = make_clusterer(cfg, X, device="cpu").fit(X)
    mean_cluster = len(X) / model.counts_[-2]
    intended = cfg.neighbourhood_share * mean_cluster
    assert model.neighbours_ == max(10, round(intended))
    covariance = neighbourhood_covariance(X, model.neighbours_)
    expected = 3.0 * mean_cluster * min(1.0, intended / model.neighbours_) * covariance
    np.testing.assert_allclose(model.mixture_.covariance_prior, expected, rtol=1e-5)
    assert (intended < 10) == (per_class == 40)


@pytest.mark.parametrize(("k", "per_class", "seed"), [(3, 5, 0), (3, 10, 0), (10, 3, 0), (2, 20, 1)])
def test_a_small_archive_is_not_split_into_a_cluster_per_scene(k, per_class, seed, monkeypatch):
    # clusters smaller than a neighbourhood (10 scenes): each refit split more than the last, to a cluster per scene
    # (15 EuroSAT scenes of 3 classes: 15 clusters). The first fit is kept there, and so is the fit before a refit
    # that finds clusters that small (2 x 20, seed 1: 3, then 4, then 6 clusters of under 10 scenes, then 40)
    from scenecluster.neighbourhood_prior import NeighbourhoodPriorDPGMM

    X, _ = blobs(k, per_class, seed)
    cfg = ClusterConfig(n_components=len(X), random_state=seed)  # the job caps the truncation at the scenes
    model = make_clusterer(cfg, X, device="cpu").fit(X)
    found = len(np.unique(model.labels_))
    assert found <= len(X) / 2 and model.settled_ and model.counts_[-1] == found
    assert model.counts_ == [found] or len(X) / found >= 10  # the first fit, or a refit of clusters of 10 or more
    monkeypatch.setattr(NeighbourhoodPriorDPGMM, "min_mean_cluster", 0)  # the refits as they were
    assert n_clusters(cfg, X) >= 0.8 * len(X)


def test_the_neighbourhood_settings_key_a_fit_only_when_chosen():
    # a run made before the setting existed, rerun with the data prior, keeps its fit key, and tuning the neighbourhood
    # prior while the data prior is used refits nothing
    data = DATA_PRIOR
    assert data.key_settings() == data.model_copy(update={"neighbourhood_weight": 0.9}).key_settings()
    assert not {"prior_covariance", "neighbourhood_weight", "neighbourhood_share"} & set(data.key_settings())
    chosen = ClusterConfig(prior_covariance="neighbourhoods")
    assert chosen.key_settings() != chosen.model_copy(update={"neighbourhood_share": 0.2}).key_settings()
    assert chosen.key_settings() != chosen.model_copy(update={"neighbourhood_weight": 3.0}).key_settings()
    # k-means (the benchmark's oracle on K) has no prior: its key is the same whatever the prior settings say
    kmeans = ClusterConfig(method="kmeans", n_components=10)
    assert kmeans.key_settings() == kmeans.model_copy(update={"prior_covariance": "data"}).key_settings()
    # the small-cluster floor keys a DP-GMM's fit when set; at 0 the key is what it was before the setting existed;
    # the pseudo-label mixture keeps its small clusters, so a round's key never holds it
    assert ClusterConfig().key_settings()["min_cluster_share"] == 0.005
    assert "min_cluster_share" not in ClusterConfig(min_cluster_share=0).key_settings()
    assert "min_cluster_share" not in ClusterConfig().with_data_prior().key_settings()
    assert "min_cluster_share" not in kmeans.key_settings()


def test_a_changed_neighbourhood_rule_refits_only_the_fits_that_use_it(monkeypatch):
    """A rerun after an upgrade that changed the rule must not keep a fit the new code would not make, and must not
    throw away self-training's pseudo-labels, which the data prior alone decides."""
    from scenecluster.config import ClusterJobConfig, sections
    from scenecluster.features import FeatureSpec
    from scenecluster.job import _fit_key

    spec = FeatureSpec("m", 0, "cls", 112, "m", 8, 12, 384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def keys() -> tuple[str, str, dict]:
        job = ClusterJobConfig(data={"input": "scenes"}, output="out")
        data_prior = job.model_copy(update={"cluster": job.cluster.with_data_prior()})
        return _fit_key(job, spec, 5000), _fit_key(data_prior, spec, 5000), job.cluster.with_data_prior().key_settings()

    before = keys()
    monkeypatch.setattr(sections, "NEIGHBOURHOOD_RULE", sections.NEIGHBOURHOOD_RULE + 1)
    after = keys()
    assert after[0] != before[0]  # the default job's fit (the neighbourhood prior) refits
    assert after[1:] == before[1:]  # the data prior's fit and the pseudo-labels' key do not move


def test_the_reading_revision_keys_only_the_fits_of_runs_that_list_scenes_read_otherwise():
    """A run of JPEGs alone keeps its fit across an upgrade of the reading (its key is what it was before the
    revision existed); a run listing TIFFs refits, as its re-embedded parts hold other vectors."""
    from scenecluster.config import ClusterJobConfig
    from scenecluster.features import FeatureSpec
    from scenecluster.job import _fit_key

    spec = FeatureSpec("m", 0, "cls", 112, "m", 8, 12, 384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    job = ClusterJobConfig(data={"input": "scenes"}, output="out")
    jpegs = _fit_key(job, spec, 5000)
    assert _fit_key(job, spec, 5000, reading=None) == jpegs
    assert len({jpegs, _fit_key(job, spec, 5000, reading=1), _fit_key(job, spec, 5000, reading=2)}) == 3
