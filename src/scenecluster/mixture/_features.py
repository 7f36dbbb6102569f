"""The feature map ``phi`` and the chunked passes over the data that use it.

With ``phi(x) = [x_i x_j (i <= j), x, 1]`` (or ``[x**2, x, 1]`` for diagonal covariances) every Gaussian
log-density of every component is linear in ``phi(x)``, and the M-step's sufficient statistics are
``R^T phi(X)``. So one pass over the data is two matrix products per chunk, and memory stays bounded by the
chunk size whatever N is. :class:`ChunkedFeatures` owns the centred data on the device, the chunking, and
a cache of ``phi(X)`` when it is small enough to keep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from scenecluster.mixture._covariance import CovarianceType

__all__ = ["ChunkedFeatures", "centred_feature_chunks", "default_chunk_size", "feature_map"]

# Largest feature matrix phi(X) kept in memory for a whole fit (bytes); larger inputs recompute it per chunk.
_PHI_CACHE_BYTES = 256 * 2**20

# (start row, x chunk, phi(x chunk)) -> responsibilities of the chunk, shape (rows, K)
ResponsibilityFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def default_chunk_size(chunk_size: int | None, n_stats: int, n_components: int) -> int:
    """``chunk_size``, or ``max(1024, 2**20 // max(P, K))`` rows (8 MiB per float64 chunk buffer): large
    enough for efficient matrix products, small enough to stay in cache and to bound memory."""
    return chunk_size or max(1024, 2**20 // max(n_stats, n_components))


def feature_map(x: torch.Tensor, cov: CovarianceType, out: torch.Tensor | None = None) -> torch.Tensor:
    """Feature map ``phi(x)`` of a chunk.

    Parameters
    ----------
    x : tensor of shape (n, D)
    cov : CovarianceType
        Writes the quadratic block (upper triangle for full covariances, squares for diagonal ones).
    out : tensor of shape (>= n, P) or None
        Buffer to fill (its first n rows), so the per-chunk recomputation allocates nothing.

    Returns
    -------
    phi : tensor of shape (n, P)
        ``[x_i x_j for i <= j, x, 1]`` or ``[x**2, x, 1]``, row-major in that order.
    """
    n, d = x.shape
    n_quad = cov.n_quadratic
    phi = torch.empty((n, n_quad + d + 1), dtype=x.dtype, device=x.device) if out is None else out[:n]
    cov.quadratic_features(x, phi[:, :n_quad])
    phi[:, n_quad : n_quad + d] = x
    phi[:, -1] = 1.0
    return phi


def _centred(X: np.ndarray, centre: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``X - centre`` on ``centre``'s device in ``dtype``, through a float64 copy (which also makes
    read-only inputs, e.g. memmaps, safe for torch), so centring loses nothing before the cast."""
    X64 = torch.from_numpy(np.array(X, dtype=np.float64, copy=True)).to(centre.device)
    return X64.sub_(centre).to(dtype)


def centred_feature_chunks(
    X: np.ndarray, centre: np.ndarray, cov: CovarianceType, chunk: int, device: torch.device, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """``phi(X[s:s + chunk] - centre)`` chunk by chunk, moving only one chunk to the device at a time (for
    prediction on data of any size)."""
    centre_t = torch.as_tensor(centre, device=device, dtype=torch.float64)
    for s in range(0, X.shape[0], chunk):
        yield feature_map(_centred(X[s : s + chunk], centre_t, dtype), cov)


class ChunkedFeatures:
    """The training data centred on its mean, on the fit device, served in chunks with its feature map.

    Raw moments lose precision when a cluster is far from the origin relative to its spread, hence the
    centring (priors are shifted along, see :meth:`Priors.centred`). ``phi(X)`` is about ``P / D`` times
    the size of X: it is built once per fit when it fits ``_PHI_CACHE_BYTES``, otherwise recomputed into one
    reused buffer on every pass.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    cov : CovarianceType
    chunk : int
        Rows per chunk.
    device : torch.device
    dtype : torch.dtype
        Working dtype of the chunk products.

    Attributes
    ----------
    X : tensor of shape (n_samples, n_features)
        The centred data in ``dtype``.
    shift : ndarray of shape (n_features,)
        The float64 data mean that was subtracted.
    eps : float
        Machine epsilon of ``dtype`` (sklearn adds ``10 eps`` to every ``N_k``).
    """

    def __init__(
        self, X: np.ndarray, cov: CovarianceType, chunk: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.shift = X.mean(axis=0, dtype=np.float64)
        self.X = _centred(X, torch.as_tensor(self.shift, device=device), dtype)
        self.cov, self.chunk, self.device, self.dtype = cov, chunk, device, dtype
        self.eps = float(torch.finfo(dtype).eps)
        self._phi = None
        if X.shape[0] * cov.n_stats * self.X.element_size() <= _PHI_CACHE_BYTES:
            self._phi = feature_map(self.X, cov)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(start, x, phi(x))`` for ``x = X[start:start + chunk]``, from the cache when there is one,
        else computed into one reused buffer (consume each chunk before asking for the next)."""
        buf = None
        if self._phi is None:
            buf = torch.empty((self.chunk, self.cov.n_stats), dtype=self.dtype, device=self.device)
        for s in range(0, self.X.shape[0], self.chunk):
            x = self.X[s : s + self.chunk]
            yield s, x, (self._phi[s : s + self.chunk] if buf is None else feature_map(x, self.cov, out=buf))

    def statistics(self, responsibilities: ResponsibilityFn, n_components: int) -> torch.Tensor:
        """Sufficient statistics ``R^T phi(X)``, accumulated in float64 chunk by chunk.

        Parameters
        ----------
        responsibilities : callable ``(start, x, phi) -> (rows, K) tensor`` in the working dtype
        n_components : int

        Returns
        -------
        stats : float64 tensor of shape (K, P)
            ``sum_n r_nk phi(x_n)``: the second moments, ``sum_n r_nk x_n`` and ``N_k``.
        """
        stats = torch.zeros((n_components, self.cov.n_stats), dtype=torch.float64, device=self.device)
        for s, x, phi in self.chunks():
            stats += (responsibilities(s, x, phi).T @ phi).to(torch.float64)
        return stats

    def e_step_statistics(self, W: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One pass: responsibilities from the logit weights (log-domain, logsumexp; sklearn
        ``_estimate_log_prob_resp``) and their sufficient statistics, the E-step fused with the M-step's
        data part.

        Parameters
        ----------
        W : tensor of shape (P, K) in the working dtype
            ``phi(x) @ W`` are the weighted log-probabilities (sklearn ``_estimate_weighted_log_prob``).

        Returns
        -------
        stats : float64 tensor of shape (K, P)
        entropy_term : float
            ``sum_nk r_nk log r_nk``.
        """
        # Preallocated (chunk, K) buffers and in-place ops: fresh multi-MiB allocations per chunk cost more
        # than the arithmetic on CPU (page faults), and the arithmetic is only a few passes over memory.
        logits = torch.empty((self.chunk, W.shape[1]), dtype=self.dtype, device=self.device)
        resp = torch.empty_like(logits)
        ent = torch.zeros((), dtype=torch.float64, device=self.device)
        # Floor at ~exp(-700) (float64) / exp(-79) (float32): exp of very negative or denormal-producing
        # inputs takes a slow path (10-70x on CPU), and these responsibilities are < 1e-300 resp. 1e-34
        # of the row's largest, far below the 10 * eps that sklearn adds to N_k anyway.
        floor = math.log(torch.finfo(self.dtype).tiny) + 8.0

        def responsibilities(start: int, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
            n = phi.shape[0]
            lg, r = logits[:n], resp[:n]
            torch.matmul(phi, W, out=lg)
            lg.sub_(lg.amax(1, keepdim=True))
            lg.clamp_(min=floor)
            torch.exp(lg, out=r)
            norm = r.sum(1, keepdim=True)
            r.div_(norm)
            lg.sub_(norm.log_())  # lg is now log r
            ent.add_(torch.dot(r.reshape(-1), lg.reshape(-1)).to(torch.float64))
            return r

        stats = self.statistics(responsibilities, W.shape[1])
        return stats, float(ent)

    def labels(self, W: torch.Tensor) -> torch.Tensor:
        """Most responsible component of every row, ``argmax_k phi(x) @ W``, shape (n_samples,)."""
        return torch.cat([(phi @ W).argmax(1) for _, _, phi in self.chunks()])
