"""A fitted clustering as a model: fit the projection and the mixture on a sample, then assign any scene.

:func:`fit_clustering` fits the ``reduce`` and ``cluster`` settings on a sample of embeddings (in a Ray task
that holds a GPU when the cluster has one; see :mod:`scenecluster.scale`). The result, :class:`FittedClustering`,
assigns new embeddings (projected coordinates, cluster, its probability, the log-likelihood and a ``novel``
flag) and is saved as one folder:

``clustering.json``
    the feature spec (backbone reference, layer, pooling, image size, bands and stretch), the cluster ids of the
    mixture's components, the novelty threshold and the versions that made it;
``mixture.safetensors``, ``mixture.json``
    the DP-GMM's parameters (plain arrays and JSON: no code runs when they are loaded);
``projection.pkl``
    the fitted UMAP (or PCA) in its library's own serialisation (pickle). Loading it runs code, so a saved
    clustering is trusted input, like any pickle: load only folders you or your pipeline wrote. The library
    and its version are recorded, and a different version is refused rather than silently mis-projecting.
``clusterer.pkl``
    instead of the two mixture files, for a clusterer that is not ours (``cluster.method: kmeans``, a
    scikit-learn ``KMeans``): pickled, with scikit-learn's version recorded and checked like the projection's.

Cluster ids are those of the fit (0 = largest on the sample) and never change when more scenes are assigned.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scenecluster.cluster import make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.errors import InputError
from scenecluster.reduce import make_projection

__all__ = ["FittedClustering", "fit_clustering", "load_clustering", "read_clustering_meta", "save_clustering"]

FORMAT = "scenecluster-clustering/1"
_LIBRARIES = {"umap": "umap-learn", "pca": "scikit-learn"}
_MIXTURE = "dpgmm"  # clustering.json "clusterer": our DP-GMM as safetensors + JSON
_PICKLED = "pickle"  # any other estimator, in its library's own serialisation


@dataclass
class FittedClustering:
    """A projection and a clusterer fitted together, with the feature they expect.

    Attributes
    ----------
    feature : dict
        The :meth:`scenecluster.features.FeatureSpec.identity` of the embeddings it was fitted on.
    projection : fitted transformer with ``transform``
    clusterer : fitted estimator with ``predict`` (and ``predict_proba``, ``score_samples`` for a mixture)
    cluster_ids : ndarray of int, shape (n_components,)
        The run's cluster id of each mixture component (-1: no scene of the fit chose it).
    novelty_threshold : float
        Scenes whose log-likelihood falls below it are flagged ``novel`` (-inf: never).
    novelty_quantile : float
        The share of the fitted sample below the threshold.
    info : dict
        Fit summary (sample size, iterations, lower bound, versions).
    """

    feature: dict[str, Any]
    projection: Any
    clusterer: Any
    cluster_ids: np.ndarray
    novelty_threshold: float
    novelty_quantile: float
    reduce: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int((self.cluster_ids >= 0).sum())

    def assign(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Embeddings ``(n, n_features)`` -> ``coords`` (n, d), ``cluster``, ``probability``, ``log_likelihood``
        and ``novel`` (each (n,))."""
        X = np.asarray(X, dtype=np.float32)
        Z = self.projection.transform(X)
        Z = np.asarray(Z.get() if hasattr(Z, "get") else Z, dtype=np.float32)
        if hasattr(self.clusterer, "predict_proba"):
            proba = self.clusterer.predict_proba(Z)
            component = proba.argmax(axis=1)
            probability = proba[np.arange(len(Z)), component]
        else:
            component = self.clusterer.predict(Z)
            probability = np.ones(len(Z))
        if hasattr(self.clusterer, "score_samples"):
            log_likelihood = self.clusterer.score_samples(Z)
        else:
            log_likelihood = np.zeros(len(Z))
        return {
            "coords": Z,
            "cluster": self.cluster_ids[component].astype(np.int32),
            "probability": probability.astype(np.float32),
            "log_likelihood": log_likelihood.astype(np.float32),
            "novel": log_likelihood < self.novelty_threshold,
        }


