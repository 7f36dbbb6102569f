"""A fitted clustering is a model: it saves, loads and assigns the same way for each clusterer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.errors import InputError
from scenecluster.evaluate import contingency, score_clusters, scores_from_contingency
from scenecluster.fitted import fit_clustering, load_clustering, save_clustering
from scenecluster.outputs import OutputFolder

FEATURE = {"model": "tiny", "layer": -1, "pooling": "cls", "image_size": 28}


def blobs(n_per: int = 80, centres: int = 3, dim: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=8.0, size=(centres, dim))
    X = np.concatenate([m + rng.normal(size=(n_per, dim)) for m in means]).astype(np.float32)
    return X, np.repeat(np.arange(centres), n_per)


def fit(method: str, X: np.ndarray):
    """``method``: a ``cluster.method`` (``dpgmm`` with the data prior), or ``neighbourhoods`` for the DP-GMM with
    that prior (the default)."""
    reduce = ReduceConfig(method="pca", n_components=3, backend="umap-learn")
    prior = {"prior_covariance": "neighbourhoods" if method == "neighbourhoods" else "data"}
    kind = "kmeans" if method == "kmeans" else "dpgmm"
    cluster = ClusterConfig(method=kind, n_components=3 if kind == "kmeans" else 6, n_init=2, **prior)
    return fit_clustering(X, feature=FEATURE, reduce=reduce, cluster=cluster, device="cpu", novelty_quantile=0.02)


@pytest.mark.parametrize("method", ["dpgmm", "kmeans", "neighbourhoods"])
def test_saved_clustering_assigns_exactly_as_the_fitted_one(tmp_path, method):
    X, truth = blobs()
    fitted, clusters, _ = fit(method, X)
    assert adjusted_rand_score(truth, clusters) > 0.95
    out = OutputFolder(str(tmp_path))
    save_clustering(fitted, out, run="test")
    loaded = load_clustering(out, device="cpu")
    before, after = fitted.assign(X), loaded.assign(X)
    for key in ("cluster", "coords", "probability", "log_likelihood", "novel"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(after["cluster"], clusters)
    assert loaded.feature == FEATURE
    meta = json.loads((tmp_path / "clustering" / "clustering.json").read_text())
    assert meta["clusterer"] == ("pickle" if method == "kmeans" else "dpgmm")
    assert meta["run"] == "test"
    # ours is plain arrays (the neighbourhood prior keeps the mixture it chose); k-means is pickled with its
    # library's version recorded for the load-time check
    assert (tmp_path / "clustering" / "mixture.safetensors").exists() == (method != "kmeans")
    assert (tmp_path / "clustering" / "clusterer.pkl").exists() == (method == "kmeans")
    assert "scikit-learn" in meta["info"]["versions"]
    # the counts that chose the prior: the data prior's first, then each refit's until one repeats
    counts = meta["info"].get("prior_counts")
    assert (counts is not None and len(counts) >= 2 and counts[-1] in counts[:-1]) == (method == "neighbourhoods")


def test_points_far_from_every_cluster_are_flagged_novel():
    X, _ = blobs()
    fitted, _, _ = fit("dpgmm", X)
    far = X[:20] + 60.0
    assert fitted.assign(far)["novel"].mean() > 0.9
    # the threshold is the fitted sample's 2% quantile, so the sample itself is rarely novel
    assert fitted.assign(X)["novel"].mean() <= 0.05


def test_a_projection_pickled_by_another_library_version_is_refused(tmp_path):
    X, _ = blobs(n_per=30)
    fitted, _, _ = fit("dpgmm", X)
    out = OutputFolder(str(tmp_path))
    save_clustering(fitted, out)
    path = tmp_path / "clustering" / "clustering.json"
    meta = json.loads(path.read_text())
    meta["info"]["versions"]["scikit-learn"] = "0.0.1"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"scikit-learn 0\.0\.1"):
        load_clustering(out, device="cpu")


def test_a_folder_without_a_clustering_says_so(tmp_path):
    with pytest.raises(InputError, match="clustering.json is missing"):
        load_clustering(OutputFolder(str(tmp_path)), device="cpu")
    (tmp_path / "clustering").mkdir()
    for damaged in ('{"format": ', "[1, 2]"):  # cut short by a full disk; not the object it should be
        (tmp_path / "clustering" / "clustering.json").write_text(damaged)
        with pytest.raises(InputError, match="clustering"):
            load_clustering(OutputFolder(str(tmp_path)), device="cpu")


def test_scores_from_counts_equal_scores_from_labels():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 5, size=500)
    pred = np.where(rng.random(500) < 0.7, truth, rng.integers(0, 7, size=500))
    table, _, _ = contingency(truth, pred)
    from_counts = scores_from_contingency(table)
    from_labels = score_clusters(truth, pred)
    assert from_counts["acc"] == pytest.approx(from_labels["acc"])
    assert from_counts["ari"] == pytest.approx(adjusted_rand_score(truth, pred))
    assert from_counts["nmi"] == pytest.approx(normalized_mutual_info_score(truth, pred))
    assert (from_counts["n_clusters"], from_counts["n_classes"]) == (7, 5)


def test_a_tiny_island_is_dropped_and_its_scenes_join_a_kept_cluster(tmp_path):
    # three classes and an island of 3 scenes far from them (1.2% of the scenes): kept as a fourth cluster with
    # min_cluster_share 0, dropped at 0.02, where no scene (fitted, saved, loaded or new) is ever given to it
    X, _ = blobs()
    island = X[:3] + 40.0
    X = np.concatenate([X, island])
    reduce = ReduceConfig(method="pca", n_components=3, backend="umap-learn")

    def fit_with(share: float):
        cluster = ClusterConfig(n_components=6, prior_covariance="data", min_cluster_share=share)
        return fit_clustering(X, feature=FEATURE, reduce=reduce, cluster=cluster, device="cpu")

    kept, kept_clusters, _ = fit_with(0.0)
    assert len(np.unique(kept_clusters)) == 4 and len(np.unique(kept_clusters[-3:])) == 1
    assert kept.info["small_clusters_dropped"] == 0
    fitted, clusters, _ = fit_with(0.02)
    assert len(np.unique(clusters)) == 3 and fitted.info["small_clusters_dropped"] == 1
    assert fitted.clusterer.n_clusters_ == 3
    np.testing.assert_array_equal(clusters[:-3], kept_clusters[:-3])  # the other scenes keep their clusters
    out = OutputFolder(str(tmp_path))
    save_clustering(fitted, out, run="test")
    loaded = load_clustering(out, device="cpu")
    np.testing.assert_array_equal(loaded.assign(X)["cluster"], clusters)
    new = loaded.assign(island + 0.1)
    assert set(new["cluster"]) <= set(clusters)  # a dropped component would map to -1
    # the dropped component's density is no longer the model's: the island's scenes are as likely as the cluster
    # they joined makes them (far less than their own component did), the other scenes' likelihood is unchanged
    mixture = fitted.clusterer
    assert mixture.dropped_components_.sum() == 1 and not (mixture.dropped_components_ & mixture.used_components_).any()
    before, after = kept.assign(X)["log_likelihood"], fitted.assign(X)["log_likelihood"]
    assert (after[-3:] < before[-3:] - 50).all()
    np.testing.assert_allclose(after[:-3], before[:-3], rtol=1e-5)
    np.testing.assert_array_equal(loaded.assign(X)["log_likelihood"], after)  # saved and loaded with it


def test_a_tune_trial_scores_the_partition_the_job_keeps():
    # Tune's trial drops small clusters as the job's fit does, so the count it reports is the job's
    from scenecluster.tune import evaluate_trial

    X, _ = blobs()
    X = np.concatenate([X, X[:3] + 40.0])
    reduce = {"method": "pca", "n_components": 3, "backend": "umap-learn"}
    trial = dict(X=X, labels=None, silhouette_index=np.arange(len(X)), reduce=reduce, device="cpu")
    cluster = {"n_components": 6, "prior_covariance": "data"}
    kept = evaluate_trial({}, **trial, cluster={**cluster, "min_cluster_share": 0.0})
    dropped = evaluate_trial({"cluster.min_cluster_share": 0.02}, **trial, cluster=cluster)
    assert (kept["n_clusters"], dropped["n_clusters"]) == (4, 3)


def test_a_small_umap_fit_places_new_scenes_with_vectorised_distances_in_the_same_clusters():
    """Below 4,096 fitted scenes umap-learn measures each new scene against every fitted one through its numba
    metric called from Python per pair; a fitted clustering names the metric instead, for scikit-learn's
    vectorised one (reduce.fast_small_transform). Those distances must be umap's own, so that new scenes land
    in the clusters umap's own path would give them."""
    import copy

    import umap
    from sklearn.metrics import pairwise_distances

    X, truth = blobs(n_per=60, centres=4, dim=16)
    new, new_truth = blobs(n_per=15, centres=4, dim=16)
    new = new + np.random.default_rng(1).normal(scale=0.3, size=new.shape).astype(np.float32)
    reduce = ReduceConfig(n_components=3, n_neighbors=10, backend="umap-learn")
    fitted, clusters, _ = fit_clustering(X, feature=FEATURE, reduce=reduce, cluster=ClusterConfig(), device="cpu")
    assert adjusted_rand_score(truth, clusters) > 0.95
    model = fitted.projection
    assert model._small_data and model._input_distance_func == "cosine"

    own = copy.deepcopy(model)
    own._input_distance_func = umap.distances.named_distances["cosine"]  # umap-learn's own small-data path
    np.testing.assert_allclose(
        pairwise_distances(new, model._raw_data, metric="cosine"),
        pairwise_distances(new, model._raw_data, metric=own._input_distance_func),
        atol=1e-5,
    )
    vectorised = fitted.assign(new)["cluster"]
    by_umaps_own = fitted.cluster_ids[fitted.clusterer.predict(own.transform(new))]
    assert (vectorised == by_umaps_own).mean() >= 0.95
    assert adjusted_rand_score(new_truth, vectorised) > 0.9


