"""Ray Tune search over the projection and the mixture on fixed embeddings.

The embeddings are computed once (``embeddings.parquet`` from a clustering run) and shared by every trial
through the object store; one trial is UMAP (:func:`scenecluster.reduce.reduce_embeddings`) then the DP-GMM
(:func:`scenecluster.job.make_clusterer`), scored by :func:`scenecluster.evaluate.score_clusters` when
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
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from scenecluster.config import ClusterConfig, ReduceConfig, ResourcesConfig
from scenecluster.errors import ConfigError, InputError
from scenecluster.outputs import atomic_write_text

Metric = Literal["nmi", "acc", "silhouette"]
LABEL_METRICS = ("nmi", "acc")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SearchSpace(_Section):
    """The ranges searched. Each name is the dotted setting of :class:`scenecluster.config.ClusterJobConfig`
    it tunes, so the best values drop into a clustering config unchanged."""

    n_neighbors: list[int] = Field([10, 15, 30, 50], min_length=1, description="reduce.n_neighbors choices")
    n_components: list[int] = Field([2, 5, 10], min_length=1, description="reduce.n_components choices")
    weight_concentration_prior: tuple[float, float] = Field(
        (1e-3, 1.0), description="cluster.weight_concentration_prior: log-uniform low, high"
    )
    covariance_prior_scale: tuple[float, float] = Field(
        (0.5, 8.0), description="cluster.covariance_prior_scale: log-uniform low, high"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> SearchSpace:
        for name in ("weight_concentration_prior", "covariance_prior_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got ({low}, {high})")
        if min(self.n_neighbors) < 2 or min(self.n_components) < 1:
            raise ValueError("n_neighbors choices must be >= 2 and n_components choices >= 1")
        return self

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: one sampler per dotted setting."""
        from ray import tune

        return {
            "reduce.n_neighbors": tune.choice(self.n_neighbors),
            "reduce.n_components": tune.choice(self.n_components),
            "cluster.weight_concentration_prior": tune.loguniform(*self.weight_concentration_prior),
            "cluster.covariance_prior_scale": tune.loguniform(*self.covariance_prior_scale),
        }


class TuneJobConfig(_Section):
    """Everything a search needs; built with ``load_config(path, overrides, model=TuneJobConfig)``."""

    embeddings: str = Field(description="embeddings.parquet of a clustering run (local path or s3:// URI)")
    output: str = Field(description="local folder for best_config.yaml, trials.json and metrics.json")
    name: str = Field("tune", description="Ray Tune run name (the experiment folder under storage_path)")
    storage_path: str | None = Field(None, description="where Tune keeps trial results (default: "
                                     "OUTPUT/ray_results; may be s3://bucket/prefix)")
    metric: Metric = Field("nmi", description="what the best trial maximises; nmi/acc need labels")
    num_samples: int = Field(8, ge=1, description="trials")
    max_concurrent_trials: int | None = Field(None, ge=1, description="trials at once (default: as many as "
                                              "the CPUs allow)")
    cpus_per_trial: float = Field(0.5, gt=0, description="CPUs reserved per trial (fractions fit 2 cores)")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per trial (cuML UMAP and a CUDA mixture)")
    silhouette_samples: int = Field(2000, ge=10, description="subsample size of the label-free score")
    seed: int = Field(0, description="seed of the search and of the silhouette subsample")
    search: SearchSpace = SearchSpace()
    reduce: ReduceConfig = ReduceConfig()
    cluster: ClusterConfig = ClusterConfig()
    resources: ResourcesConfig = ResourcesConfig()


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
    from sklearn.metrics import silhouette_score

    from scenecluster.evaluate import score_clusters
    from scenecluster.job import make_clusterer
    from scenecluster.reduce import reduce_embeddings

    reduce_params, cluster_cfg = _trial_configs(params, reduce, cluster)
    Z = reduce_embeddings(X, **reduce_params)
    model = make_clusterer(cluster_cfg, Z, device=device)
    clusters = model.fit_predict(Z)
    n_clusters = int(len(np.unique(clusters)))
    sub = clusters[silhouette_index]
    if len(np.unique(sub)) < 2 or len(np.unique(sub)) >= len(sub):
        silhouette = -1.0
    else:
        silhouette = float(silhouette_score(X[silhouette_index], sub, metric=reduce_params.get("metric",
                                                                                              "cosine")))
    result: dict[str, Any] = {
        "n_clusters": n_clusters,
        "silhouette": silhouette,
        "lower_bound": float(getattr(model, "lower_bound_", math.nan)),
        "converged": bool(getattr(model, "converged_", True)),
    }
    if labels is not None:
        scores = score_clusters(labels, clusters)
        result.update({k: scores[k] for k in ("acc", "nmi", "ari")})
    return result


