"""A fitted clustering as a model: fit the projection and the mixture on a sample, then assign any scene.

:func:`fit_clustering` fits the ``reduce`` and ``cluster`` settings on a sample of embeddings (in a Ray task
that holds a GPU when the cluster has one; see :mod:`scenecluster.scale`). The result, :class:`FittedClustering`,
assigns new embeddings (projected coordinates, cluster, its probability, the log-likelihood and a ``novel``
flag) and is saved as one folder:

``clustering.json``
    the feature spec (backbone reference, layer, pooling, image size, bands and stretch), the cluster ids of the
    mixture's components, the novelty threshold, the versions that made it and (``reading``) the revision that
    read its scenes other than JPEG (:data:`scenecluster.pixels.READING_REVISION`; null for JPEGs alone);
``mixture.safetensors``, ``mixture.json``
    the DP-GMM's parameters (plain arrays and JSON: no code runs when they are loaded);
``projection.pkl``
    the fitted UMAP (or PCA) in its library's own serialisation (pickle). Loading it runs code, so a saved
    clustering is trusted input, like any pickle: load only folders you or your pipeline wrote. The library
    and its version are recorded, and a different version is refused rather than silently mis-projecting.
``reference.safetensors``
    the fitted scenes' unit-length embeddings (float16): a new scene is ``novel`` when its cosine distance to
    the nearest of them is above a threshold calibrated on held-out scenes. Why not the mixture's likelihood:
    UMAP's ``transform`` places a new scene among its nearest training scenes, so an unseen class lands
    inside existing blobs and looks as likely as they do (EuroSAT with two classes withheld: 0.5% of them
    flagged, against 0.6% of the seen classes); its distance in the input space is what shows it is new.
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

from scenecluster.cluster import DPGMM, drop_small_clusters, fills_truncation, fit_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.consensus import apply_merges, merge_co_associated
from scenecluster.errors import InputError
from scenecluster.reduce import fast_small_transform, fit_settings, make_projection

__all__ = [
    "FittedClustering",
    "cluster_probabilities",
    "fit_clustering",
    "fit_once",
    "load_clustering",
    "merge_by_consensus",
    "read_clustering_meta",
    "save_clustering",
]

FORMAT = "scenecluster-clustering/1"
_LIBRARIES = {"umap": "umap-learn", "pca": "scikit-learn"}
_MIXTURE = "dpgmm"  # clustering.json "clusterer": our DP-GMM as safetensors + JSON
_PICKLED = "pickle"  # any other estimator, in its library's own serialisation
REFERENCE_FILE = "reference.safetensors"


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
        Scenes whose nearest-reference cosine distance is above it are flagged ``novel`` (without a
        ``reference``: whose log-likelihood is below it; -inf never flags).
    novelty_quantile : float
        The share of held-out scenes beyond the threshold.
    reference : ndarray of float16, shape (n_fit, n_features), or None
        The fitted scenes' unit-length embeddings, for the novelty distance.
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
    reference: np.ndarray | None = None

    def __post_init__(self) -> None:
        fast_small_transform(self.projection)  # fitted here or loaded from an older run alike

    @property
    def n_clusters(self) -> int:
        return int(len(np.unique(self.cluster_ids[self.cluster_ids >= 0])))

    def neighbour_distance(self, X: np.ndarray) -> np.ndarray:
        """Cosine distance of each row of ``X`` to its nearest fitted scene (zeros without a reference)."""
        if self.reference is None:
            return np.zeros(len(X), np.float32)
        return nearest_distance(_unit(np.asarray(X, np.float32)), self.reference)

    def is_novel(self, result: dict[str, np.ndarray]) -> np.ndarray:
        """The ``novel`` flag of an :meth:`assign` result, by the rule this clustering was calibrated with."""
        if self.reference is not None:
            return result["neighbour_distance"] > self.novelty_threshold
        return result["log_likelihood"] < self.novelty_threshold

    def calibrate_novelty(self, X: np.ndarray, quantile: float) -> dict[str, np.ndarray]:
        """Set the novelty threshold so that ``quantile`` of held-out scenes ``X`` would be flagged; return
        their assignment. Held-out scenes are placed as every new scene will be (``transform``), unlike the
        fitted ones, whose distance to themselves is zero."""
        result = self.assign(X)
        if self.reference is not None:
            self.novelty_threshold = float(np.quantile(result["neighbour_distance"], 1.0 - quantile))
        else:
            self.novelty_threshold = float(np.quantile(result["log_likelihood"], quantile))
        result["novel"] = self.is_novel(result)
        return result

    def assign(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Embeddings ``(n, n_features)`` -> ``coords`` (n, d), ``cluster``, ``probability``, ``log_likelihood``,
        ``neighbour_distance`` and ``novel`` (each (n,))."""
        X = np.asarray(X, dtype=np.float32)
        Z = self.projection.transform(X)
        Z = np.asarray(Z.get() if hasattr(Z, "get") else Z, dtype=np.float32)
        if hasattr(self.clusterer, "predict_proba"):
            cluster, probability = cluster_probabilities(self.clusterer.predict_proba(Z), self.cluster_ids)
        else:
            cluster = self.cluster_ids[self.clusterer.predict(Z)]
            probability = np.ones(len(Z))
        if hasattr(self.clusterer, "score_samples"):
            log_likelihood = self.clusterer.score_samples(Z)
        else:
            log_likelihood = np.zeros(len(Z))
        result = {
            "coords": Z,
            "cluster": cluster.astype(np.int32),
            "probability": probability.astype(np.float32),
            "log_likelihood": log_likelihood.astype(np.float32),
            "neighbour_distance": self.neighbour_distance(X),
        }
        result["novel"] = self.is_novel(result)
        return result


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

    n = len(X)
    settings = fit_settings(reduce.model_dump() if isinstance(reduce, ReduceConfig) else dict(reduce), *X.shape)
    n_distinct = count_distinct(X, limit=cluster.n_components)
    if n_distinct < cluster.n_components:  # no more components than different scenes, grown or not
        cluster = cluster.model_copy(update={"n_components": n_distinct, "grow_truncation": False})
    start = time.perf_counter()
    first = fit_once(X, settings, cluster, device)
    projection, clusterer, Z, components = first.projection, first.clusterer, first.coords, first.labels
    merged, consensus = components, {}
    if cluster.method == "dpgmm" and cluster.consensus_runs > 1:
        merged, consensus = merge_by_consensus(X, components, settings, cluster, device)
    clusters = relabel_by_size(merged)
    n_components = int(getattr(clusterer, "n_components", components.max() + 1))
    cluster_ids = np.full(max(n_components, int(components.max()) + 1), -1, dtype=np.int32)
    cluster_ids[components] = clusters  # a merged cluster's components share its id
    reference = _unit(np.asarray(X, np.float32)).astype(np.float16)
    threshold = _leave_one_out_threshold(reference, novelty_quantile)
    cluster_end = time.perf_counter()
    info = {
        "n_fit": int(n),
        "n_distinct": n_distinct,
        "n_components": first.truncation,
        **({"n_components_configured": cluster.n_components} if first.truncation != cluster.n_components else {}),
        "n_iter": _maybe_int(getattr(clusterer, "n_iter_", None)),
        "converged": bool(getattr(clusterer, "converged_", True)),
        "lower_bound": float(getattr(clusterer, "lower_bound_", float("nan"))),
        **({"prior_counts": [int(k) for k in first.prior_counts]} if first.prior_counts is not None else {}),
        "clusters_found": first.found,  # before the small ones were dropped (what fit_clusterer reads)
        "small_clusters_dropped": first.found - int(len(np.unique(components))),
        **({"consensus": consensus} if consensus else {}),
        "versions": _versions(settings.get("method", "umap"), settings.get("backend", "umap-learn")),
        "seconds": {
            "reduce": round(first.reduce_seconds, 3),
            "cluster": round(cluster_end - start - first.reduce_seconds - consensus.get("seconds", 0.0), 3),
            **({"consensus": consensus["seconds"]} if consensus else {}),
        },
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
        reference=reference,
    )
    return fitted, clusters, Z