def test_a_consensus_merges_the_pieces_umap_cuts_a_broad_class_into_and_keeps_the_other_classes(tmp_path):
    # three tight classes far apart and one broad, structureless one (uniform in 8 dimensions) that UMAP cuts into
    # pieces which move with its seed; merging what the other seeds keep together joins those pieces only. The
    # neighbourhood prior is weaker than the default here, so the mixture keeps UMAP's pieces (the default finds
    # the four classes in both seeds, and the consensus then has nothing to merge)
    rng = np.random.default_rng(0)
    tight = [60.0 * np.eye(8)[i + 2] + rng.normal(size=(60, 8)) for i in range(3)]
    broad = rng.uniform(-10, 10, size=(400, 8)) - 60.0 * np.eye(8)[5]
    X = np.concatenate([*tight, broad]).astype(np.float32)
    merges = 0
    for seed in (1, 2):
        reduce = ReduceConfig(metric="euclidean", backend="umap-learn", random_state=seed)

        def fit_with(runs: int, seed=seed, reduce=reduce):
            cluster = ClusterConfig(random_state=seed, consensus_runs=runs, neighbourhood_weight=1.0)
            return fit_clustering(X, feature=FEATURE, reduce=reduce, cluster=cluster, device="cpu")

        alone, alone_clusters, _ = fit_with(1)
        fitted, clusters, _ = fit_with(3)
        summary = fitted.info["consensus"]
        assert summary["clusters_first"] == alone.n_clusters  # the first of the three is the fit without consensus
        assert fitted.n_clusters == alone.n_clusters - summary["clusters_merged"] <= alone.n_clusters
        for i in range(3):  # each tight class is still one cluster of its own
            assert len(set(clusters[i * 60 : (i + 1) * 60])) == 1
        assert len(set(clusters[:180])) == 3 and not set(clusters[:180]) & set(clusters[180:])
        # merging joins clusters, never splits one: the first fit's clusters nest in the merged ones
        assert all(len(set(clusters[alone_clusters == c])) == 1 for c in np.unique(alone_clusters))
        merges += summary["clusters_merged"]
        if seed == 1:  # a Tune trial with these settings reports the count the job keeps, merges included
            from scenecluster.tune import evaluate_trial

            cluster = {"random_state": seed, "consensus_runs": 3, "neighbourhood_weight": 1.0}
            trial = evaluate_trial(
                {}, X=X, labels=None, silhouette_index=np.arange(len(X)), reduce=reduce.model_dump(), cluster=cluster
            )
            assert trial["n_clusters"] == fitted.n_clusters
        out = OutputFolder(str(tmp_path / str(seed)))
        save_clustering(fitted, out, run="test")
        loaded = load_clustering(out, device="cpu")
        assert loaded.n_clusters == fitted.n_clusters
        before, after = fitted.assign(X), loaded.assign(X)
        np.testing.assert_array_equal(after["cluster"], before["cluster"])
        np.testing.assert_allclose(after["probability"], before["probability"], rtol=1e-5, atol=1e-5)
        assert set(after["cluster"]) <= set(clusters)  # several components, one cluster id each
    assert merges >= 1
