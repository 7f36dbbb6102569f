"""Project embeddings into a low-dimensional Euclidean space with UMAP.

cuML's UMAP runs on a GPU when it is importable and a GPU is present; umap-learn runs on the CPU
otherwise. Both take the same parameters, so a run's results do not depend on which one was picked
beyond their numerical differences.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Backend = Literal["auto", "umap-learn", "cuml"]


def cuml_available() -> bool:
    """True when cuML is installed and a CUDA GPU is visible (checked without importing cuML)."""
    if importlib.util.find_spec("cuml") is None:
        return False
    import torch

    return torch.cuda.is_available()


def make_umap(
    n_components: int = 10,
    *,
    n_neighbors: int = 30,
    min_dist: float = 0.0,
    metric: str = "cosine",
    random_state: int | None = 0,
    backend: Backend = "auto",
):
    """Build an unfitted UMAP estimator from the chosen backend.

    ``min_dist=0`` packs points of a cluster tightly, which suits a Gaussian mixture downstream; the
    cosine metric suits transformer features whose norm carries little meaning.
    """
    if backend not in ("auto", "umap-learn", "cuml"):
        raise ValueError(f"UMAP backend must be 'auto', 'umap-learn' or 'cuml', not {backend!r}")
    use_cuml = backend == "cuml" or (backend == "auto" and cuml_available())
    kwargs = dict(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
    )
    if use_cuml:
        from cuml.manifold import UMAP as CumlUMAP  # lazy: GPU machines only

        return CumlUMAP(**kwargs)
    import umap

    return umap.UMAP(**kwargs, low_memory=True)


def reduce_embeddings(X: np.ndarray, **umap_params) -> np.ndarray:
    """Fit UMAP on ``X`` of shape (n_samples, n_features) and return (n_samples, n_components) float32.

    ``n_neighbors`` is capped at ``n_samples - 1`` so a small input still runs (with a warning).
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or len(X) < 3:
        raise ValueError(f"UMAP needs at least 3 samples in a 2-d array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("embeddings contain NaN or inf; cannot project them")
    n_neighbors = umap_params.get("n_neighbors", 30)
    if n_neighbors >= len(X):
        log.warning("n_neighbors=%d >= n_samples=%d; using %d", n_neighbors, len(X), len(X) - 1)
        umap_params["n_neighbors"] = len(X) - 1
    reducer = make_umap(**umap_params)
    with warnings.catch_warnings():
        # umap-learn warns that a random_state disables parallelism: reproducibility is the point here
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        Y = reducer.fit_transform(X)
    if hasattr(Y, "get"):  # cupy -> numpy
        Y = Y.get()
    return np.asarray(Y, dtype=np.float32)
