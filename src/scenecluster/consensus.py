"""Merge the clusters that fits with other seeds keep together: a consensus over several UMAP seeds.

Why: UMAP (``min_dist`` 0) draws a broad class as several tight sub-blobs, and the mixture counts each as a
cluster, so an archive of a few broad classes gets two or three times as many clusters as classes. Where a
sub-blob ends is an accident of one layout: another seed cuts the same class elsewhere, or not at all. Two
different classes, fine or broad, are kept apart by every seed. So the reference fit's clusters are merged where
the other seeds' fits put their scenes in one cluster: the co-association of clusters ``a`` and ``b`` is the
chance, averaged over the other fits, that a scene of ``a`` and a scene of ``b`` share a cluster there
(evidence accumulation, Fred & Jain 2005, at the level of clusters). The pair most often together is merged
first, until no pair reaches ``threshold``. Merging only joins clusters, so the mixture's components stay as
fitted and a saved clustering maps several components to one cluster id.
"""

from __future__ import annotations

import numpy as np

__all__ = ["apply_merges", "co_association", "merge_co_associated"]


def co_association(labels: np.ndarray, others: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The clusters of ``labels`` and their co-association under ``others`` (label arrays of the same scenes).

    Returns
    -------
    ids : ndarray of shape (k,)
        The distinct labels, sorted.
    together : ndarray of shape (k, k)
        ``together[i, j]``: the mean over ``others`` of the chance that a scene of cluster ``ids[i]`` and one of
        cluster ``ids[j]`` share a cluster there (1 on the diagonal of a fit that agrees with itself).
    """
    labels = np.asarray(labels)
    ids, rows = np.unique(labels, return_inverse=True)
    together = np.zeros((len(ids), len(ids)))
    for other in others:
        other = np.asarray(other)
        if other.shape != labels.shape:
            raise ValueError(f"a consensus fit labelled {other.shape[0]} scenes, the reference {labels.shape[0]}")
        _, columns = np.unique(other, return_inverse=True)
        table = np.zeros((len(ids), columns.max() + 1))
        np.add.at(table, (rows, columns), 1.0)
        shares = table / table.sum(axis=1, keepdims=True)
        together += shares @ shares.T
    return ids, together / max(len(others), 1)


def merge_co_associated(labels: np.ndarray, others: list[np.ndarray], threshold: float) -> dict[int, int]:
    """Which cluster of ``labels`` each one is merged into: the pair the ``others`` keep together most is merged
    first (the larger cluster's label survives), then the co-association is measured again, until no pair reaches
    ``threshold``. Returns ``{label: surviving label}`` for every label (itself where it is not merged)."""
    current = np.asarray(labels).copy()
    into = {int(c): int(c) for c in np.unique(current)}
    while True:
        ids, together = co_association(current, others)
        if len(ids) < 2:
            return into
        np.fill_diagonal(together, -np.inf)
        i, j = np.unravel_index(np.argmax(together), together.shape)
        if together[i, j] < threshold:
            return into
        a, b = int(ids[i]), int(ids[j])
        keep, gone = (a, b) if (current == a).sum() >= (current == b).sum() else (b, a)
        current[current == gone] = keep
        for label, target in into.items():
            if target == gone:
                into[label] = keep


def apply_merges(labels: np.ndarray, into: dict[int, int]) -> np.ndarray:
    """``labels`` with each replaced by the one it was merged into (``into``, from :func:`merge_co_associated`)."""
    labels = np.asarray(labels)
    ids, inverse = np.unique(labels, return_inverse=True)
    return np.array([into[int(c)] for c in ids], dtype=labels.dtype)[inverse]
