"""The clustering stage: a registry of estimators built from the ``cluster`` config section.

:class:`DPGMM` (the :mod:`scenecluster.mixture` package) infers the number of clusters; ``kmeans``
(scikit-learn's ``KMeans`` with ``n_components`` clusters) is the reference that is told the number. Every
entry is a scikit-learn clusterer: the job calls ``fit_predict`` and uses ``predict_proba`` only when the
estimator has it. A new estimator is one factory function and one ``@register`` line here, plus its name in
:attr:`scenecluster.config.ClusterConfig.method`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from scenecluster.config import ClusterConfig
from scenecluster.mixture import DPGMM

__all__ = [
    "CLUSTERERS",
    "DPGMM",
    "drop_small_clusters",
    "fills_truncation",
    "fit_clusterer",
    "make_clusterer",
    "register",
]

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


#: A DP-GMM fit whose count is above this share of its truncation may have been capped by it.
SATURATED_SHARE = 0.75
#: The truncation grows to at most this many times the configured one.
MAX_TRUNCATION_GROWTH = 8

log = logging.getLogger(__name__)


def fills_truncation(count: int, n_components: int) -> bool:
    """Whether a DP-GMM fit of ``count`` clusters used so much of its ``n_components`` that it may have been capped:
    the test :func:`fit_clusterer` grows the truncation by, and a rerun judges a saved fit by."""
    return count > SATURATED_SHARE * n_components


def fit_clusterer(cfg: ClusterConfig, X: np.ndarray, *, device: str = "auto") -> tuple[Any, np.ndarray, ClusterConfig]:
    """Fit the estimator ``cfg`` names on ``X``; return it, its labels of ``X`` and the settings of the kept fit.

    Why: ``n_components`` (50) is the DP-GMM's truncation, the most clusters it can use, and a fit can never say it
    wanted more. On an archive of more classes than that (fMoW has 62, Million-AID 51), or of nearly as many (the
    45 of RESISC45), the count came out just under the truncation whatever the truth: 60 synthetic classes gave
    47-50 clusters (``docs/benchmarks.md``). So while a fit uses more than ``SATURATED_SHARE`` of its truncation,
    the truncation is doubled and the mixture fitted again, up to ``MAX_TRUNCATION_GROWTH`` times the configured
    one and the number of scenes. The DP's concentration is kept at the configured truncation's
    (``1 / n_components`` unless set), so only the approximation changes, not the prior. A fit well below its
    truncation, as every archive of 3-22 classes measured, is kept as it is: nothing changes there. With
    ``grow_truncation`` false the first fit is kept: ``n_components`` is then a hard cap (the job sets it so where
    the number of different scenes capped the truncation).

    The truncation was also a backstop. On some layouts the neighbourhood prior has no count it settles on: each
    refit finds more clusters than the last, and only a full truncation stops it (60 classes of synthetic striped
    images: 50 clusters with room for 50, 96 with 100, 159 with 200, and still rising after five refits with 400).
    A grown fit whose refits did not settle (:attr:`NeighbourhoodPriorDPGMM.settled_`) follows the room, not the
    scenes, so the fit with the configured truncation is kept instead, with a warning.
    """
    model = make_clusterer(cfg, X, device=device)
    labels = np.asarray(model.fit_predict(X))
    if cfg.method != "dpgmm" or not cfg.grow_truncation:
        return model, labels, cfg
    first = model, labels, cfg
    settings = cfg
    ceiling = cfg.n_components * MAX_TRUNCATION_GROWTH
    limit = min(ceiling, len(X))
    while fills_truncation(found := int(len(np.unique(labels))), settings.n_components):
        if settings.n_components >= limit:
            if limit == ceiling:  # not where the scenes themselves are the limit: nothing to raise there
                log.warning(
                    "the mixture used %d of its %d components, the most cluster.n_components (%d) lets it grow to: "
                    "the archive may hold more clusters; raise --max-clusters",
                    found,
                    settings.n_components,
                    cfg.n_components,
                )
            break
        grown = min(2 * settings.n_components, limit)
        log.info(
            "the mixture used %d of its %d components; fitting it again with room for %d",
            found,
            settings.n_components,
            grown,
        )
        concentration = cfg.weight_concentration_prior or 1.0 / cfg.n_components
        settings = cfg.model_copy(update={"n_components": grown, "weight_concentration_prior": concentration})
        model = make_clusterer(settings, X, device=device)
        labels = np.asarray(model.fit_predict(X))
        if not getattr(model, "settled_", True):
            log.warning(
                "with room for %d clusters the neighbourhood prior's count rose at every refit (%s): it follows the "
                "room, not the scenes; the fit with %d components (%d clusters) is kept",
                grown,
                model.counts_,
                cfg.n_components,
                len(np.unique(first[1])),
            )
            return first
    return model, labels, settings


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
