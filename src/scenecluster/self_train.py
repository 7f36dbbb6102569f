"""Self-training on the target: pseudo-labels from a clustering, for another fine-tune beside the sources.

A backbone tuned on a labelled source has learned the source's classes, not the target's. Self-training lets the
target teach it without a label: cluster the target, take each cluster's most typical scenes as a pseudo-class,
fine-tune again on the sources *and* those pseudo-classes (one head each, the same Ray Train path as any source),
re-embed and re-cluster. Measured on one GPU in both transfer directions (docs/benchmarks.md, issue 10), one such
round with the 8 test-time views is the best recipe of all those tried; the pseudo-labels alone did worse than
the untuned backbone, so the sources' labels always train beside them.

Two choices come from the issue's earlier tries, where pseudo-labels from the clustering itself locked in its
merges (a fifth of the clusters vanished):

* the pseudo-label mixture is refitted **over-segmented on purpose** (``prior_per_scene`` half the
  clustering's): fine-tuning may later merge what it split, but it cannot split what it was told is one class;
* "typical" is the mixture's own **log-likelihood** (``score_samples``), the densest ``keep`` share of each
  cluster: after UMAP the responsibilities are almost all 1.0 and cannot rank scenes.

The mixture is refitted on the run's fit sample in the coordinates the run already projected
(``clustering/fit_sample.parquet``), so no projection is repeated and the pseudo-labelled set is bounded by
``scale.fit_sample`` at any archive size. The fit runs in a Ray task, never in the driver.

``pseudo_labels-<key>.parquet`` holds ``path`` and ``label`` (``p00``, ``p01``, ...), with the target's URI in its
schema metadata, so that :func:`read_pseudo_labels` (the fine-tune's driver) needs nothing else to read it. The
key (:func:`pseudo_label_key`) names what made them, the clustering run's fit and the self-training settings: a
rerun with the same ones reuses the file (and the fine-tune trained on it), and one with others writes another
file, which the round's fine-tune then sees as another setting.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scenecluster.config import PSEUDO_LABELS_FILE, ClusterConfig, FinetuneConfig, PipelineConfig, SelfTrainConfig
from scenecluster.data import SceneListing, is_archive, open_input
from scenecluster.errors import InputError
from scenecluster.outputs import OutputFolder
from scenecluster.scale import SAMPLE_FILE as FIT_SAMPLE  # a run's fitted rows, their coordinates and clusters
from scenecluster.scale import matrix

__all__ = [
    "PseudoLabels",
    "TooFewPseudoClasses",
    "clustering_agreement",
    "prepare_round",
    "pseudo_label_key",
    "pseudo_label_purity",
    "read_pseudo_labels",
    "select_pseudo_labels",
    "write_pseudo_labels",
]

INPUT_KEY = b"scenecluster.input"  # schema metadata: the target the paths belong to
SUMMARY_KEY = b"scenecluster.summary"  # schema metadata: write_pseudo_labels' summary, for a rerun that reuses it


class TooFewPseudoClasses(InputError):
    """Fewer than two pseudo-classes: the target (or its fit sample) is too small for self-training at these
    settings. The pipeline then keeps the clustering it has rather than failing."""


def select_pseudo_labels(
    clusters: np.ndarray, density: np.ndarray, *, keep: float, min_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's densest ``keep`` share, as pseudo-classes numbered 0.. by cluster id.

    Parameters
    ----------
    clusters : ndarray of int, shape (n,)
        Cluster of each scene.
    density : ndarray of float, shape (n,)
        How typical each scene is of its cluster (the mixture's log-likelihood); larger is kept first.
    keep : float
        Share of each cluster kept, rounded.
    min_size : int
        A cluster keeping fewer scenes gives no pseudo-class: too few to learn from, and likely a fringe.

    Returns
    -------
    (indices, pseudo) : ndarrays of int
        The kept scenes' indices into ``clusters`` (cluster by cluster, densest first) and their pseudo-class.
    """
    clusters, density = np.asarray(clusters), np.asarray(density)
    kept: list[np.ndarray] = []
    for cluster in np.unique(clusters):
        members = np.flatnonzero(clusters == cluster)
        n_keep = int(round(keep * len(members)))
        if n_keep >= min_size:
            kept.append(members[np.argsort(-density[members], kind="stable")[:n_keep]])
    pseudo = np.concatenate([np.full(len(k), i, dtype=np.int64) for i, k in enumerate(kept)]) if kept else []
    return (np.concatenate(kept) if kept else np.array([], dtype=np.int64)), np.asarray(pseudo, dtype=np.int64)


@dataclass(frozen=True)
class PseudoLabels:
    """A pseudo-labelled target as fine-tuning reads it: one listing (files and shards to read) and the label of
    every labelled scene path (a shard's members are ``<shard>/<member>``; unlabelled members are left out)."""

    listing: SceneListing
    labels: dict[str, str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.values()))


