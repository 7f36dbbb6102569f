"""What differs between full and diagonal covariances, in one place per covariance type.

Every step of the fit (feature map, sufficient statistics, Wishart update, Cholesky factors, log-densities,
the default prior) has a full and a diagonal form. Two small classes hold both forms of each step, and
:data:`COVARIANCE_TYPES` maps ``covariance_type`` to its class (the way scikit-learn's
``BayesianGaussianMixture._estimate_precisions`` dispatches through a dict), so the rest of the package
never branches on the covariance type.

An instance is bound to a feature count and a device, because the full form needs the upper-triangle index
pairs of the quadratic features there on every chunk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

__all__ = ["COVARIANCE_TYPES", "CovarianceType", "DiagCovariance", "FullCovariance"]

ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined empirical covariance (for "
    "instance caused by singleton or collapsed samples). Try to decrease the number of components, increase "
    "reg_covar, or scale the input data."
)


class CovarianceType(ABC):
    """The steps both covariance types share, written once over a few per-type primitives.

    Parameters
    ----------
    n_features : int
        D, the data dimension.
    n_quadratic : int
        Number of quadratic features in ``phi(x)``: ``D(D+1)/2`` (full) or ``D`` (diagonal).

    Attributes
    ----------
    n_stats : int
        ``P``, the length of ``phi(x) = [quadratic, x, 1]`` and of each component's row of statistics.
    """

    def __init__(self, n_features: int, n_quadratic: int) -> None:
        self.n_features = n_features
        self.n_quadratic = n_quadratic
        self.n_stats = n_quadratic + n_features + 1

    def log_det_cholesky(self, precisions_cholesky: torch.Tensor) -> torch.Tensor:
        """``log det`` of each precision Cholesky factor, from its diagonal, shape (K,)."""
        return torch.log(self._diagonal(precisions_cholesky)).sum(-1)

    def wishart_covariances(
        self,
        covariance_prior: torch.Tensor,
        nk_sk: torch.Tensor,
        shrink: torch.Tensor,
        diff: torch.Tensor,
        degrees_of_freedom: torch.Tensor,
    ) -> torch.Tensor:
        """``W_k^{-1} / nu_k`` (Bishop 2006, eq. 10.62), normalised by ``nu_k`` as scikit-learn stores it.

        ``W_k^{-1} = W_0^{-1} + N_k S_k + shrink_k (xbar_k - m_0)(xbar_k - m_0)^T`` with
        ``shrink_k = beta_0 N_k / beta_k`` and ``diff = xbar_k - m_0``.
        """
        return (covariance_prior + nk_sk + self._scaled_outer(shrink, diff)) / self._per_component(degrees_of_freedom)

    # ---- per-type primitives

    @staticmethod
    @abstractmethod
    def precisions(precisions_cholesky: Any) -> Any:
        """Precisions ``U U^T`` from their Cholesky factors (numpy or torch alike)."""

    @abstractmethod
    def quadratic_features(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write the quadratic block of ``phi(x)`` into ``out`` (shape (n, n_quadratic))."""

    @abstractmethod
    def logit_terms(self, precisions: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quadratic and linear coefficients of ``-0.5 (x - m_k)^T L_k (x - m_k)`` in ``phi(x)``."""

    @abstractmethod
    def scatter(self, stats: torch.Tensor, nk: torch.Tensor, xk: torch.Tensor, reg_covar: float) -> torch.Tensor:
        """``N_k S_k``, the responsibility-weighted scatter about ``xbar_k`` plus ``N_k reg_covar I``.

        Parameters
        ----------
        stats : float64 tensor of shape (K, P)
            ``sum_n r_nk phi(x_n)``: second moments, ``sum_n r_nk x_n``, ``sum_n r_nk``.
        nk : tensor of shape (K,)
            ``sum_n r_nk + 10 eps``, as scikit-learn's ``_estimate_gaussian_parameters``.
        xk : tensor of shape (K, D)
            ``xbar_k``.
        reg_covar : float
        """

    @abstractmethod
    def precisions_cholesky(self, covariances: torch.Tensor) -> torch.Tensor:
        """Cholesky factors of the precisions; raises ``ValueError`` when a covariance is not positive."""

    @staticmethod
    @abstractmethod
    def default_prior(X: np.ndarray) -> np.ndarray:
        """The Wishart scale prior scikit-learn uses when none is given, from float64 data."""

    @staticmethod
    @abstractmethod
    def check_prior(prior: np.ndarray, n_features: int) -> None:
        """Raise ``ValueError`` unless a user-given Wishart scale prior has the right shape and sign."""

    @staticmethod
    @abstractmethod
    def _diagonal(matrices: torch.Tensor) -> torch.Tensor:
        """The diagonals of per-component covariance-shaped tensors, (K, D)."""

    @staticmethod
    @abstractmethod
    def _per_component(v: torch.Tensor) -> torch.Tensor:
        """``v`` (K,) broadcast against one covariance per component."""

    @staticmethod
    @abstractmethod
    def _scaled_outer(s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``s_k u_k u_k^T`` per component (only its diagonal for diagonal covariances)."""


class FullCovariance(CovarianceType):
    """Full ``D x D`` covariances: quadratic features ``x_i x_j`` for ``i <= j``, row-major.

    Parameters
    ----------
    n_features : int
    device : torch.device or None
        Where the upper-triangle index pairs ``iu`` (shape (2, D(D+1)/2)) live.
    """

    def __init__(self, n_features: int, device: torch.device | None = None) -> None:
        self.iu = torch.triu_indices(n_features, n_features).to(device)
        super().__init__(n_features, self.iu.shape[1])

    @staticmethod
    def precisions(precisions_cholesky: Any) -> Any:
        return precisions_cholesky @ precisions_cholesky.swapaxes(-1, -2)

    def quadratic_features(self, x: torch.Tensor, out: torch.Tensor) -> None:
        # Row i of the upper triangle, x_i * x_{i..D-1}, one broadcast product each (iu is row-major), which
        # avoids the gathered (n, D(D+1)/2) temporaries of x[:, iu[0]] * x[:, iu[1]].
        d = x.shape[1]
        off = 0
        for i in range(d):
            torch.mul(x[:, i : i + 1], x[:, i:], out=out[:, off : off + d - i])
            off += d - i

    def logit_terms(self, precisions: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        iu = self.iu
        off_diag = (iu[0] != iu[1]).to(precisions.dtype)
        quad = -0.5 * precisions[:, iu[0], iu[1]] * (1.0 + off_diag)  # (K, D(D+1)/2)
        lin = torch.einsum("kij,kj->ki", precisions, means)  # L_k m_k
        return quad, lin

    def scatter(self, stats: torch.Tensor, nk: torch.Tensor, xk: torch.Tensor, reg_covar: float) -> torch.Tensor:
        iu, d = self.iu, self.n_features
        sumr, sx = stats[:, -1], stats[:, -1 - d : -1]
        sxx = stats.new_zeros((stats.shape[0], d, d))
        sxx[:, iu[0], iu[1]] = stats[:, : self.n_quadratic]
        sxx[:, iu[1], iu[0]] = stats[:, : self.n_quadratic]
        # nk * S_k = sum_n r_nk (x_n - xbar_k)(x_n - xbar_k)^T + nk * reg_covar * I
        outer = sx[:, :, None] * xk[:, None, :]
        nk_sk = sxx - outer - outer.transpose(1, 2) + self._scaled_outer(sumr, xk)
        return nk_sk + (nk * reg_covar)[:, None, None] * torch.eye(d, dtype=stats.dtype, device=stats.device)

    def precisions_cholesky(self, covariances: torch.Tensor) -> torch.Tensor:
        chol, info = torch.linalg.cholesky_ex(covariances)
        if bool((info != 0).any()):
            raise ValueError(ILL_DEFINED)
        eye = torch.eye(self.n_features, dtype=chol.dtype, device=chol.device).expand_as(chol)
        # K small D x D triangular inversions (D right-hand sides each), never N right-hand sides.
        return torch.linalg.solve_triangular(chol, eye, upper=False).transpose(1, 2)

    @staticmethod
    def _diagonal(matrices: torch.Tensor) -> torch.Tensor:
        return torch.diagonal(matrices, dim1=-2, dim2=-1)

    @staticmethod
    def _per_component(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None]

    @staticmethod
    def _scaled_outer(s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return s[:, None, None] * u[:, :, None] * u[:, None, :]

    @staticmethod
    def default_prior(X: np.ndarray) -> np.ndarray:
        """The empirical covariance ``np.cov(X.T)``, scikit-learn's default Wishart scale prior."""
        return np.atleast_2d(np.cov(X.T))

    @staticmethod
    def check_prior(prior: np.ndarray, n_features: int) -> None:
        """Raise ``ValueError`` unless ``prior`` is a symmetric positive-definite (D, D) matrix."""
        if prior.shape != (n_features, n_features):
            raise ValueError(f"covariance_prior should have shape ({n_features}, {n_features})")
        if not np.allclose(prior, prior.T) or np.linalg.eigvalsh(prior).min() <= 0:
            raise ValueError("covariance_prior should be symmetric, positive-definite")


class DiagCovariance(CovarianceType):
    """Diagonal covariances, each stored as its (D,) diagonal: quadratic features ``x**2``."""

    def __init__(self, n_features: int, device: torch.device | None = None) -> None:
        super().__init__(n_features, n_features)

    @staticmethod
    def precisions(precisions_cholesky: Any) -> Any:
        return precisions_cholesky * precisions_cholesky

    def quadratic_features(self, x: torch.Tensor, out: torch.Tensor) -> None:
        torch.mul(x, x, out=out)

    def logit_terms(self, precisions: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return -0.5 * precisions, precisions * means

    def scatter(self, stats: torch.Tensor, nk: torch.Tensor, xk: torch.Tensor, reg_covar: float) -> torch.Tensor:
        return stats[:, : self.n_features] - self._scaled_outer(nk, xk) + (nk * reg_covar)[:, None]

    def precisions_cholesky(self, covariances: torch.Tensor) -> torch.Tensor:
        if bool((covariances <= 0).any()):
            raise ValueError(ILL_DEFINED)
        return 1.0 / torch.sqrt(covariances)

    @staticmethod
    def _diagonal(matrices: torch.Tensor) -> torch.Tensor:
        return matrices

    @staticmethod
    def _per_component(v: torch.Tensor) -> torch.Tensor:
        return v[:, None]

    @staticmethod
    def _scaled_outer(s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return s[:, None] * u * u

    @staticmethod
    def default_prior(X: np.ndarray) -> np.ndarray:
        """The variances with ``ddof=1``, scikit-learn's default for diagonal covariances."""
        return np.var(X, axis=0, ddof=1)

    @staticmethod
    def check_prior(prior: np.ndarray, n_features: int) -> None:
        """Raise ``ValueError`` unless ``prior`` is a positive (D,) vector."""
        if prior.shape != (n_features,) or (prior <= 0).any():
            raise ValueError(f"covariance_prior should be positive with shape ({n_features},)")


COVARIANCE_TYPES: dict[str, type[CovarianceType]] = {"full": FullCovariance, "diag": DiagCovariance}
