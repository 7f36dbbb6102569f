"""Clustering scores against ground truth: Hungarian-matched accuracy, NMI and ARI.

Kept in one module so the CLI, the benchmarks and Ray Tune all report the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def contingency(labels_true: Sequence, labels_pred: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of (cluster, class) pairs.

    Returns
    -------
    table : ndarray of shape (n_clusters, n_classes)
    clusters : ndarray of shape (n_clusters,)
        The cluster ids, in row order.
    classes : ndarray of shape (n_classes,)
        The class labels, in column order.
    """
    y_true = np.asarray(labels_true)
    y_pred = np.asarray(labels_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"labels must be two 1-d arrays of the same length, got {y_true.shape} and {y_pred.shape}")
    classes, true_idx = np.unique(y_true, return_inverse=True)
    clusters, pred_idx = np.unique(y_pred, return_inverse=True)
    table = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(table, (pred_idx, true_idx), 1)
    return table, clusters, classes


def cluster_accuracy(labels_true: Sequence, labels_pred: Sequence) -> float:
    """Accuracy after the best one-to-one matching of clusters to classes (Hungarian algorithm).

    With more clusters than classes, the unmatched clusters count as errors, so over-splitting is
    penalised rather than hidden; with fewer, the unmatched classes are errors.
    """
    table, _, _ = contingency(labels_true, labels_pred)
    if table.sum() == 0:
        raise ValueError("cannot score an empty labelling")
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def score_clusters(labels_true: Sequence, labels_pred: Sequence) -> dict[str, float | int]:
    """All scores at once: ``acc``, ``nmi``, ``ari``, ``n_classes`` and ``n_clusters``."""
    y_true = np.asarray(labels_true)
    y_pred = np.asarray(labels_pred)
    return {
        "acc": cluster_accuracy(y_true, y_pred),
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "ari": float(adjusted_rand_score(y_true, y_pred)),
        "n_classes": int(len(np.unique(y_true))),
        "n_clusters": int(len(np.unique(y_pred))),
    }


def input_silhouette(X: np.ndarray, labels_pred: Sequence, index: np.ndarray, metric: str = "cosine") -> float:
    """Label-free score of a partition: the silhouette of ``labels_pred`` in the *input* space ``X``.

    Computed on the rows ``index`` (a seeded subsample, the same for every partition compared), with the
    projection's metric. A partition with one cluster, or one cluster per row, scores -1: the silhouette is
    undefined there, and -1 ranks it last. Why the input space: partitions fitted in projections of
    different dimensions are compared there on equal terms (see :mod:`scenecluster.tune`).
    """
    from sklearn.metrics import silhouette_score

    sub = np.asarray(labels_pred)[index]
    n_distinct = len(np.unique(sub))
    if n_distinct < 2 or n_distinct >= len(sub):
        return -1.0
    return float(silhouette_score(X[index], sub, metric=metric))


def scores_from_contingency(table: np.ndarray) -> dict[str, float | int]:
    """``acc``, ``nmi``, ``ari``, ``n_classes`` and ``n_clusters`` from a (cluster x class) count table.

    The same numbers :func:`score_clusters` gives from the two label vectors, but from counts that workers
    add up part by part, so an archive of any size is scored without its labels in one place. NMI uses the
    arithmetic mean of the entropies (scikit-learn's default).
    """
    from scipy.special import comb

    table = np.asarray(table, dtype=np.int64)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    n = int(table.sum())
    if n == 0:
        raise ValueError("cannot score an empty labelling")
    rows, cols = linear_sum_assignment(table, maximize=True)
    a, b = table.sum(1), table.sum(0)
    sum_comb = comb(table, 2).sum()
    expected = comb(a, 2).sum() * comb(b, 2).sum() / comb(n, 2) if n > 1 else 0.0
    maximum = (comb(a, 2).sum() + comb(b, 2).sum()) / 2
    ari = 1.0 if maximum == expected else float((sum_comb - expected) / (maximum - expected))
    nz = table > 0
    p = table[nz] / n
    mi = float((p * (np.log(table[nz] * n) - np.log(np.outer(a, b)[nz]))).sum())
    h_a, h_b = _entropy(a / n), _entropy(b / n)
    nmi = 1.0 if h_a == h_b == 0 else float(mi / max((h_a + h_b) / 2, np.finfo(float).eps))
    return {
        "acc": float(table[rows, cols].sum() / n),
        "nmi": nmi,
        "ari": ari,
        "n_classes": int(table.shape[1]),
        "n_clusters": int(table.shape[0]),
    }


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
