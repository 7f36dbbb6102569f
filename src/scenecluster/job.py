"""The clustering job: list -> embed (Ray Data) -> project -> cluster -> assignments, metrics, report.

:func:`run_cluster_job` is the one public entry; the CLI, ``rayjobs/cluster.py`` and the tests all call it.
It resolves the feature (:mod:`scenecluster.features`) and the resources (:mod:`scenecluster.devices`) once,
then hands them to each stage. Each stage prints a one-line summary and its wall time lands in
``metrics.json``.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scenecluster import __version__
from scenecluster.cluster import make_clusterer
from scenecluster.config import ClusterJobConfig, dump_config
from scenecluster.data import SceneListing, list_scenes, read_image_for_display
from scenecluster.devices import Resources, decide, local_inventory
from scenecluster.embed import embed_images, read_embeddings
from scenecluster.evaluate import score_clusters
from scenecluster.features import FeatureSpec, resolve_feature_spec
from scenecluster.outputs import OutputFolder, prepare_output
from scenecluster.reduce import reduce_embeddings
from scenecluster.report import write_report

__all__ = ["ClusterResult", "StageTimer", "relabel_by_size", "run_cluster_job", "run_identity"]


def run_identity(cfg: ClusterJobConfig, spec: FeatureSpec) -> dict[str, Any]:
    """The settings that determine the embeddings: a rerun with the same identity may reuse them."""
    return {
        "input": cfg.data.input,
        "labels": cfg.data.labels,
        "sample": cfg.data.sample,
        "seed": cfg.data.seed,
        **spec.identity(),
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


@dataclass
class ClusterResult:
    """What the clustering stage found for the embedded scenes, in their order."""

    clusters: np.ndarray  # (n,) int32, 0 = largest
    probability: np.ndarray  # (n,) float32 of the chosen cluster (1.0 for hard clusterers)
    n_iter: int | None
    converged: bool
    lower_bound: float

    @property
    def n_clusters(self) -> int:
        return int(len(np.unique(self.clusters)))


def run_cluster_job(cfg: ClusterJobConfig, *, overwrite: bool = False, echo=print) -> dict[str, Any]:
    """Run the whole job and return the metrics (also written to ``OUT/metrics.json``).

    Raises
    ------
    scenecluster.errors.SceneClusterError
        For bad input, settings or output folders, with a one-line message, before any Ray task starts.
    """
    timer = StageTimer(echo)
    with timer.stage("list") as note:
        listing = list_scenes(
            cfg.data.input, endpoint_url=cfg.data.endpoint_url, sample=cfg.data.sample, seed=cfg.data.seed
        )
        note["summary"] = f"{len(listing)} images under {cfg.data.input}"
    # The feature is checked against the model's config (not its weights) before the output is claimed and
    # Ray starts, so a bad layer or model fails in the driver in a second; for the offline model this also
    # builds its folder once here rather than in every actor.
    spec = resolve_feature_spec(
        cfg.embed.model, layer=cfg.embed.layer, pooling=cfg.embed.pooling, image_size=cfg.embed.image_size
    )
    out = prepare_output(
        OutputFolder(cfg.output, endpoint_url=cfg.data.endpoint_url), run_identity(cfg, spec), overwrite=overwrite
    )
    out.write_text("config.yaml", dump_config(cfg))
    reuse = out.exists("embeddings.parquet") and out.exists("skipped.txt")
    resources = _decide_resources(cfg, start_ray=not reuse)

    with timer.stage("embed") as note:
        n_images, skipped = _embed_stage(cfg, listing, out, spec, resources, note)
    paths, X, labels = read_embeddings(out.path("embeddings.parquet"), filesystem=out.fs)
    with timer.stage("reduce") as note:
        Z = reduce_embeddings(X, **_reduce_settings(cfg, resources))
        note["summary"] = f"{cfg.reduce.method} {X.shape[1]} -> {Z.shape[1]} dims"
    with timer.stage("cluster") as note:
        found = fit_clusters(cfg, Z, resources)
        iterations = f" after {found.n_iter} iterations" if found.n_iter is not None else ""
        note["summary"] = f"{found.n_clusters} clusters{iterations}"

    metrics = _metrics(n_images, len(paths), len(skipped), found, labels)
    with timer.stage("write") as note:
        out.write_table("assignments.parquet", _assignments_table(paths, found, labels))
        note["summary"] = f"assignments for {len(paths)} images"
    with timer.stage("report") as note:
        html = _report(cfg, resources, listing, paths, X, labels, found, {**metrics, "stage_seconds": timer.seconds})
        out.write_text("report.html", html)
        note["summary"] = out.display("report.html")

    metrics["stage_seconds"] = timer.seconds
    metrics["scenecluster_version"] = __version__
    out.write_text("metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _decide_resources(cfg: ClusterJobConfig, *, start_ray: bool) -> Resources:
    """The run's one resource decision: on the Ray cluster when embedding work remains, else this machine."""
    if start_ray:
        from scenecluster.raycluster import ensure_ray

        inventory = ensure_ray(cfg.resources)
    else:
        inventory = local_inventory()
    return decide(
        cfg.resources.device,
        inventory,
        actors=cfg.embed.num_actors,
        torch_threads=cfg.resources.torch_threads,
        actor_gpus=cfg.embed.actor_gpus,
        decode=cfg.embed.decode,
    )


