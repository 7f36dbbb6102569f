"""Initial responsibilities: a chunked torch k-means on the fit device, k-means++ seeding, or random rows.

They only seed the first M-step, so the k-means need not converge; it runs where the data already are
(GPU included) instead of copying them to scikit-learn.
"""

from __future__ import annotations

import numpy as np
import torch

from scenecluster.mixture._features import ChunkedFeatures

__all__ = ["initial_statistics", "kmeans", "nearest"]


def nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest center of each row of a chunk, shape (n,)."""
    d2 = (centers * centers).sum(1)[None, :] - 2.0 * (x @ centers.T)
    return d2.argmin(1)


def _kmeans_plus_plus(X: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new center drawn proportionally to the squared
    distance to the nearest center so far.

    Returns
    -------
    centers : tensor of shape (k, D)
    """
    n = X.shape[0]
    x_sq = (X.to(torch.float64) ** 2).sum(1)  # (n,)

    def sqdist(c: torch.Tensor) -> torch.Tensor:
        """Squared distances of all rows to one center, via a matrix-vector product (no (n, D) temporary)."""
        c64 = c.to(torch.float64)
        return (x_sq - 2.0 * (X @ c).to(torch.float64) + c64 @ c64).clamp_(min=0.0)

    first = int(torch.randint(n, (1,), generator=gen, device=X.device))
    centers = [X[first]]
    closest = sqdist(X[first])
    for _ in range(1, k):
        total = closest.sum()
        u = torch.rand((), generator=gen, device=X.device, dtype=torch.float64)
        if total > 0:
            # Inverse-CDF sampling proportional to D(x)^2 (torch.multinomial caps the category count).
            idx = int(torch.searchsorted(torch.cumsum(closest, 0), (u * total).reshape(1)).clamp_(max=n - 1))
        else:  # every point coincides with a center already: any point will do
            idx = int((u * n).long().clamp_(max=n - 1))
        centers.append(X[idx])
        closest = torch.minimum(closest, sqdist(X[idx]))
    return torch.stack(centers)


def kmeans(X: torch.Tensor, k: int, gen: torch.Generator, chunk: int, n_lloyd: int) -> torch.Tensor:
    """Chunked k-means on the device: k-means++ seeding then up to ``n_lloyd`` Lloyd iterations (fewer when
    the centers stop moving). Only used to initialise the responsibilities, so it need not be converged.

    Returns
    -------
    centers : tensor of shape (k, D)
    """
    C = _kmeans_plus_plus(X, k, gen)
    for _ in range(n_lloyd):
        sums = torch.zeros_like(C, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64, device=X.device)
        for s in range(0, X.shape[0], chunk):
            x = X[s : s + chunk]
            lab = nearest(x, C)
            sums.index_add_(0, lab, x.to(torch.float64))
            counts += torch.bincount(lab, minlength=k).to(torch.float64)
        nonempty = counts > 0
        new = C.to(torch.float64).clone()
        new[nonempty] = sums[nonempty] / counts[nonempty, None]
        new = new.to(X.dtype)
        if torch.equal(new, C):
            break
        C = new
    return C


def initial_statistics(
    data: ChunkedFeatures,
    n_components: int,
    init_params: str,
    gen: torch.Generator,
    initial_resp: np.ndarray | None,
) -> torch.Tensor:
    """Sufficient statistics ``R^T phi(X)`` of the initial responsibilities, accumulated chunk by chunk.

    Parameters
    ----------
    data : ChunkedFeatures
    n_components : int
    init_params : {"kmeans", "kmeans++", "random"}
        Hard labels of the k-means (10 Lloyd iterations) or of its seeding alone, or random rows normalised
        to sum to one.
    gen : torch.Generator
        On the fit device; all randomness of the initialisation comes from it.
    initial_resp : ndarray of shape (n_samples, n_components) or None
        Given responsibilities, which override ``init_params``.

    Returns
    -------
    stats : float64 tensor of shape (K, P)
    """
    K = n_components
    centers = None
    if initial_resp is None and init_params in ("kmeans", "kmeans++"):
        centers = kmeans(data.X, K, gen, data.chunk, n_lloyd=10 if init_params == "kmeans" else 0)
    if initial_resp is not None:
        initial_resp = np.asarray(initial_resp)
        if initial_resp.shape != (data.X.shape[0], K):
            raise ValueError(f"initial_resp should have shape {(data.X.shape[0], K)}")

    def responsibilities(start: int, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        if initial_resp is not None:
            return torch.as_tensor(initial_resp[start : start + data.chunk], device=data.device).to(data.dtype)
        if centers is not None:
            return torch.nn.functional.one_hot(nearest(x, centers), K).to(data.dtype)
        resp = torch.rand((x.shape[0], K), generator=gen, device=data.device, dtype=data.dtype)
        resp /= resp.sum(1, keepdim=True)
        return resp

    return data.statistics(responsibilities, K)
