"""Project embeddings into a low-dimensional Euclidean space: a registry of projections.

``umap`` (the method's own): cuML's UMAP on a GPU, umap-learn on the CPU, with the same parameters, so a
run's result does not depend on which one ran beyond their numerical differences. ``pca``: scikit-learn's
PCA, a fast linear reference. A new projection is one factory here (``@register``) and its name in
:attr:`scenecluster.config.ReduceConfig.method`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Backend = Literal["auto", "umap-learn", "cuml"]
Factory = Callable[..., Any]
PROJECTIONS: dict[str, Factory] = {}
#: UMAP's neighbours where a caller names none (``reduce.n_neighbors``'s default).
DEFAULT_UMAP_NEIGHBOURS = 30

__all__ = [
    "PROJECTIONS",
    "cuml_available",
    "fast_small_transform",
    "fit_settings",
    "make_projection",
    "make_umap",
    "min_samples",
    "reduce_embeddings",
    "register",
    "umap_neighbours",
    "whitened",
]


def register(name: str) -> Callable[[Factory], Factory]:
    """Add a factory ``(n_components, **settings) -> unfitted transformer`` to :data:`PROJECTIONS`."""

    def add(factory: Factory) -> Factory:
        PROJECTIONS[name] = factory
        return factory

    return add


def cuml_available() -> bool:
    """True when cuML is installed and a CUDA GPU is visible (checked without importing cuML)."""
    if importlib.util.find_spec("cuml") is None:
        return False
    import torch

    return torch.cuda.is_available()


@register("umap")
def make_umap(
    n_components: int = 5,
    *,
    n_neighbors: int = DEFAULT_UMAP_NEIGHBOURS,
    min_dist: float = 0.0,
    metric: str = "cosine",
    random_state: int | None = 0,
    backend: Backend = "auto",
):
    """Build an unfitted UMAP estimator from the chosen backend.

    ``min_dist=0`` packs points of a cluster tightly, which suits a Gaussian mixture downstream; the
    cosine metric suits transformer features whose norm carries little meaning. The run's
    :class:`scenecluster.devices.Resources` resolves ``auto`` before it gets here; a bare ``auto`` checks
    this process.
    """
    if backend not in ("auto", "umap-learn", "cuml"):
        raise ValueError(f"UMAP backend must be 'auto', 'umap-learn' or 'cuml', not {backend!r}")
    use_cuml = backend == "cuml" or (backend == "auto" and cuml_available())
    kwargs = dict(
        n_components=n_components, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric, random_state=random_state
    )
    if use_cuml:
        from cuml.manifold import UMAP as CumlUMAP  # lazy: GPU machines only

        return CumlUMAP(**kwargs)
    import umap

    from scenecluster.jitcache import keep_umap_compiles

    keep_umap_compiles()  # a fresh process loads the compiled code instead of compiling it (jitcache)
    # umap-learn runs a seeded fit on one thread anyway, and says so in a warning at every fit when not told
    n_jobs = 1 if random_state is not None else -1
    return umap.UMAP(**kwargs, low_memory=True, n_jobs=n_jobs)


# metrics whose umap-learn function and scikit-learn's vectorised one compute the same distance
_SAME_IN_SKLEARN = ("cosine", "euclidean")


def fast_small_transform(projection: Any) -> Any:
    """Let a umap-learn UMAP fitted on fewer than 4,096 scenes place new ones with vectorised distances.

    Why: below 4,096 fitted scenes umap-learn's ``transform`` computes the distance of every new scene to every
    fitted one with scikit-learn's ``pairwise_distances``, handing it umap's own numba metric as a Python
    callable, so scikit-learn calls it once per pair: 2.5 microseconds each, 20 s to place 3,000 scenes among
    2,700 (a run of a few thousand scenes, or a million scenes assigned to such a clustering, pays it). Given
    the metric's name, scikit-learn computes the same matrix in one vectorised call (1.1 s); the neighbours found
    are the same and the distances agree to float32 rounding (``docs/benchmarks.md``). The metric is set by name
    on the fitted object only, so fitting is unchanged (its own pairwise pass, once per run, stays umap's) and
    larger fits, which search pynndescent's index instead, are untouched. Works on a fitted UMAP or a pipeline
    that ends in one; anything else is returned as it is.
    """
    model = projection.steps[-1][1] if hasattr(projection, "steps") else projection
    small = getattr(model, "_small_data", False) and not getattr(model, "_sparse_data", True)
    if small and getattr(model, "metric", None) in _SAME_IN_SKLEARN and hasattr(model, "_input_distance_func"):
        model._input_distance_func = model.metric  # read only by the small-data branch of transform
    return projection


@register("pca")
def make_pca(n_components: int = 5, *, random_state: int | None = 0, **_umap_settings: Any):
    """scikit-learn's PCA (the UMAP-only settings are ignored)."""
    from sklearn.decomposition import PCA

    return PCA(n_components=n_components, random_state=random_state)


def min_samples(method: str, n_components: int) -> int:
    """The fewest scenes a projection to ``n_components`` dimensions can be fitted on, and the report's 2-D view.

    UMAP's spectral start solves for ``n_components + 1`` eigenvectors of the neighbour graph, which needs more
    nodes than that (scipy refuses ``k >= N``); PCA needs as many samples as components. Four is the floor for
    the report's 2-D UMAP of the same scenes.
    """
    return max(4, n_components + 2 if method == "umap" else n_components)


def make_projection(method: str = "umap", *, whiten: int = 0, **settings: Any):
    """The unfitted projection that ``method`` names, built from the ``reduce`` section's other settings.

    With ``whiten`` > 0 it is a scikit-learn pipeline: PCA to ``whiten`` components scaled to unit variance,
    then the projection (see :func:`whitened`). Callers cap ``whiten`` at the sample's rank
    (:func:`fit_settings`).
    """
    if method not in PROJECTIONS:
        raise ValueError(f"projection method must be one of {', '.join(PROJECTIONS)}, not {method!r}")
    settings.pop("neighbors_share", None)  # fit_settings applies it (it knows the sample); n_neighbors is as given
    projection = PROJECTIONS[method](**settings)
    return whitened(projection, whiten, settings.get("random_state", 0)) if whiten else projection


def whitened(projection: Any, n_components: int, random_state: int | None):
    """``projection`` after PCA-whitening to ``n_components``.

    Why: a backbone's features vary most along a few directions that mostly carry what every scene shares
    (illumination, season, sensor); cosine neighbours are then decided by those directions. Whitening weighs
    each principal direction alike, so the neighbour graph UMAP builds follows the finer differences between
    scene types. Off by default: it helped many-class sets and hurt few-class ones (``docs/benchmarks.md``).
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline

    return make_pipeline(PCA(n_components=n_components, whiten=True, random_state=random_state), projection)


MIN_UMAP_NEIGHBOURS = 10


def umap_neighbours(n_neighbors: int, share: float, n_samples: int) -> int:
    """UMAP's neighbour count for a fit on ``n_samples`` scenes: ``share`` of them, at least
    :data:`MIN_UMAP_NEIGHBOURS`, at most ``n_neighbors`` (``share`` 0: ``n_neighbors``).

    Why: UMAP's neighbourhood should stay a small part of a class. A fixed 30 is 40% of a class of 75 in a fit of
    900 scenes of 12 classes; the layout then joins touching classes and the mixture under-counts (EuroSAT and
    nwpu12, both transfer directions: 1 of 12 fits within 20% of the classes at 500 scenes, 7 at 1,000; with a
    share of 0.011, 8 and 10). But on archives of 3-6 classes the smaller neighbourhoods split classes (accuracy
    0.09 lower for 3 classes), so the share is an option, off by default (docs/benchmarks.md). Fits of 2,700
    scenes or more keep ``n_neighbors`` at that share.
    """
    if share <= 0:
        return n_neighbors
    return min(n_neighbors, max(MIN_UMAP_NEIGHBOURS, round(share * n_samples)))


def fit_settings(settings: dict[str, Any], n_samples: int, n_features: int) -> dict[str, Any]:
    """The ``reduce`` settings for a sample of this size: neighbours a share of it (``neighbors_share``, then
    removed, see :func:`umap_neighbours`) and below it, whitening components within its rank (a few dozen scenes
    still run)."""
    settings = dict(settings)
    share = settings.pop("neighbors_share", 0.0)
    if "n_neighbors" in settings:
        settings["n_neighbors"] = umap_neighbours(settings["n_neighbors"], share, n_samples)
    neighbours = settings.get("n_neighbors", DEFAULT_UMAP_NEIGHBOURS)
    if neighbours >= n_samples:
        log.warning(
            "UMAP's n_neighbors (%d) is not below the %d scenes fitted; using %d", neighbours, n_samples, n_samples - 1
        )
        settings["n_neighbors"] = max(2, n_samples - 1)
    if settings.get("whiten"):
        settings["whiten"] = min(settings["whiten"], n_samples - 1, n_features)
    return settings


def reduce_embeddings(X: np.ndarray, **settings: Any) -> np.ndarray:
    """Fit the projection on ``X`` of shape (n_samples, n_features); return (n_samples, n_components) float32.

    ``settings`` are the ``reduce`` section's fields (``method`` defaults to ``umap``). ``n_neighbors`` is
    capped at ``n_samples - 1`` so a small input still runs (with a warning).
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or len(X) < 3:
        raise ValueError(f"UMAP needs at least 3 samples in a 2-d array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("embeddings contain NaN or inf; cannot project them")
    reducer = make_projection(**fit_settings(settings, *X.shape))
    Y = reducer.fit_transform(X)
    if hasattr(Y, "get"):  # cupy -> numpy
        Y = Y.get()
    return np.asarray(Y, dtype=np.float32)
