"""The variational updates and the lower bound, as pure functions of small ``K``-sized float64 tensors.

Each function is one formula of scikit-learn's ``BayesianGaussianMixture`` (``dirichlet_process`` weights)
with the equation it implements cited, so it can be checked against the reference line by line. None of
them touches the data: they see it only through the sufficient statistics ``sum_n r_nk phi(x_n)`` (see
:mod:`scenecluster.mixture._features`), which is what lets the data pass be chunked and fused. What differs
between covariance types comes in as a :class:`~scenecluster.mixture._covariance.CovarianceType`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from scenecluster.mixture._covariance import CovarianceType
from scenecluster.mixture._priors import Priors

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class VariationalParams:
    """Variational posterior parameters, float64 torch tensors on the fit device, in centred coordinates.

    Names follow scikit-learn's ``BayesianGaussianMixture`` attributes. ``q(alpha)`` is part of them (not
    estimator state) because the next M-step's sticks are built from it: an M-step is then a function of
    the statistics and the previous parameters only.
    """

    weight_concentration: tuple[torch.Tensor, torch.Tensor]  # Beta(a_k, b_k) of the sticks, (K,) each
    mean_precision: torch.Tensor  # beta_k, (K,)
    means: torch.Tensor  # m_k, (K, D)
    degrees_of_freedom: torch.Tensor  # nu_k, (K,)
    covariances: torch.Tensor  # W_k^{-1} / nu_k, (K, D, D) or (K, D)
    precisions_cholesky: torch.Tensor  # (K, D, D) or (K, D)
    alpha_used: float  # the concentration (or E[alpha]) that b_k was computed with
    alpha_posterior: tuple[float, float] | None  # Gamma(shape, rate) of q(alpha) when the hyper-prior is on


# ---- expectations under q


def expected_log_stick_complement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``E[log(1 - V_k)] = digamma(b_k) - digamma(a_k + b_k)`` under ``V_k ~ Beta(a_k, b_k)``, shape (K,)."""
    return torch.special.digamma(b) - torch.special.digamma(a + b)