def filled_its_truncation(meta: dict[str, Any]) -> bool:
    """Whether a saved fit (``clustering.json``'s fields) was made before the truncation could grow and used more
    of it than :func:`scenecluster.cluster.fit_clusterer` now allows: a fit this code would not make, so a rerun with
    the same settings refits it instead of keeping it (every other saved fit is kept)."""
    info = meta.get("info", {})
    if meta.get("clusterer") != "dpgmm" or "clusters_found" in info or "n_components" not in info:
        return False  # k-means, or a fit whose truncation could already grow
    counts = info.get("prior_counts")
    if counts:  # the neighbourhood prior's path: its last count is the mixture's, before small clusters were dropped
        found = counts[-1]
    else:
        found = meta.get("summary", {}).get("n_clusters", 0) + info.get("small_clusters_dropped", 0)
    return fills_truncation(found, info["n_components"])


@dataclass
class SingleFit:
    """One projection and one mixture fitted on the same scenes."""

    projection: Any
    clusterer: Any  # a prior search's chosen mixture
    coords: np.ndarray
    labels: np.ndarray  # each scene's component, the small clusters dropped
    found: int  # clusters before they were dropped
    prior_counts: Any  # the prior search's counts, or None
    reduce_seconds: float
    truncation: int  # the mixture's n_components after any growth (cluster.fit_clusterer)


