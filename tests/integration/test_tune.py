"""Ray Tune over UMAP + DP-GMM on fixed embeddings: well-separated 64-d blobs must be found."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from scenecluster.config import load_config
from scenecluster.embed import embedding_table
from scenecluster.errors import ConfigError
from scenecluster.tune import TuneJobConfig, run_tune

pytestmark = pytest.mark.integration


def _blobs(path, n_per_class=60, n_classes=4, n_features=64, seed=0, with_labels=True):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, n_features)) * 4.0
    X = np.concatenate([c + rng.normal(size=(n_per_class, n_features)) for c in centres]).astype(np.float32)
    labels = [f"class{k}" for k in range(n_classes) for _ in range(n_per_class)]
    paths = [f"img{i:04d}.jpg" for i in range(len(X))]
    pq.write_table(embedding_table(paths, X, labels if with_labels else None), path)
    return path


def _cfg(tmp_path, embeddings, **extra):
    overrides = {
        "embeddings": str(embeddings),
        "output": str(tmp_path / "tune-out"),
        "num_samples": 4,
        "cpus_per_trial": 0.5,
        "max_concurrent_trials": 2,
        "search.n_neighbors": [10, 15],
        "search.n_components": [2, 5],
        "search.weight_concentration_prior": [0.01, 1.0],
        "search.covariance_prior_scale": [0.5, 8.0],
        "reduce.metric": "euclidean",
        "cluster.n_components": 10,
        "cluster.max_iter": 200,
        **extra,
    }
    return load_config(None, overrides, model=TuneJobConfig)


def test_tune_finds_blobs_and_writes_results(ray_cluster, tmp_path):
    embeddings = _blobs(tmp_path / "embeddings.parquet")
    cfg = _cfg(tmp_path, embeddings)
    summary = run_tune(cfg, echo=lambda s: None)

    assert summary["n_trials"] == 4 and summary["n_errored"] == 0
    assert summary["metric"] == "nmi"
    assert summary["best"]["nmi"] > 0.8
    assert -1.0 <= summary["best"]["silhouette"] <= 1.0
    out = tmp_path / "tune-out"
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 4
    assert max(t["nmi"] for t in trials) == pytest.approx(summary["best"]["nmi"])
    for t in trials:
        assert set(t["params"]) == {
            "reduce.n_neighbors",
            "reduce.n_components",
            "cluster.weight_concentration_prior",
            "cluster.covariance_prior_scale",
        }
        assert 0.5 <= t["params"]["cluster.covariance_prior_scale"] <= 8.0
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["reduce"]["n_neighbors"] == summary["best_params"]["reduce.n_neighbors"]
    assert best["cluster"]["covariance_prior_scale"] == pytest.approx(
        summary["best_params"]["cluster.covariance_prior_scale"]
    )
    # the best settings are a valid overlay of a clustering config
    load_config(out / "best_config.yaml", {"output": str(tmp_path / "x"), "data.input": str(tmp_path)})
    assert json.loads((out / "metrics.json").read_text())["best"] == summary["best"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_label_metric_on_unlabelled_embeddings_is_a_config_error(tmp_path):
    embeddings = _blobs(tmp_path / "embeddings.parquet", n_per_class=5, with_labels=False)
    with pytest.raises(ConfigError, match="needs labels"):
        run_tune(_cfg(tmp_path, embeddings, metric="nmi"))


def test_search_space_rejects_bad_ranges(tmp_path):
    with pytest.raises(ConfigError, match="covariance_prior_scale"):
        _cfg(tmp_path, tmp_path / "e.parquet", **{"search.covariance_prior_scale": [8.0, 0.5]})


def test_trials_kept_in_s3_with_the_drivers_store_settings(ray_cluster, s3_server, tmp_path, monkeypatch):
    """``storage_path: s3://...`` on a store that only the driver's environment names (endpoint and keys): Tune's
    trials write there through the run's own filesystem, not one each trial builds from an environment without
    them (this local Ray was started before the variables were set)."""
    import ray

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)

    @ray.remote(num_cpus=0)
    def worker_store_settings() -> list[str]:
        import os

        return sorted(k for k in ("AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY") if k in os.environ)

    assert ray.get(worker_store_settings.remote()) == []  # the premise: only the driver holds them
    s3_server.create_bucket("tune")
    embeddings = _blobs(tmp_path / "embeddings.parquet", n_per_class=30, n_classes=3)
    cfg = _cfg(tmp_path, embeddings, num_samples=2, storage_path="s3://tune/runs", name="blobs")
    summary = run_tune(cfg, echo=lambda s: None)

    assert summary["n_trials"] == 2 and summary["n_errored"] == 0
    assert summary["storage_path"] == "s3://tune/runs"
    listed = s3_server.boto3_client().list_objects_v2(Bucket="tune", Prefix="runs/blobs/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert any(k.endswith("result.json") for k in keys), keys  # each trial's results, written by the trial
