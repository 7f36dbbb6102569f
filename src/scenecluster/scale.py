"""The archive-scale stages on Ray: workers embed and write parts, a GPU task fits, actors assign every part.

No per-scene data passes through the driver. Each stage maps over *parts* (see :mod:`scenecluster.manifest`):

* :class:`PartEmbedder` (Ray Data actors, a GPU each on GPU clusters) reads a part's scenes with a pool of I/O
  threads, decodes them (nvJPEG on a GPU, PIL otherwise), embeds them and writes ``embeddings/<part>.parquet``
  itself, atomically; it returns counts. A part whose file exists is skipped, so a rerun recomputes only what
  is missing, and parts finish in any order (nothing waits for an earlier part).
* :func:`fit_on_sample` runs in one Ray task (with a GPU when the cluster has one: cuML UMAP and the DP-GMM on
  CUDA) on a seeded sample of at most ``fit_sample`` embeddings read straight from the parts, and saves the
  fitted clustering to ``clustering/``.
* :class:`PartAssigner` (Ray Data actors) loads the saved clustering and writes ``assignments/<part>.parquet``
  (coordinates, cluster, probability, log-likelihood, novel) for every part, returning per-cluster counts
  and the (cluster, label) contingency, from which the driver scores the whole archive.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scenecluster.data import decode_batch, folder_label, read_batch
from scenecluster.outputs import OutputFolder
from scenecluster.shard_members import MEMBERS, member_ranges
from scenecluster.vectors import vector_column, vector_matrix

__all__ = [
    "PartAssigner",
    "PartEmbedder",
    "assign_named_parts",
    "calibration_split",
    "embed_named_parts",
    "fit_count",
    "fit_on_sample",
    "matrix",
    "ok_rows",
    "sample_embeddings",
]

EMBEDDINGS = "embeddings"
ASSIGNMENTS = "assignments"
SAMPLE_FILE = "clustering/fit_sample.parquet"


def ok_rows(table: pa.Table) -> pa.Table:
    """The rows of an embeddings part that were read and embedded."""
    return table.filter(pc.equal(table.column("error"), ""))


def matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    return vector_matrix(table, column)


def embed_named_parts(
    spec, out: OutputFolder, filesystem, resources, parts: list[tuple[str, str]], *, batch_size: int, with_labels: bool
) -> list[dict[str, Any]]:
    """Ray task: what a :class:`PartEmbedder` actor does for ``parts`` (``(manifest file, part name)``), in one
    worker; each part's counts."""
    from scenecluster.manifest import load_parts

    names = pa.table({"file": [file for file, _ in parts], "name": [name for _, name in parts]})
    table = load_parts(names, out, ["name", "sources"])
    embedder = PartEmbedder(spec, out, filesystem, resources, batch_size=batch_size, with_labels=with_labels)
    return [
        embedder.embed_part(str(name), list(sources))
        for name, sources in zip(table.column("name").to_pylist(), table.column("sources").to_pylist(), strict=True)
    ]