def _trainable(
    config: dict[str, Any], *, X, labels, silhouette_index, reduce, cluster, device, threads
) -> None:
    """Ray Tune function trainable: one :func:`evaluate_trial`, one report."""
    import torch
    from ray import tune

    torch.set_num_threads(threads)
    tune.report(evaluate_trial(config, X=X, labels=labels, silhouette_index=silhouette_index,
                               reduce=reduce, cluster=cluster, device=device))


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
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from scenecluster.embed import read_embeddings
    from scenecluster.raycluster import ensure_ray

    try:
        _, X, labels = read_embeddings(cfg.embeddings)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"cannot read embeddings {cfg.embeddings!r}: {str(exc).splitlines()[0]}") from None
    if len(X) < 3:
        raise InputError(f"embeddings {cfg.embeddings!r} hold {len(X)} rows; a search needs at least 3")
    if cfg.metric in LABEL_METRICS and labels is None:
        raise ConfigError(f"metric={cfg.metric!r} needs labels, and {cfg.embeddings!r} has none: "
                          "use metric=silhouette on an unlabelled archive")

    resources = ensure_ray(cfg.resources)
    out = Path(cfg.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage_path = cfg.storage_path or str(out / "ray_results")
    rng = np.random.default_rng(cfg.seed)
    silhouette_index = np.sort(rng.choice(len(X), size=min(cfg.silhouette_samples, len(X)), replace=False))
    use_gpu = cfg.gpus_per_trial > 0 and resources.use_gpu
    device = "cuda" if use_gpu else "cpu"
    reduce_base = cfg.reduce.model_dump()
    if not use_gpu:
        reduce_base["backend"] = "umap-learn"  # cuML needs the GPU this trial did not ask for

    trainable = tune.with_parameters(
        _trainable, X=X, labels=labels, silhouette_index=silhouette_index, reduce=reduce_base,
        cluster=cfg.cluster.model_dump(), device=device, threads=max(1, int(cfg.cpus_per_trial)),
    )
    trainable = tune.with_resources(
        trainable, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial if use_gpu else 0.0}
    )
    tuner = tune.Tuner(
        trainable,
        param_space=cfg.search.param_space(),
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
    grid = tuner.fit()

    trials = []
    for result in grid:
        params = {k: v for k, v in (result.config or {}).items() if "." in k}
        row = {"trial_id": (result.metrics or {}).get("trial_id"), "params": params,
               "error": None if result.error is None else str(result.error).splitlines()[0]}
        row.update({k: v for k, v in (result.metrics or {}).items()
                    if k in ("acc", "nmi", "ari", "n_clusters", "silhouette", "lower_bound", "converged")})
        trials.append(row)
    n_errored = sum(t["error"] is not None for t in trials)
    if n_errored == len(trials):
        raise RuntimeError(f"all {len(trials)} trials failed; first error: {trials[0]['error']}")
    best = grid.get_best_result()
    best_params = {k: v for k, v in best.config.items() if "." in k}
    reduce_best, cluster_best = _trial_configs(best_params, cfg.reduce.model_dump(), cfg.cluster.model_dump())
    best_config = {"reduce": reduce_best, "cluster": cluster_best.model_dump()}
    best_scores = {k: best.metrics[k] for k in ("acc", "nmi", "ari", "n_clusters", "silhouette")
                   if k in best.metrics}
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
    atomic_write_text(out / "best_config.yaml", yaml.safe_dump(best_config, sort_keys=False))
    atomic_write_text(out / "trials.json", json.dumps(trials, indent=2, default=_json_default))
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2, default=_json_default))
    echo(f"[tune] best {cfg.metric}={best_scores.get(cfg.metric)} of {len(trials)} trials "
         f"({n_errored} failed): {best_params}")
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


__all__ = ["SearchSpace", "TuneJobConfig", "evaluate_trial", "run_tune"]