def fit_once(X: np.ndarray, settings: dict[str, Any], cluster: ClusterConfig, device: str) -> SingleFit:
    """Fit the projection ``settings`` describe on ``X`` (:func:`scenecluster.reduce.fit_settings`), then the
    mixture on its coordinates, and drop its small clusters: the partition the job keeps before any consensus. The
    job's fit, the consensus's other runs and each Tune trial call it, so a search scores what the job would keep."""
    start = time.perf_counter()
    projection = make_projection(**settings)
    Z = np.asarray(_as_numpy(projection.fit_transform(np.asarray(X, dtype=np.float32))), dtype=np.float32)
    reduce_seconds = time.perf_counter() - start
    clusterer, raw, kept = fit_clusterer(cluster, Z, device=device)
    prior_counts = getattr(clusterer, "counts_", None)
    found = int(len(np.unique(raw)))
    raw = drop_small_clusters(clusterer, Z, raw, cluster.min_cluster_share)
    mixture = getattr(clusterer, "mixture_", clusterer)
    return SingleFit(projection, mixture, Z, raw, found, prior_counts, reduce_seconds, kept.n_components)


def merge_by_consensus(
    X: np.ndarray, raw: np.ndarray, settings: dict[str, Any], cluster: ClusterConfig, device: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit ``cluster.consensus_runs - 1`` more projections and mixtures on ``X`` with the next seeds, and merge
    the clusters of ``raw`` (the first fit's components) that they keep together
    (:func:`scenecluster.consensus.merge_co_associated`). Returns each scene's surviving component and a summary.
    ``settings`` are the projection's for this sample (:func:`scenecluster.reduce.fit_settings`). The job's fit
    and each Tune trial call it, so a search scores the partition the job keeps."""
    start = time.perf_counter()
    others = []
    for run in range(1, cluster.consensus_runs):
        seeded = {**settings, "random_state": _next_seed(settings.get("random_state"), run)}
        mixture = cluster.model_copy(update={"random_state": _next_seed(cluster.random_state, run)})
        others.append(fit_once(X, seeded, mixture, device).labels)
    merged = apply_merges(raw, merge_co_associated(raw, others, cluster.consensus_threshold))
    summary = {
        "runs": cluster.consensus_runs,
        "threshold": cluster.consensus_threshold,
        "clusters_first": int(len(np.unique(raw))),
        "clusters_other_runs": [int(len(np.unique(labels))) for labels in others],
        "clusters_merged": int(len(np.unique(raw)) - len(np.unique(merged))),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return merged, summary


def _next_seed(seed: int | None, run: int) -> int | None:
    """The seed of a consensus run: unseeded stays unseeded."""
    return None if seed is None else seed + run


def cluster_probabilities(proba: np.ndarray, cluster_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each scene's most probable cluster and its probability, from the mixture's component probabilities
    ``proba`` (n, n_components): a cluster that merged several components (:mod:`scenecluster.consensus`) has
    the sum of theirs. Components of no cluster (id -1) get no scene."""
    ids = np.asarray(cluster_ids[: proba.shape[1]])
    used = ids >= 0
    per_cluster = np.zeros((proba.shape[1], int(ids.max()) + 1 if used.any() else 1))
    per_cluster[np.flatnonzero(used), ids[used]] = 1.0
    summed = np.asarray(proba) @ per_cluster
    cluster = summed.argmax(axis=1)
    return cluster, summed[np.arange(len(summed)), cluster]


def nearest_distance(Xn: np.ndarray, reference: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Cosine distance of each unit row of ``Xn`` to its nearest row of ``reference`` (unit rows), in chunks."""
    R = np.asarray(reference, np.float32)
    out = np.empty(len(Xn), np.float32)
    for start in range(0, len(Xn), chunk):
        out[start : start + chunk] = 1.0 - (Xn[start : start + chunk] @ R.T).max(axis=1)
    return np.clip(out, 0.0, 2.0)


def _leave_one_out_threshold(reference: np.ndarray, quantile: float, n_probe: int = 2000) -> float:
    """The novelty distance of the fit alone: each probed scene's distance to its nearest *other* scene.

    :func:`scenecluster.scale.fit_on_sample` replaces it with one calibrated on held-out scenes when the
    sample is large enough; this is the threshold of small fits.
    """
    if len(reference) < 2:
        return float("inf")
    probe = np.random.default_rng(0).choice(len(reference), size=min(n_probe, len(reference)), replace=False)
    R = np.asarray(reference, np.float32)
    sims = R[probe] @ R.T
    sims[np.arange(len(probe)), probe] = -np.inf  # not itself
    return float(np.quantile(1.0 - sims.max(axis=1), 1.0 - quantile))


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


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
    rows = _unit(rows)
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
    if isinstance(fitted.clusterer, DPGMM):
        kind = _MIXTURE
        _save_mixture(fitted.clusterer, out, folder)
    else:
        kind = _PICKLED
        out.write_bytes(f"{folder}/clusterer.pkl", _pickled(fitted.clusterer))
    out.write_bytes(f"{folder}/projection.pkl", _pickled(fitted.projection))
    if fitted.reference is not None:
        from safetensors.numpy import save

        out.write_bytes(f"{folder}/{REFERENCE_FILE}", save({"reference": np.ascontiguousarray(fitted.reference)}))
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
    meta = out.read_json(f"{folder}/clustering.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
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
    if "umap-learn" in meta["info"].get("versions", {}):  # a umap-learn projection (not PCA, not cuML)
        from scenecluster.jitcache import keep_umap_compiles

        keep_umap_compiles()  # before unpickling imports umap-learn: transform loads its compiled code (jitcache)
    projection = pickle.loads(out.read_bytes(f"{folder}/projection.pkl"))  # trusted input, see module docstring
    reference = None
    if out.exists(f"{folder}/{REFERENCE_FILE}"):
        from safetensors.numpy import load

        reference = load(out.read_bytes(f"{folder}/{REFERENCE_FILE}"))["reference"]
    return FittedClustering(
        feature=meta["feature"],
        projection=projection,
        clusterer=clusterer,
        cluster_ids=np.asarray(meta["cluster_ids"], dtype=np.int32),
        novelty_threshold=float(meta["novelty_threshold"]),
        novelty_quantile=float(meta["novelty_quantile"]),
        reduce=meta.get("reduce", {}),
        info=meta["info"],
        reference=reference,
    )


def _versions(method: str, backend: str) -> dict[str, str]:
    names = {"scenecluster", "numpy", "scikit-learn", _LIBRARIES.get(method, "scikit-learn")}
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
