"""Variational Dirichlet-process Gaussian mixture (DP-GMM) in PyTorch, for CPU and GPU with one code path.

The maths is exactly scikit-learn's ``BayesianGaussianMixture(weight_concentration_prior_type=
"dirichlet_process")`` (coordinate-ascent variational inference with a truncated stick-breaking prior and a
Normal-Wishart prior on each component; Blei & Jordan 2006, "Variational inference for Dirichlet process
mixtures", Bayesian Analysis 1(1); Bishop 2006, PRML sec. 10.2), including its lower bound, so results can
be checked against it iteration by iteration. What differs is how the work is laid out:

* Data are processed in chunks of ``chunk_size`` rows, so memory is bounded whatever N is. The E-step and the
  M-step of one iteration are fused into a single pass over the chunks.
* The Gaussian log-densities of all K components are one matrix product. With the "feature map"
  ``phi(x) = [x_i x_j (i <= j), x, 1]`` (or ``[x**2, x, 1]`` for diagonal covariances),
  ``-0.5 (x - mu_k)^T Lambda_k (x - mu_k) + c_k`` is linear in ``phi(x)``, so
  ``log rho = phi(X_chunk) @ W`` with a small ``(P, K)`` weight matrix (``P = D(D+1)/2 + D + 1``). The
  M-step sufficient statistics ``(N_k, sum_n r_nk x_n, sum_n r_nk x_n x_n^T)`` are the same product the
  other way round, ``R_chunk^T @ phi(X_chunk)``. No ``N x K x D x D`` (or even ``N x K x D``) tensor is
  ever built and no triangular solve with N right-hand sides is done: the only triangular solves are the
  K small ``D x D`` Cholesky inversions per iteration.
* Raw moments lose precision when a cluster is far from the origin relative to its spread, so the data
  are centred on their mean once (the model is equivariant under translation, priors are shifted along),
  the per-chunk sums are accumulated in float64 and every small ``K``-sized parameter update (Cholesky,
  digamma, Wishart normalisers) is done in float64 whatever the working dtype. Only the two big matrix
  products per chunk run in the working dtype (float32 by default on GPU). In float32, clusters whose
  spread is below ~1e-3 of their distance to the data mean lose accuracy; pass ``dtype="float64"`` then.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from scenecluster.devices import resolve_torch_device

__all__ = ["DPGMM"]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class _Params:
    """Variational posterior parameters, float64 torch tensors on the fit device, in centred coordinates.

    Names follow scikit-learn's ``BayesianGaussianMixture`` attributes.
    """

    weight_concentration: tuple[torch.Tensor, torch.Tensor]  # Beta(a_k, b_k) of the sticks, (K,) each
    mean_precision: torch.Tensor  # beta_k, (K,)
    means: torch.Tensor  # m_k, (K, D)
    degrees_of_freedom: torch.Tensor  # nu_k, (K,)
    covariances: torch.Tensor  # W_k^{-1} / nu_k, (K, D, D) or (K, D)
    precisions_cholesky: torch.Tensor  # (K, D, D) or (K, D)
    alpha_used: float  # the concentration (or E[alpha]) that b_k was computed with
    alpha_posterior: tuple[float, float] | None  # Gamma(shape, rate) of q(alpha) when the hyper-prior is on


def _feature_layout(n_features: int, covariance_type: str) -> tuple[torch.Tensor | None, int]:
    """Upper-triangle index pairs for the quadratic features and the total feature count ``P``."""
    if covariance_type == "full":
        iu = torch.triu_indices(n_features, n_features)
        return iu, iu.shape[1] + n_features + 1
    return None, 2 * n_features + 1


def _features(x: torch.Tensor, iu: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Feature map ``phi(x)`` of a chunk.

    Parameters
    ----------
    x : tensor of shape (n, D)
    iu : tensor of shape (2, D(D+1)/2) or None
        Upper-triangle index pairs (full covariances) or None (diagonal: squares only).
    out : tensor of shape (>= n, P) or None
        Buffer to fill (its first n rows), so the per-chunk recomputation allocates nothing.

    Returns
    -------
    phi : tensor of shape (n, P)
        ``[x_i x_j for i <= j, x, 1]`` or ``[x**2, x, 1]``, row-major in that order.
    """
    n, d = x.shape
    n_quad = iu.shape[1] if iu is not None else d
    phi = torch.empty((n, n_quad + d + 1), dtype=x.dtype, device=x.device) if out is None else out[:n]
    if iu is None:
        torch.mul(x, x, out=phi[:, :d])
    else:
        # Row i of the upper triangle, x_i * x_{i..D-1}, one broadcast product each (iu is row-major), which
        # avoids the gathered (n, D(D+1)/2) temporaries of x[:, iu[0]] * x[:, iu[1]].
        off = 0
        for i in range(d):
            torch.mul(x[:, i : i + 1], x[:, i:], out=phi[:, off : off + d - i])
            off += d - i
    phi[:, n_quad : n_quad + d] = x
    phi[:, -1] = 1.0
    return phi