def _fit_pseudo_labels(
    run_uri: str, endpoint_url: str | None, cluster: ClusterConfig, st: SelfTrainConfig
) -> dict[str, Any]:
    """Ray task body: refit the over-segmented mixture on the run's fitted coordinates and pick the pseudo-labels.

    On the CPU: at most ``scale.fit_sample`` scenes in the projection's few dimensions take seconds."""
    from scenecluster.cluster import fit_clusterer

    out = OutputFolder(run_uri, endpoint_url=endpoint_url)
    if not out.exists(FIT_SAMPLE):
        raise InputError(f"{out.display(FIT_SAMPLE)} is missing: self-training needs a finished clustering run")
    table = out.read_table(FIT_SAMPLE, columns=["path", "coords"])
    Z = matrix(table, "coords")
    over_segmented = {
        "method": "dpgmm",
        "prior_per_scene": st.prior_per_scene,
        "covariance_prior_scale": None,
        "prior_covariance": "data",
    }
    settings = cluster.model_copy(update=over_segmented)  # a mixture whatever the run used: its density ranks
    mixture, found, _ = fit_clusterer(settings, Z, device="cpu")  # room for more pseudo-classes than 50
    density = np.asarray(mixture.score_samples(Z))
    index, pseudo = select_pseudo_labels(found, density, keep=st.keep, min_size=st.min_size)
    paths = table.column("path").to_pylist()
    return {
        "paths": [paths[i] for i in index],
        "pseudo": pseudo.tolist(),
        "clusters_found": int(len(np.unique(found))),
        "of": len(paths),
    }


def write_pseudo_labels(
    run_uri: str,
    dest: str,
    *,
    target: str,
    cluster: ClusterConfig,
    self_train: SelfTrainConfig,
    endpoint_url: str | None = None,
    truth: bool = False,
) -> dict[str, Any]:
    """Write ``dest`` (a local ``pseudo_labels-<key>.parquet``) from the clustering run at ``run_uri``; return a
    summary.

    The mixture is fitted in one Ray task. ``truth=True`` adds, for the record only, the
    kept set's purity against the target's ``<class>`` folders; nothing is chosen by it.

    Raises
    ------
    TooFewPseudoClasses
        When fewer than two pseudo-classes keep ``min_size`` scenes (nothing is written).
    InputError
        When the run has no fit sample (it is not a finished clustering run).
    """
    import ray

    from scenecluster.stages import get_interruptibly

    task = ray.remote(_fit_pseudo_labels).options(num_cpus=1)
    picked = get_interruptibly(task.remote(run_uri, endpoint_url, cluster, self_train))
    n_classes = len(set(picked["pseudo"]))
    if n_classes < 2:
        raise TooFewPseudoClasses(
            f"{n_classes} pseudo-class(es) of at least {self_train.min_size} scenes among the {picked['of']} "
            f"fitted scenes of {run_uri}; lower self_train.min_size for a target this small"
        )
    labels = [f"p{c:02d}" for c in picked["pseudo"]]
    summary = {
        "file": dest,
        "from_run": run_uri,
        "clusters_found": picked["clusters_found"],
        "pseudo_classes": n_classes,
        "kept": len(labels),
        "of": picked["of"],
    }
    if truth:
        from scenecluster.data import folder_label

        summary.update(pseudo_label_purity([folder_label(p) for p in picked["paths"]], labels))
    table = pa.table({"path": pa.array(picked["paths"], pa.string()), "label": pa.array(labels, pa.string())})
    table = table.replace_schema_metadata({INPUT_KEY: target.encode(), SUMMARY_KEY: json.dumps(summary).encode()})
    OutputFolder(str(Path(dest).parent)).write_table(Path(dest).name, table)  # atomic; creates the folder
    return summary


def pseudo_label_purity(truth: list, pseudo: list) -> dict[str, Any]:
    """For the record only, never to choose: the share of pseudo-labelled scenes whose true class is their
    pseudo-class's most common one (``purity_score_only``), and how many true classes lead some pseudo-class
    (``classes_covered_score_only``)."""
    by_class: dict[Any, Counter] = {}
    for true, label in zip(truth, pseudo, strict=True):
        by_class.setdefault(label, Counter())[true] += 1
    return {
        "purity_score_only": round(sum(max(c.values()) for c in by_class.values()) / max(1, len(pseudo)), 4),
        "classes_covered_score_only": len({c.most_common(1)[0][0] for c in by_class.values()}),
    }