def fit_clustering(
    X: np.ndarray,
    *,
    feature: dict[str, Any],
    reduce: ReduceConfig | dict[str, Any],
    cluster: ClusterConfig,
    device: str = "cpu",
    novelty_quantile: float = 0.01,
) -> tuple[FittedClustering, np.ndarray, np.ndarray]:
    """Fit the projection and the clusterer on ``X`` (n_samples, n_features); return the model, the
    sample's cluster ids (0 = largest) and its projected coordinates.

    ``reduce`` holds the ``reduce`` section's settings with ``backend`` already resolved (cuML or umap-learn).
    """
    from scenecluster.job import relabel_by_size

    settings = reduce.model_dump() if isinstance(reduce, ReduceConfig) else dict(reduce)
    n = len(X)
    if settings.get("n_neighbors", 30) >= n:
        settings["n_neighbors"] = max(2, n - 1)
    n_distinct = count_distinct(X, limit=cluster.n_components)
    if n_distinct < cluster.n_components:
        cluster = cluster.model_copy(update={"n_components": n_distinct})
    start = time.perf_counter()
    projection = make_projection(**settings)
    Z = np.asarray(_as_numpy(projection.fit_transform(np.asarray(X, dtype=np.float32))), dtype=np.float32)
    reduce_seconds = time.perf_counter() - start
    clusterer = make_clusterer(cluster, Z, device=device)
    raw = np.asarray(clusterer.fit_predict(Z))
    clusters = relabel_by_size(raw)
    n_components = int(getattr(clusterer, "n_components", raw.max() + 1))
    cluster_ids = np.full(max(n_components, int(raw.max()) + 1), -1, dtype=np.int32)
    cluster_ids[raw] = clusters
    threshold = -np.inf
    if hasattr(clusterer, "score_samples"):
        threshold = float(np.quantile(clusterer.score_samples(Z), novelty_quantile))
    cluster_end = time.perf_counter()
    info = {
        "n_fit": int(n),
        "n_distinct": n_distinct,
        "n_components": cluster.n_components,
        "n_iter": _maybe_int(getattr(clusterer, "n_iter_", None)),
        "converged": bool(getattr(clusterer, "converged_", True)),
        "lower_bound": float(getattr(clusterer, "lower_bound_", float("nan"))),
        "versions": _versions(settings.get("method", "umap"), settings.get("backend", "umap-learn")),
        "seconds": {"reduce": round(reduce_seconds, 3), "cluster": round(cluster_end - start - reduce_seconds, 3)},
    }
    fitted = FittedClustering(
        feature=dict(feature),
        projection=projection,
        clusterer=clusterer,
        cluster_ids=cluster_ids,
        novelty_threshold=threshold,
        novelty_quantile=novelty_quantile,
        reduce=settings,
        info=info,
    )
    return fitted, clusters, Z


#: Embeddings closer than this in cosine distance are the same scene (two real scenes are 100x further apart),
#: however differently a batch's arithmetic rounded them.
SAME_SCENE = 1e-4


