"""A DP-GMM whose Wishart prior is scaled to the grain of the clusters it finds, not to the whole layout.

Why: the data prior's scale matrix (``prior_covariance: data``) is ``prior_per_scene x n x`` the covariance of all
fitted scenes. More classes spread UMAP's layout wider while each blob stays the same size, so that prior weighs
more on each class as the classes multiply, and the count saturates (about 8 clusters for 3 classes, 15 for 22;
docs/benchmarks.md, issue 10). Here the scale matrix is ``weight x (n / K) x`` the mean covariance of each scene's
neighbourhood of ``share x n / K`` scenes, ``K`` the previous fit's count (first the data prior's):

- a neighbourhood that is a fixed share of a *cluster* neither shrinks as the archive grows (the drift of a fixed
  neighbour count) nor grows with the number of classes (the saturation of a fixed share of all scenes);
- the weight is per scene of a cluster of mean size (``n / K``), not per scene of the archive. A component of
  ``n_k`` scenes adds the scale matrix over ``n_k`` to its own covariance; with a weight per archive scene
  (``x n``, this module's rule until the twenty-second session) that inflation is ``K`` times the neighbourhood
  covariance for clusters of mean size, so it grew with the number of classes: 22 classes were counted as 13-15
  and 3 classes as 5-6. Per scene of a mean cluster it is ``weight`` times the neighbourhood covariance at any
  count (22 classes: 18-19; 3 classes: 4; the rule equals the old one at 10 clusters; docs/benchmarks.md).
  Clusters under 100 scenes, whose neighbourhoods hold the 10-scene minimum, get a proportionally lighter weight.

The mixture is refitted until a count repeats, which took one to five refits in every case measured.

Not below a cluster of ``MIN_NEIGHBOURS`` scenes: where a fit's mean cluster is smaller than a neighbourhood, the
neighbourhoods span clusters and the lightened weight no longer holds a cluster together, so each refit split
more than the last, down to a cluster per scene (15 EuroSAT scenes of 3 classes: 4 clusters, then 15; 30 of 3:
30). The first fit is then kept as it is, and a refit that finds clusters that small is dropped for the fit before
it (``benchmarks/bench_small_archives.py``). Archives of a few hundred scenes or more never come near it.

:class:`NeighbourhoodPriorDPGMM` is a scikit-learn meta-estimator in the manner of ``GridSearchCV``: the fitted
mixture that assigns scenes is ``mixture_`` (a plain :class:`~scenecluster.mixture.DPGMM`, saved and loaded as
any other), and ``counts_`` records the path that chose its prior.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin, clone

from scenecluster.mixture import DPGMM

__all__ = ["NeighbourhoodPriorDPGMM", "neighbourhood_covariance"]

MIN_NEIGHBOURS = 10

log = logging.getLogger(__name__)


def neighbourhood_covariance(Z: np.ndarray, k: int, *, device: Any = "cpu", chunk_size: int = 1024) -> np.ndarray:
    """The mean covariance of every scene's ``k`` nearest neighbours (itself included) in ``Z`` (n, d).

    Exact neighbours by chunked distances in torch, on the mixture's device: at most ``chunk_size x n`` distances
    (and ``chunk_size x k`` neighbours) are held at once. The work grows as ``n^2``: well under a second per fit
    at the default ``scale.fit_sample`` of 20,000 scenes on a CPU; a fit sample of millions wants a GPU.
    """
    import torch

    from scenecluster.devices import resolve_torch_device

    n = len(Z)
    k = int(min(max(k, 2), n))
    where = device if isinstance(device, torch.device) else resolve_torch_device(device)
    data = torch.as_tensor(np.asarray(Z), dtype=torch.float32, device=where)
    scatter = torch.zeros(data.shape[1], data.shape[1], dtype=torch.float64, device=data.device)
    data = data - data.mean(dim=0)  # cdist's matrix-product distances lose precision far from the origin
    for start in range(0, n, chunk_size):
        block = data[start : start + chunk_size]
        nearest = torch.cdist(block, data).topk(k, largest=False).indices  # (c, k)
        local = data[nearest]
        local = (local - local.mean(dim=1, keepdim=True)).double()
        scatter += torch.einsum("cki,ckj->ij", local, local)
    return (scatter / (n * (k - 1))).cpu().numpy()


class NeighbourhoodPriorDPGMM(ClusterMixin, BaseEstimator):
    """Fit ``mixture`` with its data prior, then refit it with a neighbourhood prior until the count repeats.

    Parameters
    ----------
    mixture : DPGMM
        The unfitted mixture with the default (data-covariance) prior: the first fit, and the settings of every
        refit, whose ``covariance_prior`` alone is replaced.
    weight : float, default=4.0
        The scale matrix is ``weight x (n / K) x`` the neighbourhood covariance, ``n / K`` the previous fit's mean
        cluster size (:meth:`prior_weight`).
    share : float, default=0.1
        Neighbourhoods of ``share x n / K`` scenes (at least 10), ``K`` the previous fit's count.
    max_refits : int, default=5
        Refits before the last one is kept even if no count has repeated.

    Attributes
    ----------
    mixture_ : DPGMM
        The last fit: the one that assigns.
    counts_ : list of int
        The count of each fit, the data prior's first.
    settled_ : bool
        Whether a count repeated within ``max_refits`` refits (else the last fit is kept, with a warning).
    neighbours_ : int
        The neighbourhood size of the last fit's prior.
    labels_ : ndarray of shape (n_samples,)
    """

    #: No refit from, and none kept with, a mean cluster of fewer scenes than this (the module's docstring says why).
    min_mean_cluster = MIN_NEIGHBOURS

    def __init__(self, mixture: DPGMM, *, weight: float = 4.0, share: float = 0.1, max_refits: int = 5):
        self.mixture = mixture
        self.weight = weight
        self.share = share
        self.max_refits = max_refits

    def fit(self, X: Any, y: Any = None) -> NeighbourhoodPriorDPGMM:
        X = np.asarray(X)
        n = len(X)
        fitted, labels, count = self.first_fit(X)
        counts = [count]
        neighbours = 0
        small = n / count < self.min_mean_cluster  # no neighbourhood inside a cluster this small
        for _ in range(self.max_refits):
            if small:
                break
            size = self.neighbours_for(n, counts[-1])
            covariance = neighbourhood_covariance(X, size, device=self.mixture.device)
            if self.mixture.covariance_type == "diag":
                covariance = np.diag(covariance).copy()
            prior = covariance * self.prior_weight(n, counts[-1])
            refit = clone(self.mixture).set_params(covariance_prior=prior).fit(X)
            refit_labels = np.asarray(refit.predict(X))
            if small := n / len(np.unique(refit_labels)) < self.min_mean_cluster:
                log.info(
                    "the neighbourhood prior keeps its fit of %d clusters: a refit found %d, smaller than the "
                    "neighbourhoods that sized its prior (the start of a runaway split)",
                    counts[-1],
                    len(np.unique(refit_labels)),
                )
                break
            fitted, labels, neighbours = refit, refit_labels, size
            counts.append(len(np.unique(labels)))
            if counts[-1] in counts[:-1]:
                break
        else:
            log.warning("the neighbourhood prior's counts %s did not settle in %d refits", counts, self.max_refits)
        settled = self.max_refits == 0 or small or counts[-1] in counts[:-1]
        if counts[-1] * 3 < counts[0]:  # 18 -> 8 happens on real archives the data prior over-splits
            log.warning(
                "the neighbourhood prior merged %d clusters into %d (counts %s): on layouts of many thin, far-apart "
                "classes it can run away downward; compare cluster.prior_covariance: data",
                counts[0],
                counts[-1],
                counts,
            )
        self.mixture_, self.counts_, self.neighbours_, self.labels_ = fitted, counts, neighbours, labels
        self.settled_ = settled
        return self

    def first_fit(self, X: np.ndarray) -> tuple[Any, np.ndarray, int]:
        """The fit the refits start from: the mixture with its data prior, its labels of ``X`` and its count.

        The loop mostly keeps near this count (started from 3 clusters instead, it ends at 7.5 on average, from 20 at
        12.4; docs/benchmarks.md), so the data prior's count is what the neighbourhood prior corrects, not replaces.
        ``benchmarks/bench_prior_weight.py`` overrides it to start elsewhere."""
        fitted = clone(self.mixture).fit(X)
        labels = np.asarray(fitted.predict(X))
        return fitted, labels, len(np.unique(labels))

    def neighbours_for(self, n: int, count: int) -> int:
        """Neighbourhood size for a refit of ``n`` scenes after a fit of ``count`` clusters: ``share`` of a cluster
        of mean size, at least ``MIN_NEIGHBOURS`` (and at most ``n``)."""
        return min(max(MIN_NEIGHBOURS, round(self.share * n / count)), n)

    def prior_weight(self, n: int, count: int) -> float:
        """What the neighbourhood covariance is multiplied by for a refit of ``n`` scenes after a fit of ``count``
        clusters: ``weight`` per scene of a cluster of mean size, so the prior weighs the same on each cluster
        whatever the number of clusters. Where ``share`` of a cluster is fewer than ``MIN_NEIGHBOURS`` scenes
        (clusters under 100 at the default share) the neighbourhoods hold more of each cluster than they should, and
        their covariance is too broad; the weight is scaled down by the share they were meant to hold over the share
        they hold. Without that, the 300-scene demo (27 scenes a cluster) ran away from 10 clusters to 4. A subclass
        may weigh otherwise: ``benchmarks/bench_prior_weight.py`` measures the old weight per archive scene."""
        per_cluster = n / count
        return self.weight * per_cluster * min(1.0, self.share * per_cluster / self.neighbours_for(n, count))

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        return self.fit(X).labels_

    def predict(self, X: Any) -> np.ndarray:
        return self.mixture_.predict(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        return self.mixture_.predict_proba(X)

    def score_samples(self, X: Any) -> np.ndarray:
        return self.mixture_.score_samples(X)
