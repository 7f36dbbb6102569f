"""The variational Dirichlet-process Gaussian mixture estimator: parameters, priors and the model hooks.

The fit loop and prediction are :class:`~scenecluster.mixture._base.ChunkedMixture`'s; the formulas are in
:mod:`scenecluster.mixture._maths`. What is left here is what makes the model a DP-GMM: its parameters, the
priors, and the hooks that wire the formulas together.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions

from scenecluster.mixture._base import ChunkedMixture
from scenecluster.mixture._covariance import COVARIANCE_TYPES, CovarianceType
from scenecluster.mixture._maths import (
    VariationalParams,
    add_concentration_terms,
    estimate_concentration,
    estimate_means,
    estimate_precisions,
    estimate_weights,
    expected_weights,
    gaussian_statistics,
    logit_weights,
    lower_bound,
)
from scenecluster.mixture._priors import resolve_priors

__all__ = ["DPGMM"]


class DPGMM(ChunkedMixture):
    """Variational Dirichlet-process Gaussian mixture, fitted with PyTorch on CPU or GPU.

    Same model, updates and lower bound as scikit-learn's ``BayesianGaussianMixture`` with
    ``weight_concentration_prior_type="dirichlet_process"``, but the data pass is chunked and batched over
    all components (see the module docstring), so it scales to tens of millions of rows and runs on a GPU.
    Component labels are component indices in ``0 .. n_components - 1`` (so ``means_[label]`` is the
    cluster's mean); only *used* components (see ``used_components_``) are ever returned.

    Parameters
    ----------
    n_components : int, default=50
        Truncation level K of the stick-breaking prior: an upper bound on the number of clusters.
    covariance_type : {"full", "diag"}, default="full"
    tol : float, default=1e-3
        Convergence threshold on the change of the lower bound between iterations.
    reg_covar : float, default=1e-6
        Added to the diagonal of each empirical covariance (jitter), as in scikit-learn.
    max_iter : int, default=100
        Iterations per initialisation. ``0`` keeps the initial parameters.
    n_init : int, default=1
        Number of initialisations; the one with the best lower bound is kept.
    init_params : {"kmeans", "kmeans++", "random"}, default="kmeans"
        Initial responsibilities: hard labels of a torch k-means (k-means++ seeding then up to 10 Lloyd
        iterations), of the k-means++ seeding alone, or random rows normalised to sum to one. All run on the
        fit device.
    weight_concentration_prior : float or None, default=None
        Concentration alpha of the DP. None means ``1 / n_components`` (scikit-learn's default): a small
        alpha favours few clusters. Ignored when the Gamma hyper-prior below is on.
    concentration_prior_shape, concentration_prior_rate : float or None, default=None
        Shape and rate of a Gamma hyper-prior on alpha. Both None (default) keeps alpha fixed; both set
        makes alpha a variational factor ``q(alpha) = Gamma(w1, w2)`` updated every iteration (Blei &
        Jordan 2006, sec. 3) with ``w1 = s1 + K`` and ``w2 = s2 - sum_k E[log(1 - V_k)]`` (all K sticks are
        random in this truncation, as in scikit-learn, hence K rather than K - 1), and the sticks use
        ``E[alpha] = w1 / w2``. The lower bound then gains the alpha terms.
    mean_precision_prior : float or None, default=None
        beta_0 of the Normal prior on the means; None means 1.
    mean_prior : array-like of shape (n_features,) or None, default=None
        m_0; None means the data mean.
    degrees_of_freedom_prior : float or None, default=None
        nu_0 of the Wishart prior, > n_features - 1; None means n_features.
    covariance_prior : array-like or None, default=None
        Wishart scale prior, (D, D) for "full" or (D,) for "diag"; None means the empirical covariance
        ``np.cov(X.T)`` (resp. variances with ddof=1), as in scikit-learn.
    random_state : int, RandomState instance or None, default=None
        Seeds a ``torch.Generator`` on the fit device, one seed per initialisation.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Resolved with :func:`scenecluster.devices.resolve_torch_device`.
    dtype : {"float32", "float64"}, torch.dtype or None, default=None
        Working dtype of the chunk products. None means float64 on CPU and float32 on GPU. Parameter
        updates are float64 regardless.
    chunk_size : int or None, default=None
        Rows per chunk. None picks ``max(1024, 2**20 // max(P, K))`` rows (8 MiB per float64 chunk buffer):
        large enough for efficient matrix products, small enough to stay in cache and to bound memory.
    verbose : int, default=0
        1 prints per-initialisation summaries, 2 also the lower bound at every iteration.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
        Expected mixture weights ``E[pi_k]`` under the stick-breaking posterior.
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray of shape (n_components, n_features, n_features) or (n_components, n_features)
    precisions_ : ndarray, same shape as ``covariances_``
    precisions_cholesky_ : ndarray, same shape as ``covariances_``
    weight_concentration_ : tuple of two ndarrays of shape (n_components,)
        Beta parameters (a_k, b_k) of the sticks.
    mean_precision_ : ndarray of shape (n_components,)
    degrees_of_freedom_ : ndarray of shape (n_components,)
    weight_concentration_prior_ : float
        The alpha used (E[alpha] at the end when the hyper-prior is on).
    concentration_posterior_ : tuple of (float, float) or None
        Shape and rate of ``q(alpha)`` when the hyper-prior is on.
    mean_prior_, mean_precision_prior_, degrees_of_freedom_prior_, covariance_prior_
        The resolved priors.
    n_iter_ : int
    converged_ : bool
    lower_bound_ : float
        Best lower bound (of the kept initialisation).
    lower_bounds_ : list of float
        Lower bound after each iteration of the kept initialisation.
    used_components_ : ndarray of bool of shape (n_components,)
        A component is *used* when it is the most responsible component for at least one training point
        in the final E-step. ``predict`` and ``predict_proba`` consider used components only, so a
        component whose weight collapsed is never returned, and ``fit_predict(X) == fit(X).predict(X)``.
    dropped_components_ : ndarray of bool of shape (n_components,)
        Components a caller dropped after the fit (:func:`scenecluster.cluster.drop_small_clusters`: used, but
        too small to be a cluster), all False after ``fit``. They are unused too, and ``score_samples`` leaves
        them out.
    n_clusters_ : int
        Number of used components.
    labels_ : ndarray of shape (n_samples,)
        Component index of each training point (argmax of the final E-step).
    n_features_in_ : int
    device_ : str
        The device the model was fitted on.

    Notes
    -----
    *Used components.* The truncation keeps all K components in the posterior, most with a weight that
    collapsed to the stick-breaking prior's leftovers. A component counts as used iff it is the argmax of
    the responsibilities of at least one training point in the final E-step (run after the best restart
    is selected). That makes ``fit_predict(X) == fit(X).predict(X)`` hold exactly while ``predict`` can
    never return a component that no training point chose; ``n_clusters_`` counts them.

    *Threads.* On a CPU shared with other busy processes, torch's spinning OpenMP workers can make a
    multi-threaded fit several times slower than a single-threaded one; set ``OMP_WAIT_POLICY=PASSIVE``
    before torch is imported, or lower ``torch.set_num_threads``. This class never changes them itself.

    References
    ----------
    Blei, D. M. & Jordan, M. I. (2006). Variational inference for Dirichlet process mixtures. Bayesian
    Analysis 1(1), 121-143. Bishop, C. M. (2006). Pattern Recognition and Machine Learning, sec. 10.2.
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "covariance_type": [StrOptions({"full", "diag"})],
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "init_params": [StrOptions({"kmeans", "kmeans++", "random"})],
        "weight_concentration_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "concentration_prior_shape": [None, Interval(Real, 0.0, None, closed="neither")],
        "concentration_prior_rate": [None, Interval(Real, 0.0, None, closed="neither")],
        "mean_precision_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "mean_prior": [None, "array-like"],
        "degrees_of_freedom_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "covariance_prior": [None, "array-like"],
        "random_state": ["random_state"],
        "device": [str, torch.device],
        "dtype": [None, StrOptions({"float32", "float64"}), torch.dtype],
        "chunk_size": [None, Interval(Integral, 1, None, closed="left")],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_components: int = 50,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weight_concentration_prior: float | None = None,
        concentration_prior_shape: float | None = None,
        concentration_prior_rate: float | None = None,
        mean_precision_prior: float | None = None,
        mean_prior: Any = None,
        degrees_of_freedom_prior: float | None = None,
        covariance_prior: Any = None,
        random_state: Any = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        chunk_size: int | None = None,
        verbose: int = 0,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weight_concentration_prior = weight_concentration_prior
        self.concentration_prior_shape = concentration_prior_shape
        self.concentration_prior_rate = concentration_prior_rate
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.verbose = verbose

    _fit_state_attributes = (*ChunkedMixture._fit_state_attributes, "_priors")

    # ------------------------------------------------------------------------------------------------------
    # hooks of the fit loop

    def _check_parameters(self, X: np.ndarray) -> None:
        """Resolve the priors like sklearn's ``BayesianGaussianMixture._check_parameters`` and expose them
        as the ``*_prior_`` attributes."""
        self._priors = resolve_priors(X, COVARIANCE_TYPES[self.covariance_type], self.get_params(deep=False))
        self.weight_concentration_prior_ = self._priors.weight_concentration
        self.mean_precision_prior_ = self._priors.mean_precision
        self.mean_prior_ = self._priors.mean
        self.degrees_of_freedom_prior_ = self._priors.degrees_of_freedom
        self.covariance_prior_ = self._priors.covariance

    def _setup(self, X: np.ndarray) -> None:
        """The base's setup, then the priors moved to the device and into the data's centred coordinates."""
        super()._setup(X)
        self._priors = self._priors.centred(self._data.shift, self._data.device)

    def _initialize(self, stats: torch.Tensor) -> VariationalParams:
        """sklearn ``_initialize``: an M-step from the initial responsibilities' statistics. With the
        hyper-prior, the first sticks use the prior mean of alpha."""
        return self._m_step(stats, None)

    def _m_step(self, stats: torch.Tensor, params: VariationalParams | None) -> VariationalParams:
        """Variational M-step from the sufficient statistics (sklearn ``_m_step``: ``_estimate_weights``,
        ``_estimate_means``, ``_estimate_precisions``), then the q(alpha) update when the hyper-prior is on.

        Parameters
        ----------
        stats : float64 tensor of shape (K, P)
            ``sum_n r_nk phi(x_n)`` from the E-step.
        params : VariationalParams or None
            The current parameters: the sticks use their ``E[alpha]`` (the fixed alpha without the
            hyper-prior); None at initialisation, where they use the prior's.

        Returns
        -------
        params : VariationalParams
            The new parameters, ``q(alpha)`` included.
        """
        priors, cov = self._priors, self._covariance
        if params is None:
            alpha = priors.initial_alpha()
        elif params.alpha_posterior is not None:
            alpha = params.alpha_posterior[0] / params.alpha_posterior[1]
        else:
            alpha = priors.weight_concentration
        nk, xk, nk_sk = gaussian_statistics(stats, cov, self._data.eps, self.reg_covar)
        a, b = estimate_weights(nk, alpha)
        mean_precision, means = estimate_means(nk, xk, priors)
        dof, covariances, prec_chol = estimate_precisions(cov, nk, xk, nk_sk, mean_precision, priors)
        alpha_posterior = estimate_concentration(a, b, priors) if priors.hyper else None
        return VariationalParams(
            (a, b), mean_precision, means, dof, covariances, prec_chol, float(alpha), alpha_posterior
        )

    def _compute_lower_bound(self, params: VariationalParams, entropy: float) -> float:
        """sklearn ``BayesianGaussianMixture._compute_lower_bound`` (constants dropped, data terms cancelled
        by the M-step), plus the alpha terms when the hyper-prior is on."""
        bound = lower_bound(params, self._covariance, entropy)
        if params.alpha_posterior is not None:
            bound = add_concentration_terms(bound, params, self._priors)
        return float(bound)

    def _estimate_logit_weights(self, params: VariationalParams, cov: CovarianceType) -> torch.Tensor:
        """sklearn ``_estimate_weighted_log_prob`` as a (P, K) weight matrix on ``phi(x)``."""
        return logit_weights(params, cov)

    # ------------------------------------------------------------------------------------------------------
    # fitted state

    def _set_parameters(self, params: VariationalParams) -> None:
        """Copy the kept parameters to CPU numpy (so the estimator pickles) in the original coordinates."""
        a, b = params.weight_concentration
        self.weight_concentration_ = (_numpy(a), _numpy(b))
        self.mean_precision_ = _numpy(params.mean_precision)
        self.means_ = _numpy(params.means) + self._data.shift
        self.degrees_of_freedom_ = _numpy(params.degrees_of_freedom)
        self.covariances_ = _numpy(params.covariances)
        self.precisions_cholesky_ = _numpy(params.precisions_cholesky)
        self.precisions_ = self._covariance.precisions(self.precisions_cholesky_)
        self.weights_ = expected_weights(*self.weight_concentration_)
        self.concentration_posterior_ = params.alpha_posterior
        if params.alpha_posterior is not None:
            self.weight_concentration_prior_ = params.alpha_posterior[0] / params.alpha_posterior[1]

    def _get_parameters(self, centre: np.ndarray, device: torch.device) -> VariationalParams:
        """The fitted parameters as float64 tensors on ``device``, means centred on ``centre`` (for
        prediction; ``q(alpha)`` is not needed there)."""

        def tensor(v: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(v, device=device, dtype=torch.float64)

        a, b = self.weight_concentration_
        return VariationalParams(
            (tensor(a), tensor(b)),
            tensor(self.mean_precision_),
            tensor(self.means_ - centre),
            tensor(self.degrees_of_freedom_),
            tensor(self.covariances_),
            tensor(self.precisions_cholesky_),
            0.0,
            None,
        )


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy on the CPU."""
    return t.detach().cpu().numpy().astype(np.float64)
