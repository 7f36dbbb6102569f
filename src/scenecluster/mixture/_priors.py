"""The priors of the DP-GMM, resolved from the estimator's parameters exactly as scikit-learn does.

Kept apart from the estimator so that the M-step functions in :mod:`scenecluster.mixture._maths` receive
one small immutable object (moved to the fit device and into centred coordinates once per fit) instead
of reading estimator attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scenecluster.mixture._covariance import CovarianceType

__all__ = ["Priors", "resolve_priors"]


@dataclass(frozen=True)
class Priors:
    """Resolved priors; ``mean`` and ``covariance`` are numpy in data coordinates, or float64 tensors in
    centred coordinates after :meth:`centred`.

    The numbers are kept as given (an int stays an int), so results match the original estimator bit for
    bit.
    """

    weight_concentration: float  # alpha of the DP when it is fixed
    concentration_shape: float | None  # s1 of the Gamma hyper-prior on alpha, or None
    concentration_rate: float | None  # s2, or None
    mean_precision: float  # beta_0
    mean: Any  # m_0, (D,)
    degrees_of_freedom: float  # nu_0
    covariance: Any  # W_0^{-1}, (D, D) or (D,)

    @property
    def hyper(self) -> bool:
        """Whether alpha has the Gamma hyper-prior (and so a variational factor ``q(alpha)``)."""
        return self.concentration_shape is not None

    def initial_alpha(self) -> float:
        """The concentration of the initial sticks: the prior mean ``s1 / s2`` of alpha when it is random."""
        if self.hyper:
            return self.concentration_shape / self.concentration_rate
        return self.weight_concentration

    def centred(self, shift: np.ndarray, device: torch.device) -> Priors:
        """The same priors as float64 tensors on ``device``, with the mean moved by ``-shift`` (the model is
        equivariant under translation, and the fit works on data centred on ``shift``)."""
        f64 = {"device": device, "dtype": torch.float64}
        return dataclasses.replace(
            self, mean=torch.as_tensor(self.mean - shift, **f64), covariance=torch.as_tensor(self.covariance, **f64)
        )


def resolve_priors(X: np.ndarray, cov: type[CovarianceType], params: Mapping[str, Any]) -> Priors:
    """Resolve the priors exactly like sklearn's ``BayesianGaussianMixture._check_parameters``.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Data-dependent defaults (mean, empirical covariance) come from it.
    cov : type of CovarianceType
        Gives the default covariance prior and the check of a given one.
    params : mapping
        The estimator's parameters (``get_params()``), under their public names: ``n_components``,
        ``weight_concentration_prior``, ``concentration_prior_shape`` / ``_rate``, ``mean_precision_prior``,
        ``mean_prior``, ``degrees_of_freedom_prior``, ``covariance_prior``.

    Raises
    ------
    ValueError
        For a half-set hyper-prior or a prior of the wrong shape or sign.
    """
    shape, rate = params["concentration_prior_shape"], params["concentration_prior_rate"]
    if (shape is None) != (rate is None):
        raise ValueError(
            "concentration_prior_shape and concentration_prior_rate must both be set (Gamma hyper-prior "
            "on the DP concentration) or both be None."
        )
    alpha, beta0 = params["weight_concentration_prior"], params["mean_precision_prior"]
    return Priors(
        weight_concentration=1.0 / params["n_components"] if alpha is None else float(alpha),
        concentration_shape=shape,
        concentration_rate=rate,
        mean_precision=1.0 if beta0 is None else beta0,
        mean=_resolve_mean(X, params["mean_prior"]),
        degrees_of_freedom=_resolve_degrees_of_freedom(params["degrees_of_freedom_prior"], X.shape[1]),
        covariance=_resolve_covariance(X, cov, params["covariance_prior"]),
    )


def _resolve_mean(X: np.ndarray, mean: Any) -> np.ndarray:
    """m_0: the data mean by default."""
    if mean is None:
        return X.mean(axis=0, dtype=np.float64)
    resolved = np.asarray(mean, dtype=np.float64).reshape(-1)
    if resolved.shape != (X.shape[1],):
        raise ValueError(f"mean_prior should have shape ({X.shape[1]},), got {resolved.shape}")
    return resolved


def _resolve_degrees_of_freedom(degrees_of_freedom: float | None, n_features: int) -> float:
    """nu_0: D by default; it must exceed D - 1 for the Wishart to be proper."""
    if degrees_of_freedom is None:
        return float(n_features)
    if degrees_of_freedom > n_features - 1.0:
        return float(degrees_of_freedom)
    raise ValueError(
        f"The parameter 'degrees_of_freedom_prior' should be greater than {n_features - 1}, "
        f"but got {degrees_of_freedom:.3f}."
    )


def _resolve_covariance(X: np.ndarray, cov: type[CovarianceType], covariance: Any) -> np.ndarray:
    """W_0^{-1}: the empirical covariance (resp. variances) by default, else the checked given one."""
    if covariance is None:
        return cov.default_prior(X.astype(np.float64, copy=False))
    resolved = np.asarray(covariance, dtype=np.float64)
    cov.check_prior(resolved, X.shape[1])
    return resolved
