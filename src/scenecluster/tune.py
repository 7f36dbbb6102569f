"""Ray Tune search over the projection and the mixture on fixed embeddings.

The embeddings are computed once (``embeddings.parquet`` from a clustering run) and shared by every trial
through the object store; one trial is the job's own fit, UMAP then the DP-GMM with its small clusters dropped
(:func:`scenecluster.fitted.fit_once`), scored by :func:`scenecluster.evaluate.score_clusters` when
labels exist and always by a label-free score, so a search also runs on an unlabelled target archive.

Why the label-free score is the silhouette *in the input embedding space*: trials differ in
``reduce.n_components``, so anything measured in the projection is measured in a different space per
trial. The mixture's lower bound (per sample) is a log density, which grows or shrinks with the
dimension, and the silhouette on the projection rewards whatever clumps UMAP made (with ``min_dist=0`` it
makes tight ones at any setting). The input space is the same for every trial; only the partition varies.
The silhouette uses UMAP's metric (cosine by default) on a seeded subsample, the same one for all trials,
and a trial that finds a single cluster scores -1 (the silhouette is undefined there; -1 ranks it last).

:func:`run_tune` is the one public entry; ``rayjobs/tune.py`` and the tests call it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scenecluster.config import ClusterConfig, SearchSpace, TuneJobConfig
from scenecluster.errors import ConfigError, InputError, one_line
from scenecluster.outputs import atomic_write_text

LABEL_METRICS = ("nmi", "acc")


def param_space(search: SearchSpace) -> dict[str, Any]:
    """Tune's ``param_space``: one sampler per dotted setting."""
    from ray import tune

    return {
        "reduce.n_neighbors": tune.choice(search.n_neighbors),
        "reduce.n_components": tune.choice(search.n_components),
        "cluster.weight_concentration_prior": tune.loguniform(*search.weight_concentration_prior),
        "cluster.covariance_prior_scale": tune.loguniform(*search.covariance_prior_scale),
    }


def _trial_configs(params: dict[str, Any], reduce: dict, cluster: dict) -> tuple[dict, ClusterConfig]:
    """Apply one trial's dotted parameters to the base sections."""
    reduce = dict(reduce)
    cluster = dict(cluster)
    for key, value in params.items():
        section, name = key.split(".", 1)
        target = reduce if section == "reduce" else cluster
        target[name] = value.item() if isinstance(value, np.generic) else value
    return reduce, ClusterConfig(**cluster)


def evaluate_trial(
    params: dict[str, Any],
    *,
    X: np.ndarray,
    labels: list[str] | None,
    silhouette_index: np.ndarray,
    reduce: dict,
    cluster: dict,
    device: str = "cpu",
) -> dict[str, Any]:
    """One trial, without Ray: project ``X`` (n_samples, n_features), fit the mixture, score the partition.

    Returns
    -------
    dict
        ``n_clusters``, ``silhouette``, ``lower_bound``, ``converged``, and ``acc``/``nmi``/``ari`` when
        ``labels`` is given.
    """
    from scenecluster.evaluate import input_silhouette, score_clusters
    from scenecluster.fitted import fit_once, merge_by_consensus
    from scenecluster.reduce import fit_settings

    reduce_params, cluster_cfg = _trial_configs(params, reduce, cluster)
    settings = fit_settings(reduce_params, *np.shape(X))
    # the partition the job keeps with these settings: the job's own fit, small clusters dropped
    fit = fit_once(X, settings, cluster_cfg, device)
    clusters = fit.labels
    if cluster_cfg.method == "dpgmm" and cluster_cfg.consensus_runs > 1:  # and merged as the job merges them
        clusters = merge_by_consensus(X, clusters, settings, cluster_cfg, device)[0]
    n_clusters = int(len(np.unique(clusters)))
    silhouette = input_silhouette(X, clusters, silhouette_index, metric=reduce_params.get("metric", "cosine"))
    kept = fit.clusterer  # a prior search (prior_covariance: neighbourhoods) reports the mixture it kept
    result: dict[str, Any] = {
        "n_clusters": n_clusters,
        "silhouette": silhouette,
        "lower_bound": float(getattr(kept, "lower_bound_", math.nan)),
        "converged": bool(getattr(kept, "converged_", True)),
    }
    if labels is not None:
        scores = score_clusters(labels, clusters)
        result.update({k: scores[k] for k in ("acc", "nmi", "ari")})
    return result


def _trainable(config: dict[str, Any], *, X, labels, silhouette_index, reduce, cluster, device, threads) -> None:
    """Ray Tune function trainable: one :func:`evaluate_trial`, one report."""
    import torch
    from ray import tune

    torch.set_num_threads(threads)
    tune.report(
        evaluate_trial(
            config, X=X, labels=labels, silhouette_index=silhouette_index, reduce=reduce, cluster=cluster, device=device
        )
    )


