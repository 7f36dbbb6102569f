"""The clustering stage: a registry of estimators built from the ``cluster`` config section.

:class:`DPGMM` (the :mod:`scenecluster.mixture` package) infers the number of clusters; ``kmeans``
(scikit-learn's ``KMeans`` with ``n_components`` clusters) is the reference that is told the number. Every
entry is a scikit-learn clusterer: the job calls ``fit_predict`` and uses ``predict_proba`` only when the
estimator has it. A new estimator is one factory function and one ``@register`` line here, plus its name in
:attr:`scenecluster.config.ClusterConfig.method`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from scenecluster.config import ClusterConfig
from scenecluster.mixture import DPGMM

__all__ = ["CLUSTERERS", "DPGMM", "drop_small_clusters", "make_clusterer", "register"]

Factory = Callable[[ClusterConfig, np.ndarray, str], Any]
CLUSTERERS: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Add a factory ``(cfg, X, device) -> unfitted estimator`` to :data:`CLUSTERERS` under ``name``."""

    def add(factory: Factory) -> Factory:
        CLUSTERERS[name] = factory
        return factory

    return add


def make_clusterer(cfg: ClusterConfig, X: np.ndarray, *, device: str = "auto") -> Any:
    """The unfitted estimator that ``cfg.method`` names, for data ``X`` (n_samples, n_features)."""
    return CLUSTERERS[cfg.method](cfg, X, device)


def drop_small_clusters(model: Any, Z: np.ndarray, labels: np.ndarray, min_share: float) -> np.ndarray:
    """Drop the clusters of a fitted DP-GMM ``model`` that hold fewer than ``min_share`` of the scenes ``Z`` it was
    fitted on (``labels``: its labels of them); return the labels, each dropped cluster's scenes given to their next
    most likely cluster. Any other clusterer, or ``min_share`` 0, keeps its labels.

    Why: on large samples UMAP draws a few tiny, pure islands inside one class (of 27,000 EuroSAT scenes, two
    islands of 47 and 84 sea scenes beside three larger ones), and the mixture counts each as a cluster. A cluster
    is dropped by marking its component unused (``used_components_``), so ``predict`` and ``predict_proba`` never
    return it, here and wherever the saved mixture assigns scenes later, and dropped (``dropped_components_``), so
    ``score_samples`` no longer counts its density: a scene of a dropped island is as likely as its new cluster
    makes it, which is what self-training's "typical scenes" and the assignments' ``log_likelihood`` read. The
    job's fit and each Tune trial call this after the fit, so both see the partition the job keeps.
    """
    mixture = getattr(model, "mixture_", model)  # a prior search keeps the mixture it chose
    labels = np.asarray(labels)
    if min_share <= 0 or not isinstance(mixture, DPGMM):
        return labels
    sizes = np.bincount(labels, minlength=mixture.n_components)
    keep = mixture.used_components_ & (sizes >= min_share * len(Z))
    if not keep.any() or keep.sum() == mixture.used_components_.sum():
        return labels
    mixture.dropped_components_ = mixture.dropped_components_ | (mixture.used_components_ & ~keep)
    mixture.used_components_ = keep
    mixture.n_clusters_ = int(keep.sum())
    mixture.labels_ = np.asarray(mixture.predict(Z))
    return mixture.labels_


# The per-scene scale is never below this: under 1,000 scenes (at the default 0.002) it would fall below the fixed
# scale measured on about 1,000 (docs/benchmarks.md, "Mixture prior"), and a prior that weak splits a few dozen
# scenes into as many clusters.
MIN_PRIOR_SCALE = 2.0


@register("dpgmm")
def _dpgmm(cfg: ClusterConfig, X: np.ndarray, device: str) -> Any:
    """The variational DP-GMM.

    The Wishart prior's scale matrix is a scale times the data's covariance (1.0 is scikit-learn's default).
    A component of ``n_k`` scenes weighs that prior against ``n_k`` times its own scatter, so at a fixed
    scale the prior weakens as the sample grows and the mixture splits UMAP's non-Gaussian blobs ever finer
    (13 clusters at 1,000 EuroSAT scenes, 44 at 27,000). The scale is therefore ``prior_per_scene`` times the
    number of scenes fitted (at least ``MIN_PRIOR_SCALE``), unless ``covariance_prior_scale`` fixes it: the same
    prior strength, and about the same number of clusters, at any size (``docs/benchmarks.md``).
    ``prior_covariance: neighbourhoods`` wraps that mixture in
    :class:`~scenecluster.neighbourhood_prior.NeighbourhoodPriorDPGMM`, which refits it with a prior scaled to
    its clusters' neighbourhoods.
    """
    scale = cfg.covariance_prior_scale
    if scale is None:
        scale = max(cfg.prior_per_scene * len(X), MIN_PRIOR_SCALE)
    if cfg.covariance_type == "full":
        covariance_prior = np.atleast_2d(np.cov(X.T)) * scale
    else:
        covariance_prior = np.var(X, axis=0, ddof=1) * scale
    mixture = DPGMM(
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
    if cfg.prior_covariance == "neighbourhoods":
        from scenecluster.neighbourhood_prior import NeighbourhoodPriorDPGMM

        return NeighbourhoodPriorDPGMM(mixture, weight=cfg.neighbourhood_weight, share=cfg.neighbourhood_share)
    return mixture


@register("kmeans")
def _kmeans(cfg: ClusterConfig, X: np.ndarray, device: str) -> Any:
    """k-means with ``n_components`` clusters: a reference for when the number of classes is known."""
    from sklearn.cluster import KMeans

    n_clusters = min(cfg.n_components, len(X))
    return KMeans(n_clusters=n_clusters, n_init=cfg.n_init, max_iter=cfg.max_iter, random_state=cfg.random_state)