def _estimate_log_weights(params: _Params) -> torch.Tensor:
    """E[log pi_k] under the stick-breaking posterior (Blei & Jordan 2006, eq. 22; sklearn
    ``_estimate_log_weights``): ``E[log V_k] + sum_{j<k} E[log(1 - V_j)]``."""
    a, b = params.weight_concentration
    digamma_sum = torch.special.digamma(a + b)
    digamma_a = torch.special.digamma(a)
    digamma_b = torch.special.digamma(b)
    tail = torch.cumsum(digamma_b - digamma_sum, 0)
    return digamma_a - digamma_sum + torch.cat([tail.new_zeros(1), tail[:-1]])


def _log_det_cholesky(precisions_cholesky: torch.Tensor, covariance_type: str) -> torch.Tensor:
    """``log det`` of each precision Cholesky factor, from its diagonal, shape (K,)."""
    if covariance_type == "full":
        return torch.log(torch.diagonal(precisions_cholesky, dim1=-2, dim2=-1)).sum(-1)
    return torch.log(precisions_cholesky).sum(-1)


def _logit_weights(params: _Params, covariance_type: str, iu: torch.Tensor | None) -> torch.Tensor:
    """Weight matrix ``W`` such that ``phi(x) @ W`` is sklearn's ``_estimate_weighted_log_prob``.

    The expected log-likelihood of x under component k (Bishop 2006, eq. 10.64-10.66; sklearn
    ``_estimate_log_prob``) is ``-0.5 D log(2 pi) - 0.5 (x - m_k)^T L_k (x - m_k) + log det U_k
    - 0.5 D log nu_k + 0.5 (E[log |Lambda_k|]-part - D / beta_k)`` with ``L_k = U_k U_k^T`` built from the
    normalised covariances and ``U_k`` the precision Cholesky factor. Expanding the quadratic form makes it
    linear in ``phi(x)``.

    Returns
    -------
    W : float64 tensor of shape (P, K)
    """
    means = params.means
    n_components, n_features = means.shape
    dof = params.degrees_of_freedom
    prec_chol = params.precisions_cholesky
    if covariance_type == "full":
        precisions = prec_chol @ prec_chol.transpose(-1, -2)  # (K, D, D)
        off_diag = (iu[0] != iu[1]).to(precisions.dtype)
        quad = -0.5 * precisions[:, iu[0], iu[1]] * (1.0 + off_diag)  # (K, D(D+1)/2)
        lin = torch.einsum("kij,kj->ki", precisions, means)  # L_k m_k
    else:
        precisions = prec_chol * prec_chol  # (K, D)
        quad = -0.5 * precisions
        lin = precisions * means
    mahal_const = (lin * means).sum(-1)  # m_k^T L_k m_k
    log_det = _log_det_cholesky(prec_chol, covariance_type)
    j = torch.arange(n_features, dtype=dof.dtype, device=dof.device)
    log_lambda = n_features * math.log(2.0) + torch.special.digamma(0.5 * (dof[:, None] - j)).sum(-1)
    const = (
        -0.5 * (n_features * _LOG_2PI + mahal_const)
        + log_det
        - 0.5 * n_features * torch.log(dof)
        + 0.5 * (log_lambda - n_features / params.mean_precision)
        + _estimate_log_weights(params)
    )
    return torch.cat([quad, lin, const[:, None]], dim=1).T.contiguous()