def _embed_stage(
    cfg: ClusterJobConfig, listing: SceneListing, out: OutputFolder, spec: FeatureSpec, resources: Resources, note
) -> tuple[int, list[list[str]]]:
    """Embed (or reuse the embeddings of an earlier run of the same identity); return counts and skipped rows."""
    if out.exists("embeddings.parquet") and out.exists("skipped.txt"):
        n_ok = pq.read_metadata(out.path("embeddings.parquet"), filesystem=out.fs).num_rows
        skipped = [line.split("\t", 1) for line in out.read_text("skipped.txt").splitlines() if line]
        note["summary"] = f"reused {out.display('embeddings.parquet')} ({n_ok} embeddings)"
        return n_ok + len(skipped), skipped
    result = embed_images(
        listing, out, spec, resources=resources, settings=cfg.embed, with_labels=cfg.data.labels == "folders"
    )
    skipped = [list(s) for s in result.skipped]
    out.write_text("skipped.txt", "".join(f"{p}\t{e}\n" for p, e in skipped))
    reused = f", {result.chunks_reused} of {result.chunks_reused + result.chunks_computed} parts reused"
    note["summary"] = (
        f"{result.n_images - len(skipped)} embedded, {len(skipped)} skipped, "
        f"{result.n_images / max(result.seconds, 1e-9):.1f} images/s" + (reused if result.chunks_reused else "")
    )
    return result.n_images, skipped


def _reduce_settings(cfg: ClusterJobConfig, resources: Resources, **changes: Any) -> dict[str, Any]:
    settings = {**cfg.reduce.model_dump(), **changes}
    settings["backend"] = resources.umap_backend(cfg.reduce.backend)
    return settings


def fit_clusters(cfg: ClusterJobConfig, Z: np.ndarray, resources: Resources) -> ClusterResult:
    """Fit the configured clusterer on the projection ``Z``; clusters renumbered from the largest.

    Only ``fit_predict`` is required of the estimator; ``predict_proba``, ``n_iter_``, ``converged_`` and
    ``lower_bound_`` are used when it has them.
    """
    model = make_clusterer(cfg.cluster, Z, device=resources.fit_device)
    raw = np.asarray(model.fit_predict(Z))
    if hasattr(model, "predict_proba"):
        proba = model.predict_proba(Z)
        raw = proba.argmax(axis=1)
        probability = proba[np.arange(len(raw)), raw].astype(np.float32)
    else:
        probability = np.ones(len(raw), dtype=np.float32)
    n_iter = getattr(model, "n_iter_", None)
    return ClusterResult(
        clusters=relabel_by_size(raw),
        probability=probability,
        n_iter=None if n_iter is None else int(n_iter),
        converged=bool(getattr(model, "converged_", True)),
        lower_bound=float(getattr(model, "lower_bound_", float("nan"))),
    )


def _metrics(n_images: int, n_embedded: int, n_skipped: int, found: ClusterResult, labels) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "n_images": int(n_images),
        "n_embedded": int(n_embedded),
        "n_skipped": int(n_skipped),
        "n_clusters": found.n_clusters,
        "converged": found.converged,
        "lower_bound": found.lower_bound,
    }
    if labels is not None:
        metrics.update({k: v for k, v in score_clusters(labels, found.clusters).items() if k != "n_clusters"})
    return metrics


def _assignments_table(paths: list[str], found: ClusterResult, labels) -> pa.Table:
    table = {
        "path": pa.array(paths, pa.string()),
        "cluster": pa.array(found.clusters, pa.int32()),
        "probability": pa.array(found.probability, pa.float32()),
    }
    if labels is not None:
        table["label"] = pa.array(labels, pa.string())
    return pa.table(table)


def _report(cfg, resources, listing, paths, X, labels, found: ClusterResult, metrics: dict[str, Any]) -> str:
    """The HTML report, with a 2-D projection of a subsample for the scatter."""
    xy_index = _subsample(len(paths), cfg.report.scatter_points, seed=cfg.data.seed)
    xy = reduce_embeddings(X[xy_index], **_reduce_settings(cfg, resources, n_components=2))
    size = 96
    return write_report(
        paths=paths,
        clusters=found.clusters,
        xy=xy,
        xy_index=xy_index,
        metrics=metrics,
        read_thumbnail=lambda p: read_image_for_display(listing, p, size),
        labels=labels,
        thumbnails_per_cluster=cfg.report.thumbnails_per_cluster,
        seed=cfg.data.seed,
    )


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