def run_tune(cfg: TuneJobConfig, *, echo=print) -> dict[str, Any]:
    """Search, then write the best settings and every trial to ``cfg.output``; return the summary.

    Files (each written atomically): ``best_config.yaml`` (``reduce`` and ``cluster`` sections, ready to
    pass as a clustering ``--config``), ``trials.json`` (every trial's parameters, scores and error) and
    ``metrics.json`` (the returned summary).

    Raises
    ------
    ConfigError
        When ``metric`` needs labels the embeddings do not have.
    InputError
        When the embeddings cannot be read or hold fewer than 3 rows.
    """
    from scenecluster.data import absolute_location
    from scenecluster.devices import decide
    from scenecluster.raycluster import ensure_ray

    X, labels = _read_search_input(cfg)
    resources = decide(cfg.resources.device, ensure_ray(cfg.resources), torch_threads=cfg.resources.torch_threads)
    out = Path(cfg.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage_path = absolute_location(cfg.storage_path or str(out / "ray_results"))
    grid = _tuner(cfg, X, labels, use_gpu=cfg.gpus_per_trial > 0 and resources.use_gpu, storage_path=storage_path).fit()

    trials = _trial_rows(grid)
    n_errored = sum(t["error"] is not None for t in trials)
    if n_errored == len(trials):
        raise RuntimeError(f"all {len(trials)} trials failed; first error: {trials[0]['error']}")
    best = grid.get_best_result()
    best_params = {k: v for k, v in best.config.items() if "." in k}
    reduce_best, cluster_best = _trial_configs(best_params, cfg.reduce.model_dump(), cfg.cluster.model_dump())
    best_scores = {k: best.metrics[k] for k in ("acc", "nmi", "ari", "n_clusters", "silhouette") if k in best.metrics}
    summary: dict[str, Any] = {
        "metric": cfg.metric,
        "best": best_scores,
        "best_params": best_params,
        "n_trials": len(trials),
        "n_errored": n_errored,
        "n_samples": int(len(X)),
        "n_features": int(X.shape[1]),
        "storage_path": storage_path,
    }
    best_config = {"reduce": reduce_best, "cluster": cluster_best.model_dump()}
    atomic_write_text(out / "best_config.yaml", yaml.safe_dump(best_config, sort_keys=False))
    atomic_write_text(out / "trials.json", json.dumps(trials, indent=2, default=_json_default))
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2, default=_json_default))
    echo(
        f"[tune] best {cfg.metric}={best_scores.get(cfg.metric)} of {len(trials)} trials "
        f"({n_errored} failed): {best_params}"
    )
    return summary


def _read_search_input(cfg: TuneJobConfig) -> tuple[np.ndarray, list[str] | None]:
    """The embeddings and labels the search runs on, checked against the metric."""
    from scenecluster.data import open_filesystem
    from scenecluster.embed import read_embeddings

    # through open_filesystem, not a bare URI: pyarrow would take gs://... to Google's store and wait there
    fs, path = open_filesystem(cfg.embeddings)
    try:
        _, X, labels = read_embeddings(path, filesystem=fs)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"cannot read embeddings {cfg.embeddings!r}: {one_line(exc)}") from None
    if len(X) < 3:
        raise InputError(f"embeddings {cfg.embeddings!r} hold {len(X)} rows; a search needs at least 3")
    if cfg.metric in LABEL_METRICS and labels is None:
        raise ConfigError(
            f"metric={cfg.metric!r} needs labels, and {cfg.embeddings!r} has none: "
            "use metric=silhouette on an unlabelled archive"
        )
    return X, labels


def _tuner(cfg: TuneJobConfig, X: np.ndarray, labels, *, use_gpu: bool, storage_path: str):
    """The Tuner: trials share ``X`` through the object store and reuse their processes."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    rng = np.random.default_rng(cfg.seed)
    silhouette_index = np.sort(rng.choice(len(X), size=min(cfg.silhouette_samples, len(X)), replace=False))
    reduce_base = cfg.reduce.model_dump()
    if not use_gpu:
        reduce_base["backend"] = "umap-learn"  # cuML needs the GPU this trial did not ask for
    trainable = tune.with_parameters(
        _trainable,
        X=X,
        labels=labels,
        silhouette_index=silhouette_index,
        reduce=reduce_base,
        cluster=cfg.cluster.model_dump(),
        device="cuda" if use_gpu else "cpu",
        threads=max(1, int(cfg.cpus_per_trial)),
    )
    trainable = tune.with_resources(
        trainable, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial if use_gpu else 0.0}
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg.search),
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode="max",
            num_samples=cfg.num_samples,
            # A seeded generator makes the sampled settings reproducible; Tune ignores
            # TuneConfig.max_concurrent_trials for a generator instance, so the limit goes to it instead.
            search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials or 0),
            reuse_actors=True,  # a trial process pays numba's UMAP compile (~20 s) once, not per trial
        ),
        run_config=tune.RunConfig(name=cfg.name, storage_path=storage_path, verbose=0),
    )


def _trial_rows(grid) -> list[dict[str, Any]]:
    """One row per trial: its parameters, scores and first error line."""
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        row = {
            "trial_id": metrics.get("trial_id"),
            "params": {k: v for k, v in (result.config or {}).items() if "." in k},
            "error": None if result.error is None else one_line(result.error),
        }
        keep = ("acc", "nmi", "ari", "n_clusters", "silhouette", "lower_bound", "converged")
        row.update({k: v for k, v in metrics.items() if k in keep})
        trials.append(row)
    return trials


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


__all__ = ["SearchSpace", "TuneJobConfig", "evaluate_trial", "param_space", "run_tune"]