class DPGMM(ClusterMixin, BaseEstimator):
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

    # ------------------------------------------------------------------------------------------------------
    # public API

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> DPGMM:
        """Fit the variational posterior to X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self : DPGMM
        """
        self._fit(X, initial_resp=None)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def _fit_from_resp(self, X: Any, resp: Any) -> DPGMM:
        """Fit starting from given responsibilities instead of ``init_params`` (every restart uses them).

        For testing equivalence with sklearn, whose ``_initialize(X, resp)`` takes the same input.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        resp : array-like of shape (n_samples, n_components), rows summing to one
        """
        self._fit(X, initial_resp=np.asarray(resp, dtype=np.float64))
        return self

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit and return the labels of the final E-step, identical to ``fit(X).predict(X)``.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        return self.fit(X).labels_

    def predict(self, X: Any) -> np.ndarray:
        """Most responsible *used* component of each sample.

        Returns
        -------
        labels : ndarray of shape (n_samples,) of component indices
        """
        return self._predict_chunked(X, "labels")

    def predict_proba(self, X: Any) -> np.ndarray:
        """Responsibilities restricted to the used components (columns of unused ones are 0).

        Returns
        -------
        proba : ndarray of shape (n_samples, n_components), rows summing to one
        """
        return self._predict_chunked(X, "proba")

    def score_samples(self, X: Any) -> np.ndarray:
        """Per-sample ``logsumexp_k`` of the expected weighted log-likelihood, as scikit-learn defines it
        for ``BayesianGaussianMixture`` (all components, used or not).

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        return self._predict_chunked(X, "score")

    def score(self, X: Any, y: Any = None) -> float:
        """Mean of :meth:`score_samples`."""
        return float(self.score_samples(X).mean())

    # ------------------------------------------------------------------------------------------------------
    # fit machinery

    def _resolve_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        device = self.device if isinstance(self.device, torch.device) else resolve_torch_device(self.device)
        if self.dtype is None:
            dtype = torch.float32 if device.type == "cuda" else torch.float64
        elif isinstance(self.dtype, torch.dtype):
            if self.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"dtype must be float32 or float64, not {self.dtype}")
            dtype = self.dtype
        else:
            dtype = torch.float32 if self.dtype == "float32" else torch.float64
        return device, dtype

    def _validate_X(self, X: Any, *, reset: bool) -> np.ndarray:
        X = validate_data(
            self,
            X,
            reset=reset,
            dtype=[np.float64, np.float32],
            ensure_min_samples=2 if reset else 1,
            ensure_all_finite=False,
        )
        if not np.isfinite(X).all():
            raise ValueError("Input X contains NaN or inf values; DPGMM needs finite data.")
        return X

    def _check_priors(self, X: np.ndarray) -> None:
        """Resolve the priors exactly like sklearn's ``BayesianGaussianMixture._check_parameters``."""
        n_features = X.shape[1]
        self._hyper = (self.concentration_prior_shape is not None, self.concentration_prior_rate is not None)
        if self._hyper[0] != self._hyper[1]:
            raise ValueError(
                "concentration_prior_shape and concentration_prior_rate must both be set (Gamma hyper-prior "
                "on the DP concentration) or both be None."
            )
        if self.weight_concentration_prior is None:
            self.weight_concentration_prior_ = 1.0 / self.n_components
        else:
            self.weight_concentration_prior_ = float(self.weight_concentration_prior)
        self.mean_precision_prior_ = 1.0 if self.mean_precision_prior is None else self.mean_precision_prior
        if self.mean_prior is None:
            self.mean_prior_ = X.mean(axis=0, dtype=np.float64)
        else:
            self.mean_prior_ = np.asarray(self.mean_prior, dtype=np.float64).reshape(-1)
            if self.mean_prior_.shape != (n_features,):
                raise ValueError(f"mean_prior should have shape ({n_features},), got {self.mean_prior_.shape}")
        if self.degrees_of_freedom_prior is None:
            self.degrees_of_freedom_prior_ = float(n_features)
        elif self.degrees_of_freedom_prior > n_features - 1.0:
            self.degrees_of_freedom_prior_ = float(self.degrees_of_freedom_prior)
        else:
            raise ValueError(
                f"The parameter 'degrees_of_freedom_prior' should be greater than {n_features - 1}, "
                f"but got {self.degrees_of_freedom_prior:.3f}."
            )
        if self.covariance_prior is None:
            Xd = X.astype(np.float64, copy=False)
            if self.covariance_type == "full":
                self.covariance_prior_ = np.atleast_2d(np.cov(Xd.T))
            else:
                self.covariance_prior_ = np.var(Xd, axis=0, ddof=1)
        else:
            cp = np.asarray(self.covariance_prior, dtype=np.float64)
            if self.covariance_type == "full":
                if cp.shape != (n_features, n_features):
                    raise ValueError(f"covariance_prior should have shape ({n_features}, {n_features})")
                if not np.allclose(cp, cp.T) or np.linalg.eigvalsh(cp).min() <= 0:
                    raise ValueError("covariance_prior should be symmetric, positive-definite")
            elif cp.shape != (n_features,) or (cp <= 0).any():
                raise ValueError(f"covariance_prior should be positive with shape ({n_features},)")
            self.covariance_prior_ = cp

    def _setup(self, X: np.ndarray) -> None:
        """Move the (centred) data to the device and fix the layout; everything an iteration needs."""
        device, dtype = self._resolve_device_dtype()
        self._device, self._dtype = device, dtype
        n_samples, n_features = X.shape
        self._shift = X.mean(axis=0, dtype=np.float64)
        # A float64 copy (also makes read-only inputs, e.g. memmaps, safe for torch), centred, then cast.
        X64 = torch.from_numpy(np.array(X, dtype=np.float64, copy=True)).to(device)
        self._X = X64.sub_(torch.as_tensor(self._shift, device=device)).to(dtype)
        del X64
        self._iu, self._n_feat = _feature_layout(n_features, self.covariance_type)
        if self._iu is not None:
            self._iu = self._iu.to(device)
        self._chunk = self.chunk_size or max(1024, 2**20 // max(self._n_feat, self.n_components))
        f64 = {"device": device, "dtype": torch.float64}
        self._m0 = torch.as_tensor(self.mean_prior_ - self._shift, **f64)
        self._W0 = torch.as_tensor(self.covariance_prior_, **f64)
        self._eps = float(torch.finfo(dtype).eps)
        # The feature map is recomputed every iteration unless the whole (N, P) matrix fits the cache budget;
        # then it is built once per fit (it is about P / D times the size of X).
        self._phi = None
        if n_samples * self._n_feat * self._X.element_size() <= _PHI_CACHE_BYTES:
            self._phi = _features(self._X, self._iu)

    def _chunks(self) -> range:
        return range(0, self._X.shape[0], self._chunk)

    def _phi_chunks(self):
        """Yield ``(start, phi(X[start:start + chunk]))``, from the cache when it fits, else computed into one
        reused buffer (consume each chunk before asking for the next)."""
        if self._phi is not None:
            for s in self._chunks():
                yield s, self._phi[s : s + self._chunk]
            return
        buf = torch.empty((self._chunk, self._n_feat), dtype=self._dtype, device=self._device)
        for s in self._chunks():
            yield s, _features(self._X[s : s + self._chunk], self._iu, out=buf)

    def _fit(self, X: Any, initial_resp: np.ndarray | None) -> None:
        """The scikit-learn ``BaseMixture.fit_predict`` loop: ``n_init`` restarts, each alternating the fused
        E/M pass and the lower bound until it changes by less than ``tol``; keep the best restart."""
        X = self._validate_X(X, reset=True)
        self._check_priors(X)
        self._setup(X)
        random_state = check_random_state(self.random_state)
        max_lower_bound = -np.inf
        best = None
        self.converged_ = False
        for init in range(self.n_init):
            seed = int(random_state.randint(np.iinfo(np.int32).max))
            gen = torch.Generator(device=self._device).manual_seed(seed)
            params = self._initialize_from_stats(self._initial_stats(gen, initial_resp))
            lower_bound = -np.inf
            lower_bounds: list[float] = []
            n_iter, converged = 0, False
            for n_iter in range(1, self.max_iter + 1):
                prev = lower_bound
                stats, entropy = self._e_pass(params)
                params = self._m_step(stats)
                lower_bound = self._compute_lower_bound(params, stats, entropy)
                lower_bounds.append(lower_bound)
                if self.verbose >= 2:
                    print(
                        f"  init {init} iter {n_iter}: lower bound {lower_bound:.6f} (change {lower_bound - prev:.3e})"
                    )
                if abs(lower_bound - prev) < self.tol:
                    converged = True
                    break
            if self.verbose:
                print(f"init {init}: lower bound {lower_bound:.6f}, {n_iter} iterations, converged={converged}")
            if lower_bound > max_lower_bound or max_lower_bound == -np.inf:
                max_lower_bound = lower_bound
                best = (params, n_iter, lower_bounds, converged)
                self.converged_ = converged
        params, self.n_iter_, self.lower_bounds_, self.converged_ = best
        if not self.converged_ and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init parameters, or increase "
                "max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=4,
            )
        self.lower_bound_ = float(max_lower_bound)
        self._store(params)
        # Final E-step so that fit_predict(X) == fit(X).predict(X) for any max_iter/tol; it also defines the
        # used components (those winning at least one training point).
        W = _logit_weights(params, self.covariance_type, self._iu).to(self._dtype)
        labels = torch.cat([(phi @ W).argmax(1) for _, phi in self._phi_chunks()])
        counts = torch.bincount(labels, minlength=self.n_components)
        self.labels_ = labels.cpu().numpy()
        self.used_components_ = (counts > 0).cpu().numpy()
        self.n_clusters_ = int(self.used_components_.sum())
        self.device_ = str(self._device)
        # Drop the data and every device tensor: the fitted estimator holds CPU numpy only, so it pickles and
        # a GPU-fitted model loads on a machine without CUDA.
        del self._X, self._phi, self._iu, self._m0, self._W0, self._device, self._dtype

    # ---- initialisation

    def _initial_stats(self, gen: torch.Generator, initial_resp: np.ndarray | None) -> torch.Tensor:
        """Sufficient statistics ``R^T phi(X)`` of the initial responsibilities, accumulated chunk by chunk.

        Returns
        -------
        stats : float64 tensor of shape (K, P)
        """
        K = self.n_components
        centers = None
        if initial_resp is None and self.init_params in ("kmeans", "kmeans++"):
            centers = _kmeans(self._X, K, gen, self._chunk, n_lloyd=10 if self.init_params == "kmeans" else 0)
        if initial_resp is not None:
            initial_resp = np.asarray(initial_resp)
            if initial_resp.shape != (self._X.shape[0], K):
                raise ValueError(f"initial_resp should have shape {(self._X.shape[0], K)}")
        stats = torch.zeros((K, self._n_feat), dtype=torch.float64, device=self._device)
        for s, phi in self._phi_chunks():
            x = self._X[s : s + self._chunk]
            if initial_resp is not None:
                resp = torch.as_tensor(initial_resp[s : s + self._chunk], device=self._device).to(self._dtype)
            elif centers is not None:
                labels = _nearest(x, centers)
                resp = torch.nn.functional.one_hot(labels, K).to(self._dtype)
            else:
                resp = torch.rand((x.shape[0], K), generator=gen, device=self._device, dtype=self._dtype)
                resp /= resp.sum(1, keepdim=True)
            stats += (resp.T @ phi).to(torch.float64)
        return stats

    def _initialize_from_stats(self, stats: torch.Tensor) -> _Params:
        """sklearn ``_initialize``: an M-step from the initial responsibilities' statistics. With the
        hyper-prior, the first sticks use the prior mean of alpha."""
        alpha = self.weight_concentration_prior_
        if self._hyper[0]:
            alpha = self.concentration_prior_shape / self.concentration_prior_rate
        return self._m_step(stats, alpha=alpha)

    # ---- E-step (fused with the M-step statistics)

    def _e_pass(self, params: _Params) -> tuple[torch.Tensor, float]:
        """One pass over the data: responsibilities from the current parameters (log-domain, logsumexp) and
        their sufficient statistics.

        Returns
        -------
        stats : float64 tensor of shape (K, P)
            ``sum_n r_nk phi(x_n)``: N_k, sum r x, sum r x x^T (upper triangle or diagonal).
        entropy_term : float
            ``sum_nk r_nk log r_nk``.
        """
        W = _logit_weights(params, self.covariance_type, self._iu).to(self._dtype)
        stats = torch.zeros((self.n_components, self._n_feat), dtype=torch.float64, device=self._device)
        ent = torch.zeros((), dtype=torch.float64, device=self._device)
        # Preallocated (chunk, K) buffers and in-place ops: fresh multi-MiB allocations per chunk cost more
        # than the arithmetic on CPU (page faults), and the arithmetic is only a few passes over memory.
        logits = torch.empty((self._chunk, self.n_components), dtype=self._dtype, device=self._device)
        resp = torch.empty_like(logits)
        floor = math.log(torch.finfo(self._dtype).tiny) + 8.0
        for s, phi in self._phi_chunks():
            n = phi.shape[0]
            lg, r = logits[:n], resp[:n]
            torch.matmul(phi, W, out=lg)  # (n, K) weighted log-probabilities (sklearn _estimate_weighted_log_prob)
            # log-domain normalisation (logsumexp), sklearn _estimate_log_prob_resp
            lg.sub_(lg.amax(1, keepdim=True))
            # Floor at ~exp(-700) (float64) / exp(-79) (float32): exp of very negative or denormal-producing
            # inputs takes a slow path (10-70x on CPU), and these responsibilities are < 1e-300 resp. 1e-34
            # of the row's largest, far below the 10 * eps that sklearn adds to N_k anyway.
            lg.clamp_(min=floor)
            torch.exp(lg, out=r)
            norm = r.sum(1, keepdim=True)
            r.div_(norm)
            lg.sub_(norm.log_())  # lg is now log r
            ent += torch.dot(r.reshape(-1), lg.reshape(-1)).to(torch.float64)
            stats += (r.T @ phi).to(torch.float64)
            del s
        return stats, float(ent)

    # ---- M-step

    def _m_step(self, stats: torch.Tensor, alpha: float | None = None) -> _Params:
        """Variational M-step from the sufficient statistics (sklearn ``_m_step``: ``_estimate_weights``,
        ``_estimate_means``, ``_estimate_precisions``), then the q(alpha) update when the hyper-prior is on.

        ``alpha`` overrides the concentration used for the sticks (initialisation); by default it is the
        fixed prior or the current ``E[alpha]`` (``self._alpha_post``).
        """
        n_features = self._X.shape[1]
        sumr = stats[:, -1]
        nk = sumr + 10 * self._eps  # sklearn _estimate_gaussian_parameters
        sx = stats[:, -1 - n_features : -1]
        xk = sx / nk[:, None]
        if self.covariance_type == "full":
            iu = self._iu
            sxx = stats.new_zeros((self.n_components, n_features, n_features))
            sxx[:, iu[0], iu[1]] = stats[:, : iu.shape[1]]
            sxx[:, iu[1], iu[0]] = stats[:, : iu.shape[1]]
            # nk * S_k = sum_n r_nk (x_n - xbar_k)(x_n - xbar_k)^T + nk * reg_covar * I
            outer = sx[:, :, None] * xk[:, None, :]
            nk_sk = sxx - outer - outer.transpose(1, 2) + sumr[:, None, None] * xk[:, :, None] * xk[:, None, :]
            nk_sk = nk_sk + (nk * self.reg_covar)[:, None, None] * torch.eye(n_features, **_like(stats))
        else:
            nk_sk = stats[:, :n_features] - nk[:, None] * xk * xk + (nk * self.reg_covar)[:, None]

        # Sticks (Blei & Jordan 2006, eq. 18-19): a_k = 1 + N_k, b_k = alpha + sum_{j>k} N_j.
        if alpha is None:
            alpha = self._alpha_post[0] / self._alpha_post[1] if self._hyper[0] else self.weight_concentration_prior_
        tail = torch.cat([torch.flip(torch.cumsum(torch.flip(nk, [0]), 0), [0])[1:], nk.new_zeros(1)])
        a, b = 1.0 + nk, alpha + tail
        # Means (Bishop 2006, eq. 10.60-10.61): beta_k = beta_0 + N_k,
        # m_k = (beta_0 m_0 + N_k xbar_k) / beta_k.
        beta0 = self.mean_precision_prior_
        mean_precision = beta0 + nk
        means = (beta0 * self._m0 + nk[:, None] * xk) / mean_precision[:, None]
        # Wishart (Bishop 2006, eq. 10.62-10.63): nu_k = nu_0 + N_k,
        # W_k^{-1} = W_0^{-1} + N_k S_k + beta_0 N_k / beta_k (xbar_k - m_0)(xbar_k - m_0)^T,
        # normalised by nu_k (as sklearn does).
        dof = self.degrees_of_freedom_prior_ + nk
        diff = xk - self._m0
        shrink = nk * beta0 / mean_precision
        if self.covariance_type == "full":
            cov = self._W0 + nk_sk + shrink[:, None, None] * diff[:, :, None] * diff[:, None, :]
            cov = cov / dof[:, None, None]
            chol, info = torch.linalg.cholesky_ex(cov)
            if bool((info != 0).any()):
                raise ValueError(_ILL_DEFINED)
            eye = torch.eye(n_features, **_like(cov)).expand_as(cov)
            # K small D x D triangular inversions (D right-hand sides each), never N right-hand sides.
            prec_chol = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(1, 2)
        else:
            cov = (self._W0 + nk_sk + shrink[:, None] * diff * diff) / dof[:, None]
            if bool((cov <= 0).any()):
                raise ValueError(_ILL_DEFINED)
            prec_chol = 1.0 / torch.sqrt(cov)
        params = _Params((a, b), mean_precision, means, dof, cov, prec_chol, float(alpha), None)
        if self._hyper[0]:
            # q(alpha) = Gamma(s1 + K, s2 - sum_k E[log(1 - V_k)]) (Blei & Jordan 2006, sec. 3).
            e_log_1mv = torch.special.digamma(b) - torch.special.digamma(a + b)
            w1 = self.concentration_prior_shape + self.n_components
            w2 = self.concentration_prior_rate - float(e_log_1mv.sum())
            self._alpha_post = (w1, w2)
            params.alpha_posterior = (w1, w2)
        return params

    # ---- lower bound

    def _compute_lower_bound(self, params: _Params, stats: torch.Tensor, entropy: float) -> float:
        """sklearn ``BayesianGaussianMixture._compute_lower_bound`` (constants dropped, data terms cancelled
        by the M-step), plus the alpha terms when the hyper-prior is on."""
        n_features = self._X.shape[1]
        dof = params.degrees_of_freedom
        log_det = _log_det_cholesky(params.precisions_cholesky, self.covariance_type) - 0.5 * n_features * torch.log(
            dof
        )
        j = torch.arange(n_features, **_like(dof))
        log_wishart = -(
            dof * log_det + dof * n_features * 0.5 * math.log(2.0) + torch.lgamma(0.5 * (dof[:, None] - j)).sum(-1)
        ).sum()
        a, b = params.weight_concentration
        betaln = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
        log_norm_weight = -betaln.sum()
        bound = -entropy - log_wishart - log_norm_weight - 0.5 * n_features * torch.log(params.mean_precision).sum()
        if params.alpha_posterior is not None:
            # E_q[log p(V | alpha)] - E_q[log q(V)] + E_q[log p(z | V)]
            #   = sum_k E[log alpha] + betaln(a_k, b_k)
            # + (E[alpha] - alpha_used) E[log(1 - V_k)], since b_k was built with alpha_used; then the
            # Gamma prior and entropy of q(alpha).
            w1, w2 = params.alpha_posterior
            s1, s2 = self.concentration_prior_shape, self.concentration_prior_rate
            e_log_alpha = float(torch.special.digamma(torch.tensor(w1, dtype=torch.float64))) - math.log(w2)
            e_alpha = w1 / w2
            e_log_1mv = (torch.special.digamma(b) - torch.special.digamma(a + b)).sum()
            bound = bound + self.n_components * e_log_alpha + (e_alpha - params.alpha_used) * e_log_1mv
            bound = bound + s1 * math.log(s2) - math.lgamma(s1) + (s1 - 1.0) * e_log_alpha - s2 * e_alpha
            digamma_w1 = float(torch.special.digamma(torch.tensor(w1, dtype=torch.float64)))
            bound = bound + w1 - math.log(w2) + math.lgamma(w1) + (1.0 - w1) * digamma_w1
        return float(bound)

    # ---- fitted state

    def _store(self, params: _Params) -> None:
        """Copy the kept parameters to CPU numpy (so the estimator pickles) in the original coordinates."""

        def np_(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np.float64)

        a, b = params.weight_concentration
        self.weight_concentration_ = (np_(a), np_(b))
        self.mean_precision_ = np_(params.mean_precision)
        self.means_ = np_(params.means) + self._shift
        self.degrees_of_freedom_ = np_(params.degrees_of_freedom)
        self.covariances_ = np_(params.covariances)
        self.precisions_cholesky_ = np_(params.precisions_cholesky)
        if self.covariance_type == "full":
            self.precisions_ = self.precisions_cholesky_ @ self.precisions_cholesky_.transpose(0, 2, 1)
        else:
            self.precisions_ = self.precisions_cholesky_**2
        a_, b_ = self.weight_concentration_
        tmp = b_ / (a_ + b_)
        weights = a_ / (a_ + b_) * np.hstack((1.0, np.cumprod(tmp[:-1])))
        self.weights_ = weights / weights.sum()
        self.concentration_posterior_ = params.alpha_posterior
        if params.alpha_posterior is not None:
            self.weight_concentration_prior_ = params.alpha_posterior[0] / params.alpha_posterior[1]

    def _predict_chunked(self, X: Any, what: str) -> np.ndarray:
        """Labels, responsibilities or log normalisers of new data, chunk by chunk on the fit's device
        setting, holding only one chunk's (chunk, K) logits on the device at a time.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        what : {"labels", "proba", "score"}
            Argmax over used components, softmax over used components (unused columns 0), or logsumexp
            over all components (sklearn's ``score_samples``).

        Returns
        -------
        out : ndarray of shape (n_samples,) or (n_samples, n_components)
        """
        check_is_fitted(self, "means_")
        X = self._validate_X(X, reset=False)
        device, dtype = self._resolve_device_dtype()
        f64 = {"device": device, "dtype": torch.float64}
        # Any centre works (the features are translation-equivariant); the means' average keeps raw moments
        # small, as the data mean does during fit.
        centre = self.means_.mean(0)
        a, b = (torch.as_tensor(v, **f64) for v in self.weight_concentration_)
        params = _Params(
            (a, b),
            torch.as_tensor(self.mean_precision_, **f64),
            torch.as_tensor(self.means_ - centre, **f64),
            torch.as_tensor(self.degrees_of_freedom_, **f64),
            torch.as_tensor(self.covariances_, **f64),
            torch.as_tensor(self.precisions_cholesky_, **f64),
            0.0,
            None,
        )
        iu, n_feat = _feature_layout(X.shape[1], self.covariance_type)
        iu = iu.to(device) if iu is not None else None
        W = _logit_weights(params, self.covariance_type, iu).to(dtype)
        unused = ~torch.as_tensor(self.used_components_, device=device)
        centre_t = torch.as_tensor(centre, **f64)
        chunk = self.chunk_size or max(1024, 2**20 // max(n_feat, self.n_components))
        out = []
        for s in range(0, X.shape[0], chunk):
            x = torch.from_numpy(np.array(X[s : s + chunk], dtype=np.float64)).to(device).sub_(centre_t)
            logits = _features(x.to(dtype), iu) @ W
            if what == "score":
                out.append(torch.logsumexp(logits, dim=1).cpu())
                continue
            logits[:, unused] = -torch.inf
            out.append(logits.argmax(1).cpu() if what == "labels" else torch.softmax(logits, dim=1).cpu())
        res = torch.cat(out)
        return res.numpy() if what == "labels" else res.double().numpy()


# Largest feature matrix phi(X) kept in memory for a whole fit (bytes); larger inputs recompute it per chunk.
_PHI_CACHE_BYTES = 256 * 2**20

_ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined empirical covariance (for "
    "instance caused by singleton or collapsed samples). Try to decrease the number of components, increase "
    "reg_covar, or scale the input data."
)


def _like(t: torch.Tensor) -> dict:
    return {"dtype": t.dtype, "device": t.device}


def _nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest center of each row of a chunk, shape (n,)."""
    d2 = (centers * centers).sum(1)[None, :] - 2.0 * (x @ centers.T)
    return d2.argmin(1)


def _kmeans(X: torch.Tensor, k: int, gen: torch.Generator, chunk: int, n_lloyd: int) -> torch.Tensor:
    """Chunked k-means on the device: k-means++ seeding (Arthur & Vassilvitskii 2007) then ``n_lloyd``
    Lloyd iterations. Only used to initialise the responsibilities, so it need not be converged.

    Returns
    -------
    centers : tensor of shape (k, D)
    """
    n = X.shape[0]
    starts = range(0, n, chunk)
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
    C = torch.stack(centers)
    for _ in range(n_lloyd):
        sums = torch.zeros_like(C, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64, device=X.device)
        for s in starts:
            x = X[s : s + chunk]
            lab = _nearest(x, C)
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