def count_distinct(X: np.ndarray, *, limit: int, tol: float = SAME_SCENE) -> int:
    """How many different scenes ``X`` (n_samples, n_features) holds, counting up to ``limit`` (then ``limit``).

    Rows within ``tol`` cosine distance of a group's first row are one scene. The fit caps the mixture's
    components at this count: a projection spreads even copies of one scene over a layout of its own, in which
    a mixture would find clusters that are not there (40 copies of one image gave 3), while there cannot be
    more clusters than different scenes.
    """
    rows = np.asarray(X, dtype=np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    count = 0
    while len(rows) and count < limit:
        count += 1
        rows = rows[1.0 - rows @ rows[0] > tol]
    return count


def save_clustering(fitted: FittedClustering, out, folder: str = "clustering", **extra: Any) -> None:
    """Write ``fitted`` under ``out/folder`` (an :class:`scenecluster.outputs.OutputFolder`), each file atomically.

    The DP-GMM is written as plain arrays and JSON; any other clusterer (k-means) is pickled, the same trusted
    input as the projection.
    """
    from scenecluster.mixture import DPGMM

    if isinstance(fitted.clusterer, DPGMM):
        kind = _MIXTURE
        _save_mixture(fitted.clusterer, out, folder)
    else:
        kind = _PICKLED
        out.write_bytes(f"{folder}/clusterer.pkl", _pickled(fitted.clusterer))
    out.write_bytes(f"{folder}/projection.pkl", _pickled(fitted.projection))
    versions = dict(fitted.info.get("versions", {}))
    if kind == _PICKLED:
        versions.update(_versions("pca", "scikit-learn"))
    meta = {
        "format": FORMAT,
        "feature": fitted.feature,
        "clusterer": kind,
        "cluster_ids": fitted.cluster_ids.tolist(),
        "novelty_threshold": fitted.novelty_threshold,
        "novelty_quantile": fitted.novelty_quantile,
        "reduce": fitted.reduce,
        "info": {**fitted.info, "versions": versions},
        **extra,
    }
    out.write_text(f"{folder}/clustering.json", json.dumps(meta, indent=2, default=str) + "\n")


def _save_mixture(mixture: Any, out, folder: str) -> None:
    import tempfile
    from pathlib import Path

    from scenecluster.mixture._persist import ARRAYS_FILE, META_FILE, save_dpgmm

    with tempfile.TemporaryDirectory() as tmp:
        save_dpgmm(mixture, tmp)
        for name in (ARRAYS_FILE, META_FILE):
            out.write_bytes(f"{folder}/{name}", (Path(tmp) / name).read_bytes())


def _load_mixture(out, folder: str, device: str) -> Any:
    import tempfile
    from pathlib import Path

    from scenecluster.mixture._persist import ARRAYS_FILE, META_FILE, load_dpgmm

    with tempfile.TemporaryDirectory() as tmp:
        for name in (ARRAYS_FILE, META_FILE):
            (Path(tmp) / name).write_bytes(out.read_bytes(f"{folder}/{name}"))
        return load_dpgmm(tmp, device=device)


def _pickled(obj: Any) -> bytes:
    buffer = io.BytesIO()
    pickle.dump(obj, buffer, protocol=pickle.HIGHEST_PROTOCOL)
    return buffer.getvalue()


def read_clustering_meta(out, folder: str = "clustering") -> dict[str, Any]:
    """The JSON half of a saved clustering (feature, cluster ids, threshold, fit summary), checked."""
    if not out.exists(f"{folder}/clustering.json"):
        raise InputError(f"{out.display(folder)} holds no saved clustering (clustering.json is missing)")
    meta = json.loads(out.read_text(f"{folder}/clustering.json"))
    if meta.get("format") != FORMAT:
        raise InputError(f"{out.display(folder)} is not a saved clustering of format {FORMAT}")
    return meta


def load_clustering(out, folder: str = "clustering", *, device: str = "auto") -> FittedClustering:
    """Read a clustering saved by :func:`save_clustering` (trusted input: the projection is a pickle)."""
    meta = read_clustering_meta(out, folder)
    _check_versions(meta["info"].get("versions", {}), out.display(folder))
    kind = meta.get("clusterer", _MIXTURE)
    if kind == _MIXTURE:
        clusterer = _load_mixture(out, folder, device)
    elif kind == _PICKLED:
        clusterer = pickle.loads(out.read_bytes(f"{folder}/clusterer.pkl"))  # trusted input, see module docstring
    else:
        raise InputError(f"{out.display(folder)} holds a clusterer of unknown kind {kind!r}")
    projection = pickle.loads(out.read_bytes(f"{folder}/projection.pkl"))  # trusted input, see module docstring
    return FittedClustering(
        feature=meta["feature"],
        projection=projection,
        clusterer=clusterer,
        cluster_ids=np.asarray(meta["cluster_ids"], dtype=np.int32),
        novelty_threshold=float(meta["novelty_threshold"]),
        novelty_quantile=float(meta["novelty_quantile"]),
        reduce=meta.get("reduce", {}),
        info=meta["info"],
    )


def _versions(method: str, backend: str) -> dict[str, str]:
    names = {"scenecluster", "numpy", _LIBRARIES.get(method, "scikit-learn")}
    if method == "umap" and backend == "cuml":
        names = (names - {"umap-learn"}) | {"cuml"}
    found = {}
    for name in sorted(names):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _check_versions(saved: dict[str, str], where: str) -> None:
    """Refuse a projection pickled by another version of its library: it may unpickle into wrong numbers."""
    for name in ("umap-learn", "cuml", "scikit-learn"):
        if name not in saved:
            continue
        try:
            here = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise InputError(f"{where} was fitted with {name} {saved[name]}, which is not installed here") from None
        if here != saved[name]:
            raise InputError(f"{where} was fitted with {name} {saved[name]}; this machine has {here}: install it")


def _as_numpy(Y: Any) -> np.ndarray:
    return Y.get() if hasattr(Y, "get") else np.asarray(Y)


def _maybe_int(value: Any) -> int | None:
    return None if value is None else int(value)