def pseudo_label_key(
    run_uri: str, *, cluster: ClusterConfig, self_train: SelfTrainConfig, endpoint_url: str | None = None
) -> str:
    """What decides a round's pseudo-labels, as 12 hex digits: the clustering run's ``fit_key`` (its target, feature
    with the backbone's weights, projection, mixture and seed) and the settings :func:`write_pseudo_labels` uses.

    Raises
    ------
    InputError
        When ``run_uri`` holds no saved clustering.
    """
    from scenecluster.fitted import read_clustering_meta

    meta = read_clustering_meta(OutputFolder(run_uri, endpoint_url=endpoint_url))
    # the pseudo-label mixture always uses the data prior (_fit_pseudo_labels): keyed as under it, the key does not
    # move with the clustering's prior, and one made before the neighbourhood prior was the default still matches
    made_from = {
        "fit_key": meta.get("data_prior_fit_key") or meta.get("fit_key"),
        "cluster": cluster.with_data_prior().key_settings(),
        "self_train": self_train.model_dump(include={"keep", "min_size", "prior_per_scene"}),
    }
    return hashlib.sha1(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare_round(cfg: PipelineConfig, round_n: int, run_output: str) -> tuple[FinetuneConfig, dict[str, Any]]:
    """Self-training round ``round_n`` of ``cfg``: its pseudo-labels from the clustering run at ``run_output`` (the
    previous round's), and the fine-tune that reads them. Returns ``(fine-tune config, pseudo-label summary)``;
    raises :class:`TooFewPseudoClasses` as :func:`write_pseudo_labels` does.

    Pseudo-labels already made from the same fit with the same settings are reused (``"reused": True``), not
    refitted and rewritten; those made from another are deleted once the new ones are written."""
    endpoint = cfg.cluster.data.endpoint_url
    key = pseudo_label_key(run_output, cluster=cfg.cluster.cluster, self_train=cfg.self_train, endpoint_url=endpoint)
    tune = cfg.self_train_finetune(round_n, key)
    dest = Path(tune.pseudo_labels[-1])
    if dest.is_file():
        meta = pq.read_schema(dest).metadata or {}
        if SUMMARY_KEY in meta:
            return tune, {**json.loads(meta[SUMMARY_KEY]), "reused": True}
    pseudo = write_pseudo_labels(
        run_output,
        str(dest),
        target=cfg.cluster.data.input,
        cluster=cfg.cluster.cluster,
        self_train=cfg.self_train,
        endpoint_url=endpoint,
        truth=cfg.cluster.data.labels == "folders",
    )
    for stale in dest.parent.glob(PSEUDO_LABELS_FILE.format(key="*")):
        if stale != dest:
            stale.unlink(missing_ok=True)
    return tune, pseudo


def _read_source(path: str) -> str:
    """The file the reader opens for a labelled scene: the path itself, or the ``.tar`` shard holding it."""
    parent = posixpath.dirname(path)
    return parent if is_archive(parent) else path


def read_pseudo_labels(file: str, *, endpoint_url: str | None = None) -> PseudoLabels:
    """Read a ``pseudo_labels-<key>.parquet`` written by :func:`write_pseudo_labels`, checked.

    Raises
    ------
    InputError
        When the file is missing or unreadable, lacks its columns or its target, or has fewer than two classes.
    """
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"pseudo-labels {file!r} cannot be read: {exc}") from None
    meta = table.schema.metadata or {}
    if not {"path", "label"} <= set(table.column_names) or INPUT_KEY not in meta:
        raise InputError(
            f"pseudo-labels {file!r} is not a pseudo-labels file of scenecluster.self_train "
            "(needs path and label columns and the target in its metadata)"
        )
    target = meta[INPUT_KEY].decode()
    fs, root = open_input(target, endpoint_url=endpoint_url)
    labels = dict(zip(table.column("path").to_pylist(), table.column("label").to_pylist(), strict=True))
    if len(set(labels.values())) < 2:
        raise InputError(f"pseudo-labels {file!r} has fewer than two classes; fine-tuning needs at least two")
    listing = SceneListing(uri=target, root=root, paths=sorted({_read_source(p) for p in labels}), filesystem=fs)
    return PseudoLabels(listing=listing, labels=labels)


def clustering_agreement(previous_uri: str, current_uri: str, *, endpoint_url: str | None = None) -> float | None:
    """ARI between two runs' clusters on the scenes both fitted (the same seeded sample of the same target), or
    None when they share fewer than two. Label-free: it compares the runs with each other, not with any truth."""
    from sklearn.metrics import adjusted_rand_score

    def clusters(uri: str) -> dict[str, int]:
        table = OutputFolder(uri, endpoint_url=endpoint_url).read_table(FIT_SAMPLE, columns=["path", "cluster"])
        return dict(zip(table.column("path").to_pylist(), table.column("cluster").to_pylist(), strict=True))

    before, after = clusters(previous_uri), clusters(current_uri)
    common = sorted(before.keys() & after.keys())
    if len(common) < 2:
        return None
    return float(adjusted_rand_score([before[p] for p in common], [after[p] for p in common]))