class PartEmbedder:
    """Ray Data actor: embeds whole parts and writes each as ``embeddings/<part>.parquet``.

    Parameters
    ----------
    spec : FeatureSpec
    out : OutputFolder
        The run folder (local or S3); parts are written there by this actor.
    filesystem : pyarrow FileSystem
        Where the scenes are read from.
    resources : Resources
        The driver's decision: device, dtype, threads, and whether JPEGs are decoded on the GPU.
    batch_size : int
        Images per model call.
    with_labels : bool
        Store each scene's folder name as ``label``.
    io_threads : int
        Reads in flight while the model runs, so storage latency overlaps with compute.
    """

    def __init__(
        self, spec, out: OutputFolder, filesystem, resources, *, batch_size: int, with_labels: bool, io_threads: int = 8
    ) -> None:
        from scenecluster.embed import Embedder

        self.embedder = Embedder(
            spec, device=resources.device, dtype=resources.dtype, torch_threads=resources.torch_threads
        )
        self.out, self.fs = out, filesystem
        self.decode_here = not resources.decode_on_gpu
        self.batch_size, self.with_labels = batch_size, with_labels
        self.pool = ThreadPoolExecutor(io_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = [
            self.embed_part(str(name), list(sources))
            for name, sources in zip(batch["name"], batch["sources"], strict=True)
        ]
        return {key: np.array([c[key] for c in counts]) for key in ("name", "n_rows", "n_ok", "reused")}

    def embed_part(self, name: str, sources: list[str]) -> dict[str, Any]:
        """Embed one part's ``sources`` into ``embeddings/<name>.parquet`` (unless it is there); its counts."""
        target = posixpath.join(EMBEDDINGS, f"{name}.parquet")
        if self.out.exists(target):
            errors = pq.read_table(self.out.path(target), columns=["error"], filesystem=self.out.fs).column("error")
            return {
                "name": name,
                "n_rows": len(errors),
                "n_ok": int(pc.sum(pc.equal(errors, "")).as_py() or 0),
                "reused": True,
            }
        # All reads are submitted at once; micro-batches are embedded as soon as their rows have arrived, so
        # storage latency overlaps with the model instead of preceding it.
        reads = self.pool.map(
            lambda s: read_batch({"source": np.array([s], dtype=object)}, filesystem=self.fs), sources
        )
        pending: dict[str, list] = {"path": [], "bytes": [], "error": []}
        done: list[dict[str, np.ndarray]] = []
        places: dict[str, list] = {"paths": [], "offsets": [], "sizes": []}
        for r in reads:
            for key in pending:
                pending[key].extend(r[key])
            places["paths"] += r["path"].tolist()
            places["offsets"] += r["offset"].tolist()
            places["sizes"] += [len(b) for b in r["bytes"]]
            while len(pending["path"]) >= self.batch_size:
                done.append(self._embed_batch({k: v[: self.batch_size] for k, v in pending.items()}))
                pending = {k: v[self.batch_size :] for k, v in pending.items()}
        if pending["path"]:
            done.append(self._embed_batch(pending))
        table = self._part_table(done)
        ranges = member_ranges(**places)
        if ranges is not None:  # before the part: a finished part always has its members' places
            self.out.write_table(posixpath.join(MEMBERS, f"{name}.parquet"), ranges)
        self.out.write_table(target, table)
        n_ok = int(pc.sum(pc.equal(table.column("error"), "")).as_py() or 0)
        return {"name": name, "n_rows": table.num_rows, "n_ok": n_ok, "reused": False}

    def _embed_batch(self, rows: dict[str, list]) -> dict[str, np.ndarray]:
        batch = {k: np.asarray(v, dtype=object) for k, v in rows.items()}
        if self.decode_here:
            spec = self.embedder.spec
            batch = decode_batch(batch, image_size=spec.image_size, pixels=spec.pixels)
        return self.embedder(batch)

    def _part_table(self, results: list[dict[str, np.ndarray]]) -> pa.Table:
        paths = [str(p) for r in results for p in r["path"]]
        errors = [str(e) for r in results for e in r["error"]]
        width = self.embedder.n_features
        vectors = np.concatenate([r["embedding"] for r in results]) if results else np.zeros((0, width), np.float32)
        cols: dict[str, Any] = {"path": pa.array(paths, pa.string())}
        if self.with_labels:
            cols["label"] = pa.array([folder_label(p) for p in paths], pa.string())
        cols["error"] = pa.array(errors, pa.string())
        cols["embedding"] = vector_column(vectors)
        return pa.table(cols)


def sample_embeddings(out: OutputFolder, parts: list[tuple[str, int]], size: int, seed: int) -> pa.Table:
    """A seeded uniform sample of ``size`` embedded rows across ``parts`` (name, number of embedded rows).

    Row indices are drawn once over all embedded rows, so the sample does not depend on how the archive was
    cut into parts beyond their order; a sample as large as the archive is the archive, in part order.
    """
    counts = np.array([n for _, n in parts], dtype=np.int64)
    total = int(counts.sum())
    chosen = np.arange(total) if size >= total else np.sort(np.random.default_rng(seed).choice(total, size, False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    tables = []
    for i, (name, _) in enumerate(parts):
        local = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
        if len(local):
            table = ok_rows(out.read_table(posixpath.join(EMBEDDINGS, f"{name}.parquet")))
            tables.append(table.take(pa.array(local)))
    return pa.concat_tables(tables)


CALIBRATION_MIN = 100  # below this many sampled scenes the novelty threshold comes from the fit itself


def fit_on_sample(
    out: OutputFolder,
    parts: list[tuple[str, int]],
    *,
    fit_sample: int,
    seed: int,
    feature: dict,
    reduce: dict,
    cluster,
    device: str,
    novelty_quantile: float,
    scatter_points: int,
    fit_key: str = "",
    data_prior_fit_key: str = "",
    reading: int | None = None,
) -> dict[str, Any]:
    """Fit and save the clustering on a sample of the run's embeddings (runs as a Ray task).

    The novelty threshold is calibrated the way new scenes are assigned: on a held-out tenth of the sample
    (at most 5,000 scenes), projected with ``transform`` rather than fitted, since a projection packs its own
    training points more tightly than any new point and would flag most new scenes. Saves ``clustering/``
    (see :mod:`scenecluster.fitted`) and ``clustering/fit_sample.parquet`` (the fitted rows' coordinates,
    cluster, probability and log-likelihood, so the assignment pass gives them exactly what the fit gave);
    returns the fit's summary and, for the report, the sample with a 2-D projection of up to
    ``scatter_points`` of it.
    """
    from scenecluster.fitted import fit_clustering, save_clustering

    sample = sample_embeddings(out, parts, fit_sample, seed)
    X = matrix(sample)
    fit_index, calibration = calibration_split(len(X), seed)
    fitted, fit_clusters, coords = fit_clustering(
        X[fit_index], feature=feature, reduce=reduce, cluster=cluster, device=device, novelty_quantile=novelty_quantile
    )
    clusters = np.empty(len(X), dtype=np.int32)
    clusters[fit_index] = fit_clusters
    if len(calibration):
        held_out = fitted.calibrate_novelty(X[calibration], novelty_quantile)
        clusters[calibration] = held_out["cluster"]
        fitted.info["novelty_calibration"] = f"{len(calibration)} held-out scenes' nearest-fitted-scene distance"
    _write_fitted_rows(out, sample.take(pa.array(fit_index)), fitted, fit_clusters, coords)
    summary = {
        "info": fitted.info,
        "n_clusters": fitted.n_clusters,
        "n_fit": len(fit_index),
        "novelty_threshold": fitted.novelty_threshold,
    }
    keys = {"fit_key": fit_key, "data_prior_fit_key": data_prior_fit_key or fit_key, "reading": reading}
    save_clustering(fitted, out, **keys, summary=summary)  # clustering.json last: it marks the fit done
    report = _report_sample(sample, X, clusters, reduce, scatter_points, seed)
    return {**summary, "report": report, "stage_seconds": fitted.info["seconds"]}


def fit_count(n: int, fit_sample: int) -> int:
    """How many of ``n`` embedded scenes the fit itself sees: at most ``fit_sample``, less the held-out tenth."""
    sampled = min(n, fit_sample)
    return sampled if sampled < CALIBRATION_MIN else sampled - min(5000, max(10, sampled // 10))


def calibration_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices to fit on and indices held out to calibrate the novelty threshold (none for small samples)."""
    if n < CALIBRATION_MIN:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    held = np.random.default_rng([seed, 1]).choice(n, size=min(5000, max(10, n // 10)), replace=False)
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _write_fitted_rows(out: OutputFolder, rows: pa.Table, fitted, clusters: np.ndarray, coords: np.ndarray) -> None:
    proba, loglik = _fitted_scores(fitted, coords, len(coords))
    table = {
        "path": rows.column("path"),
        "coords": vector_column(coords),
        "cluster": pa.array(clusters, pa.int32()),
        "probability": pa.array(proba, pa.float32()),
        "log_likelihood": pa.array(loglik, pa.float32()),
    }
    out.write_table(SAMPLE_FILE, pa.table(table))


def _fitted_scores(fitted, coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    clusterer = fitted.clusterer
    if hasattr(clusterer, "predict_proba"):
        proba = clusterer.predict_proba(coords)
        proba = proba[np.arange(n), proba.argmax(axis=1)]
    else:
        proba = np.ones(n)
    loglik = clusterer.score_samples(coords) if hasattr(clusterer, "score_samples") else np.zeros(n)
    return proba, loglik


def _report_sample(
    sample: pa.Table, X: np.ndarray, clusters: np.ndarray, reduce: dict, points: int, seed: int
) -> dict[str, Any]:
    """The rows the report draws: paths, labels, clusters and a 2-D projection of up to ``points`` of them."""
    from scenecluster.reduce import reduce_embeddings

    n = len(X)
    index = np.arange(n) if n <= points else np.sort(np.random.default_rng(seed).choice(n, points, replace=False))
    settings = {**reduce, "n_components": 2}
    if "n_neighbors" in settings:  # the fit has warned already of fewer scenes than neighbours: the picture need not
        settings["n_neighbors"] = max(2, min(settings["n_neighbors"], len(index) - 1))
    xy = reduce_embeddings(X[index], **settings)
    labels = sample.column("label").to_pylist() if "label" in sample.column_names else None
    return {
        "paths": sample.column("path").to_pylist(),
        "labels": labels,
        "clusters": clusters,
        "xy": xy,
        "xy_index": index,
    }


class PartAssigner:
    """Ray Data actor: assigns every embedded row of whole parts with the run's saved clustering."""

    def __init__(self, out: OutputFolder, clustering_from: OutputFolder, *, device: str, with_labels: bool) -> None:
        from scenecluster.fitted import load_clustering

        self.out, self.with_labels = out, with_labels
        self.fitted = load_clustering(clustering_from, device=device)
        self.known: dict[str, int] = {}
        self.known_values: dict[str, np.ndarray] = {}
        if clustering_from.exists(SAMPLE_FILE) and clustering_from.uri == out.uri:
            rows = clustering_from.read_table(SAMPLE_FILE)
            self.known = {p: i for i, p in enumerate(rows.column("path").to_pylist())}
            self.known_values = {key: rows.column(key).to_numpy() for key in _KEPT_FROM_FIT}
            self.known_values["coords"] = matrix(rows, "coords")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = [self.assign_part(str(name)) for name in batch["name"]]
        return {"name": np.array([str(n) for n in batch["name"]]), "counts": np.array(counts, dtype=object)}

    def assign_part(self, name: str) -> str:
        """Assign part ``name`` (or read it back when an earlier pass wrote it); its counts as JSON."""
        target = posixpath.join(ASSIGNMENTS, f"{name}.parquet")
        if self.out.exists(target):
            table = self.out.read_table(target)
        else:
            table = self._assign(ok_rows(self.out.read_table(posixpath.join(EMBEDDINGS, f"{name}.parquet"))))
            self.out.write_table(target, table)
        return json.dumps(_part_counts(table))

    def _assign(self, part: pa.Table) -> pa.Table:
        """Rows the fit saw keep exactly what the fit gave them; only the others are projected.

        Why only the others: a run no larger than ``scale.fit_sample`` has nine scenes in ten in the fit, and
        UMAP's ``transform`` (about 200 rows/s per core) is nearly all of the assignment's cost.
        """
        X = matrix(part)
        fit_row = np.array([self.known.get(p, -1) for p in part.column("path").to_pylist()], dtype=np.int64)
        seen = fit_row >= 0
        placed = None if seen.all() else self.fitted.assign(X[~seen])
        if placed is not None:
            width = placed["coords"].shape[1]
        elif seen.any():
            width = self.known_values["coords"].shape[1]
        else:
            width = None  # an empty part: the projection's configured width
        result = _empty_assignment(self.fitted, len(X), width=width)  # distance 0 stays for fitted rows
        if placed is not None:
            for key in result:
                result[key][~seen] = placed[key]
        if seen.any():
            for key in (*_KEPT_FROM_FIT, "coords"):
                result[key][seen] = self.known_values[key][fit_row[seen]]
        result["novel"] = self.fitted.is_novel(result)
        cols: dict[str, Any] = {
            "path": part.column("path"),
            "cluster": pa.array(result["cluster"], pa.int32()),
            "probability": pa.array(result["probability"], pa.float32()),
        }
        if "label" in part.column_names:
            cols["label"] = part.column("label")
        cols["log_likelihood"] = pa.array(result["log_likelihood"], pa.float32())
        cols["neighbour_distance"] = pa.array(result["neighbour_distance"], pa.float32())
        cols["novel"] = pa.array(result["novel"], pa.bool_())
        cols["coords"] = vector_column(result["coords"])
        return pa.table(cols)


def assign_named_parts(
    out: OutputFolder, clustering_from: OutputFolder, names: list[str], *, device: str, with_labels: bool
) -> list[str]:
    """Ray task: what a :class:`PartAssigner` actor does for ``names``, in one worker; each part's counts JSON."""
    assigner = PartAssigner(out, clustering_from, device=device, with_labels=with_labels)
    return [assigner.assign_part(name) for name in names]


_KEPT_FROM_FIT = ("cluster", "probability", "log_likelihood")  # with "coords": what a fitted row keeps


def _empty_assignment(fitted, n: int = 0, width: int | None = None) -> dict[str, np.ndarray]:
    d = int(fitted.reduce.get("n_components", 2)) if width is None else width
    return {
        "coords": np.zeros((n, d), np.float32),
        "cluster": np.zeros(n, np.int32),
        "probability": np.zeros(n, np.float32),
        "log_likelihood": np.zeros(n, np.float32),
        "neighbour_distance": np.zeros(n, np.float32),
    }


def _part_counts(table: pa.Table) -> dict[str, Any]:
    clusters = table.column("cluster").to_numpy()
    pairs: Counter = Counter()
    if "label" in table.column_names:
        pairs.update(zip(clusters.tolist(), table.column("label").to_pylist(), strict=True))
    return {
        "n": table.num_rows,
        "novel": int(np.asarray(table.column("novel")).sum()),
        "sizes": dict(Counter(clusters.tolist())),
        "pairs": [[c, lab, n] for (c, lab), n in pairs.items()],
    }
