"""The DP-GMM's truncation grows when a fit fills it, so an archive of more classes than 50 is not capped at 50.

Real scene sets with that many classes exist (fMoW 62, Million-AID 51, RESISC45 45); the sets this project has hold
10 and 12. Blobs far apart in 5-d stand in for UMAP's layout of such an archive."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from scenecluster.cluster import fit_clusterer, make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.fitted import filled_its_truncation, fit_clustering, load_clustering, save_clustering


def blobs(k: int, per_class: int = 100, seed: int = 0) -> np.ndarray:
    """``k`` round classes in 5-d, at least 8 standard deviations from each other's centre."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-12, 12, size=(k, 5))
    return np.concatenate([c + rng.normal(scale=0.5, size=(per_class, 5)) for c in centres]).astype(np.float32)


def rings(k: int, per_class: int, seed: int = 0) -> np.ndarray:
    """``k`` circles of radius 3 in random planes of 5-d, far apart: curved classes, which a Gaussian mixture
    covers with several components, as UMAP's curved blobs."""
    rng = np.random.default_rng(seed)
    out = []
    for centre in rng.uniform(-30, 30, size=(k, 5)):
        u, v = np.linalg.qr(rng.normal(size=(5, 2)))[0].T
        t = rng.uniform(0, 2 * np.pi, per_class)[:, None]
        out.append(centre + 3 * np.cos(t) * u + 3 * np.sin(t) * v + rng.normal(0, 0.1, (per_class, 5)))
    return np.concatenate(out).astype(np.float32)


def test_60_classes_were_capped_by_the_truncation_of_50():
    """The failure the growth fixes: one fit cannot use more components than it has."""
    X = blobs(60)
    assert len(np.unique(make_clusterer(ClusterConfig(), X, device="cpu").fit_predict(X))) <= 50


def test_a_fit_that_fills_its_truncation_is_fitted_again_with_twice_the_room():
    X = blobs(60)
    model, labels, kept = fit_clusterer(ClusterConfig(), X, device="cpu")
    assert kept.n_components == 100 and model.mixture_.n_components == 100
    assert 57 <= len(np.unique(labels)) <= 60
    assert kept.weight_concentration_prior == pytest.approx(1 / 50)  # the prior of the configured truncation


def test_a_fit_well_below_its_truncation_is_kept_as_it_is():
    X = blobs(10)
    cfg = ClusterConfig()
    _, labels, kept = fit_clusterer(cfg, X, device="cpu")
    assert kept == cfg
    np.testing.assert_array_equal(labels, make_clusterer(cfg, X, device="cpu").fit_predict(X))


def test_growth_stops_at_its_limit_and_says_to_raise_max_clusters(caplog):
    X = blobs(40, per_class=50)
    with caplog.at_level(logging.WARNING, logger="scenecluster.cluster"):
        _, labels, kept = fit_clusterer(ClusterConfig(n_components=5), X, device="cpu")
    assert kept.n_components == 40  # 5 -> 10 -> 20 -> 40, at most 8 times the configured truncation
    assert len(np.unique(labels)) > 0.75 * 40
    assert "raise --max-clusters" in caplog.text


def test_the_fitted_clustering_records_the_grown_truncation_and_assigns_with_it(tmp_path):
    from scenecluster.outputs import OutputFolder

    X = blobs(60, per_class=60)
    cfg = ClusterConfig(min_cluster_share=0.0)
    fitted, clusters, _ = fit_clustering(X, feature={}, reduce={"method": "pca", "n_components": 5}, cluster=cfg)
    assert fitted.info["n_components"] == 100 and fitted.info["n_components_configured"] == 50
    assert len(fitted.cluster_ids) == 100
    assert len(np.unique(clusters)) >= 57
    np.testing.assert_array_equal(fitted.assign(X)["cluster"], clusters)
    out = OutputFolder(str(tmp_path))
    save_clustering(fitted, out)
    np.testing.assert_array_equal(load_clustering(out, device="cpu").assign(X)["cluster"], clusters)


def saved(info: dict, n_clusters: int, clusterer: str = "dpgmm") -> dict:
    """The fields of a ``clustering.json`` that :func:`filled_its_truncation` reads."""
    return {"clusterer": clusterer, "info": info, "summary": {"n_clusters": n_clusters}}


def test_a_saved_fit_that_filled_its_truncation_before_it_could_grow_is_refitted():
    """A rerun keeps a fit whose settings are unchanged, unless this code would not make it."""
    old = {"n_components": 50, "n_distinct": 50, "small_clusters_dropped": 1}
    assert filled_its_truncation(saved({**old, "prior_counts": [52, 47, 48]}, 46))
    assert filled_its_truncation(saved(old, 38))  # the data prior: 38 kept + 1 dropped of 50
    assert not filled_its_truncation(saved({**old, "prior_counts": [14, 12, 12]}, 12))
    assert not filled_its_truncation(saved(old, 30))
    assert not filled_its_truncation(saved({"n_components": 50}, 49, clusterer="pickle"))  # k-means is told K
    grown = {"n_components": 100, "n_components_configured": 50, "clusters_found": 60, "prior_counts": [49, 60, 60]}
    assert not filled_its_truncation(saved(grown, 60))  # made by this code: grown already


