"""The clustering job: list -> embed (Ray Data) -> UMAP -> DP-GMM -> assignments, metrics, report.

:func:`run_cluster_job` is the one public entry; the CLI, ``rayjobs/cluster.py`` and the tests all call it.
Each stage prints a one-line summary and its wall time lands in ``metrics.json``.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scenecluster import __version__
from scenecluster.config import ClusterConfig, ClusterJobConfig, dump_config
from scenecluster.data import list_scenes, read_image_for_display
from scenecluster.embed import embed_images, read_embeddings
from scenecluster.evaluate import score_clusters
from scenecluster.outputs import OutputFolder, prepare_output
from scenecluster.raycluster import ensure_ray
from scenecluster.reduce import reduce_embeddings
from scenecluster.report import write_report


def make_clusterer(cfg: ClusterConfig, X: np.ndarray, *, device: str = "auto"):
    """The clustering estimator for data ``X``, built from its config section.

    The Wishart prior's scale matrix is ``covariance_prior_scale`` times the data's covariance (1.0 is
    scikit-learn's default). A UMAP projection packs each class tightly, so the default prior lets the
    mixture split classes; a somewhat broader prior (2.0, chosen on the source set nwpu12) merges them.
    """
    from scenecluster.cluster import DPGMM

    if cfg.covariance_type == "full":
        covariance_prior = np.atleast_2d(np.cov(X.T)) * cfg.covariance_prior_scale
    else:
        covariance_prior = np.var(X, axis=0, ddof=1) * cfg.covariance_prior_scale
    return DPGMM(
        covariance_prior=covariance_prior,
        n_components=cfg.n_components,
        weight_concentration_prior=cfg.weight_concentration_prior,
        covariance_type=cfg.covariance_type,
        max_iter=cfg.max_iter,
        tol=cfg.tol,
        n_init=cfg.n_init,
        init_params=cfg.init_params,
        random_state=cfg.random_state,
        device=device,
    )


def run_identity(cfg: ClusterJobConfig) -> dict[str, Any]:
    """The settings that determine the embeddings: a rerun with the same identity may reuse them."""
    return {
        "input": cfg.data.input,
        "labels": cfg.data.labels,
        "sample": cfg.data.sample,
        "seed": cfg.data.seed,
        "model": cfg.embed.model,
        "layer": cfg.embed.layer,
        "pooling": cfg.embed.pooling,
        "image_size": cfg.embed.image_size,
    }


class StageTimer:
    """Times named stages and prints a one-line summary for each."""

    def __init__(self, echo=print) -> None:
        self.seconds: dict[str, float] = {}
        self.echo = echo

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        note: dict[str, str] = {}
        yield note
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.echo(f"[{name}] {note.get('summary', 'done')} ({self.seconds[name]:.1f} s)")


def run_cluster_job(cfg: ClusterJobConfig, *, overwrite: bool = False, echo=print) -> dict[str, Any]:
    """Run the whole job and return the metrics (also written to ``OUT/metrics.json``).

    Raises
    ------
    scenecluster.errors.SceneClusterError
        For bad input, settings or output folders, with a one-line message.
    """
    from scenecluster.models import load_backbone

    timer = StageTimer(echo)
    with_labels = cfg.data.labels == "folders"

    with timer.stage("list") as note:
        listing = list_scenes(
            cfg.data.input, endpoint_url=cfg.data.endpoint_url, sample=cfg.data.sample, seed=cfg.data.seed
        )
        note["summary"] = f"{len(listing)} images under {cfg.data.input}"
    # Fail fast, in the driver, on a model that cannot be loaded (and build the offline fallback once here
    # rather than in every actor), before the output folder is claimed for this run.
    load_backbone(cfg.embed.model)
    out = prepare_output(
        OutputFolder(cfg.output, endpoint_url=cfg.data.endpoint_url), run_identity(cfg), overwrite=overwrite
    )
    out.write_text("config.yaml", dump_config(cfg))

    with timer.stage("embed") as note:
        if out.exists("embeddings.parquet") and out.exists("skipped.txt"):
            n_ok = pq.read_metadata(out.path("embeddings.parquet"), filesystem=out.fs).num_rows
            skipped = [line.split("\t", 1) for line in out.read_text("skipped.txt").splitlines() if line]
            n_images = n_ok + len(skipped)
            note["summary"] = f"reused {out.display('embeddings.parquet')} ({n_ok} embeddings)"
        else:
            resources = ensure_ray(cfg.resources)
            actor_gpus = cfg.embed.actor_gpus or (1.0 if resources.use_gpu else 0.0)
            threads = cfg.embed.torch_threads or max(1, int(resources.cpus_per_node // cfg.embed.num_actors))
            decode_on_gpu = cfg.embed.decode == "gpu" or (cfg.embed.decode == "auto" and actor_gpus > 0)
            result = embed_images(
                listing,
                out,
                model=cfg.embed.model,
                layer=cfg.embed.layer,
                pooling=cfg.embed.pooling,
                image_size=cfg.embed.image_size,
                batch_size=cfg.embed.batch_size,
                num_actors=cfg.embed.num_actors,
                actor_cpus=cfg.embed.actor_cpus,
                actor_gpus=actor_gpus,
                torch_threads=threads,
                decode_on_gpu=decode_on_gpu,
                chunk_size=cfg.embed.chunk_size,
                with_labels=with_labels,
            )
            skipped = [list(s) for s in result.skipped]
            out.write_text("skipped.txt", "".join(f"{p}\t{e}\n" for p, e in skipped))
            n_images = result.n_images
            reused = f", {result.chunks_reused} of {result.chunks_reused + result.chunks_computed} parts reused"
            note["summary"] = (
                f"{n_images - len(skipped)} embedded, {len(skipped)} skipped, "
                f"{n_images / max(result.seconds, 1e-9):.1f} images/s" + (reused if result.chunks_reused else "")
            )
    paths, X, labels = read_embeddings(out.path("embeddings.parquet"), filesystem=out.fs)

    with timer.stage("reduce") as note:
        Z = reduce_embeddings(X, **cfg.reduce.model_dump())
        note["summary"] = f"UMAP {X.shape[1]} -> {Z.shape[1]} dims"

    with timer.stage("cluster") as note:
        device = "cpu" if cfg.resources.device == "cpu" else "auto"
        model = make_clusterer(cfg.cluster, Z, device=device)
        model.fit(Z)
        proba = model.predict_proba(Z)
        raw = proba.argmax(axis=1)
        clusters = relabel_by_size(raw)
        probability = proba[np.arange(len(raw)), raw]
        n_clusters = int(len(np.unique(clusters)))
        note["summary"] = f"{n_clusters} clusters after {model.n_iter_} iterations"

    metrics: dict[str, Any] = {
        "n_images": int(n_images),
        "n_embedded": int(len(paths)),
        "n_skipped": int(len(skipped)),
        "n_clusters": n_clusters,
        "converged": bool(getattr(model, "converged_", True)),
        "lower_bound": float(getattr(model, "lower_bound_", float("nan"))),
    }
    if labels is not None:
        metrics.update({k: v for k, v in score_clusters(labels, clusters).items() if k != "n_clusters"})

    with timer.stage("write") as note:
        table = {
            "path": pa.array(paths, pa.string()),
            "cluster": pa.array(clusters, pa.int32()),
            "probability": pa.array(probability, pa.float32()),
        }
        if labels is not None:
            table["label"] = pa.array(labels, pa.string())
        out.write_table("assignments.parquet", pa.table(table))
        note["summary"] = f"assignments for {len(paths)} images"

    with timer.stage("report") as note:
        xy_index = _subsample(len(paths), cfg.report.scatter_points, seed=cfg.data.seed)
        xy = reduce_embeddings(X[xy_index], **{**cfg.reduce.model_dump(), "n_components": 2})
        size = 96
        html = write_report(
            paths=paths,
            clusters=clusters,
            xy=xy,
            xy_index=xy_index,
            metrics={**metrics, "stage_seconds": timer.seconds},
            read_thumbnail=lambda p: read_image_for_display(listing, p, size),
            labels=labels,
            thumbnails_per_cluster=cfg.report.thumbnails_per_cluster,
            seed=cfg.data.seed,
        )
        out.write_text("report.html", html)
        note["summary"] = out.display("report.html")

    metrics["stage_seconds"] = timer.seconds
    metrics["scenecluster_version"] = __version__
    out.write_text("metrics.json", json.dumps(metrics, indent=2))
    return metrics


def relabel_by_size(raw: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..k-1 from the largest to the smallest, so ids are dense and stable to read."""
    ids, counts = np.unique(raw, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    mapping = {old: new for new, old in enumerate(order)}
    return np.array([mapping[c] for c in raw], dtype=np.int32)


def _subsample(n: int, k: int, *, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