def estimate_log_weights(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """E[log pi_k] under the stick-breaking posterior (Blei & Jordan 2006, eq. 22; sklearn
    ``_estimate_log_weights``): ``E[log V_k] + sum_{j<k} E[log(1 - V_j)]``."""
    digamma_sum = torch.special.digamma(a + b)
    tail = torch.cumsum(expected_log_stick_complement(a, b), 0)
    return torch.special.digamma(a) - digamma_sum + torch.cat([tail.new_zeros(1), tail[:-1]])


def expected_weights(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``E[pi_k]`` of the sticks, normalised (sklearn ``_set_parameters``): the reported ``weights_``."""
    tmp = b / (a + b)
    weights = a / (a + b) * np.hstack((1.0, np.cumprod(tmp[:-1])))
    return weights / weights.sum()


def logit_weights(params: VariationalParams, cov: CovarianceType) -> torch.Tensor:
    """Weight matrix ``W`` such that ``phi(x) @ W`` is sklearn's ``_estimate_weighted_log_prob``.

    The expected log-likelihood of x under component k (Bishop 2006, eq. 10.64-10.66; sklearn
    ``_estimate_log_prob``) is ``-0.5 D log(2 pi) - 0.5 (x - m_k)^T L_k (x - m_k) + log det U_k
    - 0.5 D log nu_k + 0.5 (E[log |Lambda_k|]-part - D / beta_k)`` with ``L_k = U_k U_k^T`` built from the
    normalised covariances and ``U_k`` the precision Cholesky factor. Expanding the quadratic form makes it
    linear in ``phi(x)``, so a whole chunk's log-probabilities are one matrix product.

    Returns
    -------
    W : float64 tensor of shape (P, K)
    """
    means = params.means
    n_features = means.shape[1]
    dof = params.degrees_of_freedom
    prec_chol = params.precisions_cholesky
    quad, lin = cov.logit_terms(cov.precisions(prec_chol), means)
    mahal_const = (lin * means).sum(-1)  # m_k^T L_k m_k
    log_det = cov.log_det_cholesky(prec_chol)
    j = torch.arange(n_features, dtype=dof.dtype, device=dof.device)
    log_lambda = n_features * math.log(2.0) + torch.special.digamma(0.5 * (dof[:, None] - j)).sum(-1)
    const = (
        -0.5 * (n_features * _LOG_2PI + mahal_const)
        + log_det
        - 0.5 * n_features * torch.log(dof)
        + 0.5 * (log_lambda - n_features / params.mean_precision)
        + estimate_log_weights(*params.weight_concentration)
    )
    return torch.cat([quad, lin, const[:, None]], dim=1).T.contiguous()


# ---- M-step, one factor at a time (sklearn _m_step)


def gaussian_statistics(
    stats: torch.Tensor, cov: CovarianceType, eps: float, reg_covar: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N_k, xbar_k, N_k S_k)`` from the sufficient statistics (sklearn ``_estimate_gaussian_parameters``,
    which adds ``10 eps`` to ``N_k`` so an empty component divides by a tiny number, not zero).

    Parameters
    ----------
    stats : float64 tensor of shape (K, P)
        ``sum_n r_nk phi(x_n)``.
    cov : CovarianceType
    eps : float
        Machine epsilon of the working dtype.
    reg_covar : float
    """
    n_features = cov.n_features
    nk = stats[:, -1] + 10 * eps
    xk = stats[:, -1 - n_features : -1] / nk[:, None]
    return nk, xk, cov.scatter(stats, nk, xk, reg_covar)


def estimate_weights(nk: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sticks (Blei & Jordan 2006, eq. 18-19): ``a_k = 1 + N_k``, ``b_k = alpha + sum_{j>k} N_j``."""
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(nk, [0]), 0), [0])[1:], nk.new_zeros(1)])
    return 1.0 + nk, alpha + tail


def estimate_means(nk: torch.Tensor, xk: torch.Tensor, priors: Priors) -> tuple[torch.Tensor, torch.Tensor]:
    """Means (Bishop 2006, eq. 10.60-10.61): ``beta_k = beta_0 + N_k``,
    ``m_k = (beta_0 m_0 + N_k xbar_k) / beta_k``.

    Returns
    -------
    mean_precision : tensor of shape (K,)
    means : tensor of shape (K, D)
    """
    beta0 = priors.mean_precision
    mean_precision = beta0 + nk
    means = (beta0 * priors.mean + nk[:, None] * xk) / mean_precision[:, None]
    return mean_precision, means


def estimate_precisions(
    cov: CovarianceType,
    nk: torch.Tensor,
    xk: torch.Tensor,
    nk_sk: torch.Tensor,
    mean_precision: torch.Tensor,
    priors: Priors,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wishart (Bishop 2006, eq. 10.62-10.63): ``nu_k = nu_0 + N_k``,
    ``W_k^{-1} = W_0^{-1} + N_k S_k + beta_0 N_k / beta_k (xbar_k - m_0)(xbar_k - m_0)^T``,
    normalised by ``nu_k`` (as sklearn does), and the precision Cholesky factors.

    Returns
    -------
    degrees_of_freedom : tensor of shape (K,)
    covariances : tensor of shape (K, D, D) or (K, D)
    precisions_cholesky : tensor, same shape as ``covariances``
    """
    dof = priors.degrees_of_freedom + nk
    shrink = nk * priors.mean_precision / mean_precision
    covariances = cov.wishart_covariances(priors.covariance, nk_sk, shrink, xk - priors.mean, dof)
    return dof, covariances, cov.precisions_cholesky(covariances)


def estimate_concentration(a: torch.Tensor, b: torch.Tensor, priors: Priors) -> tuple[float, float]:
    """``q(alpha) = Gamma(s1 + K, s2 - sum_k E[log(1 - V_k)])`` (Blei & Jordan 2006, sec. 3); all K sticks
    are random in this truncation, as in scikit-learn, hence K rather than K - 1."""
    w1 = priors.concentration_shape + a.shape[0]
    w2 = priors.concentration_rate - float(expected_log_stick_complement(a, b).sum())
    return w1, w2


# ---- lower bound


def lower_bound(params: VariationalParams, cov: CovarianceType, entropy: float) -> torch.Tensor:
    """sklearn ``BayesianGaussianMixture._compute_lower_bound`` (constants dropped, data terms cancelled
    by the M-step), without the alpha terms (see :func:`add_concentration_terms`).

    Parameters
    ----------
    params : VariationalParams
        The parameters just estimated from the responsibilities behind ``entropy``.
    cov : CovarianceType
    entropy : float
        ``sum_nk r_nk log r_nk``.

    Returns
    -------
    bound : float64 scalar tensor
    """
    n_features = cov.n_features
    dof = params.degrees_of_freedom
    log_det = cov.log_det_cholesky(params.precisions_cholesky) - 0.5 * n_features * torch.log(dof)
    j = torch.arange(n_features, dtype=dof.dtype, device=dof.device)
    log_wishart = -(
        dof * log_det + dof * n_features * 0.5 * math.log(2.0) + torch.lgamma(0.5 * (dof[:, None] - j)).sum(-1)
    ).sum()
    a, b = params.weight_concentration
    betaln = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    log_norm_weight = -betaln.sum()
    return -entropy - log_wishart - log_norm_weight - 0.5 * n_features * torch.log(params.mean_precision).sum()


def add_concentration_terms(bound: torch.Tensor, params: VariationalParams, priors: Priors) -> torch.Tensor:
    """The lower bound's alpha terms when the Gamma hyper-prior is on (Blei & Jordan 2006, sec. 3).

    ``E_q[log p(V | alpha)] - E_q[log q(V)] + E_q[log p(z | V)] = sum_k E[log alpha] + betaln(a_k, b_k)
    + (E[alpha] - alpha_used) E[log(1 - V_k)]``, since ``b_k`` was built with ``alpha_used``; then the Gamma
    prior and the entropy of ``q(alpha)``. Added to ``bound`` term by term, in the order of the reference
    implementation, so the sum rounds the same way.
    """
    w1, w2 = params.alpha_posterior
    s1, s2 = priors.concentration_shape, priors.concentration_rate
    n_components = params.means.shape[0]
    digamma_w1 = float(torch.special.digamma(torch.tensor(w1, dtype=torch.float64)))
    e_log_alpha = digamma_w1 - math.log(w2)
    e_alpha = w1 / w2
    e_log_1mv = expected_log_stick_complement(*params.weight_concentration).sum()
    bound = bound + n_components * e_log_alpha + (e_alpha - params.alpha_used) * e_log_1mv
    bound = bound + s1 * math.log(s2) - math.lgamma(s1) + (s1 - 1.0) * e_log_alpha - s2 * e_alpha
    return bound + w1 - math.log(w2) + math.lgamma(w1) + (1.0 - w1) * digamma_w1