def test_a_new_fit_records_the_clusters_it_found_before_dropping_small_ones():
    X = blobs(6, per_class=100)
    fitted, clusters, _ = fit_clustering(
        X, feature={}, reduce={"method": "pca", "n_components": 5}, cluster=ClusterConfig()
    )
    assert fitted.info["clusters_found"] == len(np.unique(clusters)) + fitted.info["small_clusters_dropped"]
    assert not filled_its_truncation({"clusterer": "dpgmm", "info": fitted.info, "summary": {"n_clusters": 6}})


def test_the_fit_stage_does_not_reuse_a_saved_fit_that_filled_its_truncation(tmp_path):
    from scenecluster.outputs import OutputFolder
    from scenecluster.stages import _saved_fit

    out = OutputFolder(str(tmp_path))
    info = {"n_components": 50, "n_distinct": 50, "small_clusters_dropped": 0, "prior_counts": [49, 48, 48]}
    meta = {"fit_key": "k", **saved(info, 48)}
    out.write_text("clustering/clustering.json", json.dumps(meta))
    assert _saved_fit(out)["stale"]
    out.write_text("clustering/clustering.json", json.dumps({**meta, **saved({**info, "prior_counts": [12, 11]}, 11)}))
    assert not _saved_fit(out)["stale"]


def test_with_growth_off_the_truncation_is_a_hard_cap_and_keys_the_fit():
    X = blobs(60)
    cfg = ClusterConfig(grow_truncation=False)
    _, labels, kept = fit_clusterer(cfg, X, device="cpu")
    assert kept.n_components == 50 and len(np.unique(labels)) <= 50
    assert "grow_truncation" not in ClusterConfig().key_settings()  # a default run keeps the key it had
    assert cfg.key_settings()["grow_truncation"] is False  # a hard cap is another fit


def test_a_grown_fit_whose_count_follows_the_room_is_not_kept(caplog):
    """On curved classes the neighbourhood prior finds more clusters at every refit once it has room: the
    truncation was its backstop. 40 rings settle at 44 clusters with room for 50 (more than 3/4 of it); with room
    for 100 they do not settle, so the fit with the configured room is kept."""
    X = rings(40, per_class=40)
    cfg = ClusterConfig()
    room = {"n_components": 100, "weight_concentration_prior": 1 / 50}
    roomy = make_clusterer(cfg.model_copy(update=room), X, device="cpu")
    roomy.fit(X)
    assert not roomy.settled_ and roomy.counts_[-1] > 60  # the runaway the guard is for
    with caplog.at_level(logging.WARNING, logger="scenecluster.cluster"):
        model, labels, kept = fit_clusterer(cfg, X, device="cpu")
    assert kept == cfg and model.settled_ and len(np.unique(labels)) > 0.75 * 50
    np.testing.assert_array_equal(labels, make_clusterer(cfg, X, device="cpu").fit_predict(X))
    assert "follows the room" in caplog.text


def test_no_growth_and_no_warning_where_the_scenes_are_what_limits_the_components(caplog):
    """The job caps the truncation at the number of different scenes (``count_distinct``); a fit that uses them all
    is not a sign of more clusters. Three scenes, each ten times over."""
    X = np.repeat(blobs(3, per_class=1), 10, axis=0)
    with caplog.at_level(logging.WARNING, logger="scenecluster.cluster"):
        fitted, labels, _ = fit_clustering(
            X, feature={}, reduce=ReduceConfig(method="pca", n_components=2), cluster=ClusterConfig()
        )
    assert len(np.unique(labels)) == 3 and fitted.info["n_components"] == 3
    assert "n_components_configured" not in fitted.info
    assert "raise --max-clusters" not in caplog.text


def test_the_fit_line_says_when_the_truncation_grew():
    from scenecluster.config import ClusterJobConfig
    from scenecluster.job import fit_summary

    cfg = ClusterJobConfig(data={"input": "scenes"}, output="out")
    fit = {
        "reused": False,
        "n_fit": 2160,
        "n_clusters": 66,
        "info": {"n_components": 100, "n_components_configured": 50},
    }
    assert fit_summary(cfg, fit) == (
        "fitted umap + dpgmm on 2160 scenes: 66 clusters (the mixture's truncation grew from 50 to 100)"
    )
    kept = {"reused": True, "n_fit": 270, "n_clusters": 11, "info": {"n_components": 50}}
    assert fit_summary(cfg, kept) == "reused umap + dpgmm on 270 scenes: 11 clusters"
