"""Base class of the chunked mixtures: the fit loop and the prediction pass, along scikit-learn's
``sklearn.mixture._base.BaseMixture`` lines.

The base owns what does not depend on the model: input validation, device and dtype, the ``n_init`` /
``max_iter`` loop with its convergence test and warning, the final E-step that defines the used
components, and chunked prediction. A subclass supplies the model through hooks named as scikit-learn's:
``_check_parameters``, ``_initialize``, ``_m_step``, ``_compute_lower_bound``, ``_estimate_logit_weights``
and ``_set_parameters`` / ``_get_parameters``. Unlike scikit-learn's, the hooks return the parameters
instead of storing them on the estimator, so the loop can keep the best restart without copying state.
"""

from __future__ import annotations

import warnings
from abc import ABCMeta, abstractmethod
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from scenecluster.devices import resolve_torch_device
from scenecluster.mixture._covariance import COVARIANCE_TYPES, CovarianceType
from scenecluster.mixture._features import ChunkedFeatures, centred_feature_chunks, default_chunk_size
from scenecluster.mixture._kmeans import initial_statistics

__all__ = ["ChunkedMixture"]


class ChunkedMixture(ClusterMixin, BaseEstimator, metaclass=ABCMeta):
    """Fit loop and prediction of a mixture whose data passes are chunked matrix products over ``phi(X)``.

    Not usable on its own: see :class:`scenecluster.mixture.DPGMM`, which also documents the parameters
    this class reads (``n_components``, ``covariance_type``, ``tol``, ``max_iter``, ``n_init``,
    ``init_params``, ``random_state``, ``device``, ``dtype``, ``chunk_size``, ``verbose``).
    """

    # Attributes that live only during a fit (device tensors, the data): dropped at its end so the fitted
    # estimator holds CPU numpy only, pickles, and a GPU-fitted model loads on a machine without CUDA.
    _fit_state_attributes: tuple[str, ...] = ("_data", "_covariance")

    # ------------------------------------------------------------------------------------------------------
    # public API

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> ChunkedMixture:
        """Fit the variational posterior to X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self : the fitted estimator
        """
        self._fit(X, initial_resp=None)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def _fit_from_resp(self, X: Any, resp: Any) -> ChunkedMixture:
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
        for ``BayesianGaussianMixture`` (all components, used or not), less the components dropped after the fit
        (``dropped_components_``): their scenes were given to other clusters, so their density is no longer the
        model's.

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
        """The fit device, and the working dtype: float32 on GPU, float64 on CPU unless ``dtype`` is set."""
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
        """scikit-learn's checks, then finiteness (NaN or inf would silently poison every statistic)."""
        X = validate_data(
            self,
            X,
            reset=reset,
            dtype=[np.float64, np.float32],
            ensure_min_samples=2 if reset else 1,
            ensure_all_finite=False,
        )
        if not np.isfinite(X).all():
            raise ValueError(f"Input X contains NaN or inf values; {type(self).__name__} needs finite data.")
        return X

    def _setup(self, X: np.ndarray) -> None:
        """Move the (centred) data to the device and fix the layout; everything an iteration needs."""
        device, dtype = self._resolve_device_dtype()
        self._covariance = COVARIANCE_TYPES[self.covariance_type](X.shape[1], device)
        chunk = default_chunk_size(self.chunk_size, self._covariance.n_stats, self.n_components)
        self._data = ChunkedFeatures(X, self._covariance, chunk, device, dtype)

    def _fit(self, X: Any, initial_resp: np.ndarray | None) -> None:
        """The scikit-learn ``BaseMixture.fit_predict`` loop: ``n_init`` restarts, each alternating the fused
        E/M pass and the lower bound until it changes by less than ``tol``; keep the best restart."""
        X = self._validate_X(X, reset=True)
        self._check_parameters(X)
        self._setup(X)
        random_state = check_random_state(self.random_state)
        max_lower_bound = -np.inf
        best = None
        self.converged_ = False
        for init in range(self.n_init):
            seed = int(random_state.randint(np.iinfo(np.int32).max))
            gen = torch.Generator(device=self._data.device).manual_seed(seed)
            params, n_iter, lower_bounds, converged = self._fit_single(init, gen, initial_resp)
            lower_bound = lower_bounds[-1] if lower_bounds else -np.inf
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
        self._set_parameters(params)
        self._final_e_step(params)
        for name in self._fit_state_attributes:
            delattr(self, name)

    def _fit_single(
        self, init: int, gen: torch.Generator, initial_resp: np.ndarray | None
    ) -> tuple[Any, int, list[float], bool]:
        """One restart: initialise, then E-step, M-step and lower bound until converged or ``max_iter``.

        Returns
        -------
        params, n_iter, lower_bounds (one per iteration), converged
        """
        params = self._initialize_parameters(gen, initial_resp)
        lower_bound = -np.inf
        lower_bounds: list[float] = []
        n_iter, converged = 0, False
        for n_iter in range(1, self.max_iter + 1):
            prev = lower_bound
            stats, entropy = self._e_step(params)
            params = self._m_step(stats, params)
            lower_bound = self._compute_lower_bound(params, entropy)
            lower_bounds.append(lower_bound)
            if self.verbose >= 2:
                print(f"  init {init} iter {n_iter}: lower bound {lower_bound:.6f} (change {lower_bound - prev:.3e})")
            if abs(lower_bound - prev) < self.tol:
                converged = True
                break
        if self.verbose:
            print(f"init {init}: lower bound {lower_bound:.6f}, {n_iter} iterations, converged={converged}")
        return params, n_iter, lower_bounds, converged

    def _initialize_parameters(self, gen: torch.Generator, initial_resp: np.ndarray | None) -> Any:
        """sklearn ``_initialize_parameters``: initial responsibilities (``init_params`` or given), then the
        subclass's ``_initialize`` from their statistics."""
        stats = initial_statistics(self._data, self.n_components, self.init_params, gen, initial_resp)
        return self._initialize(stats)

    def _e_step(self, params: Any) -> tuple[torch.Tensor, float]:
        """The fused pass: responsibilities under ``params`` and their sufficient statistics, plus the
        ``sum r log r`` term of the lower bound (see :meth:`ChunkedFeatures.e_step_statistics`)."""
        W = self._estimate_logit_weights(params, self._covariance).to(self._data.dtype)
        return self._data.e_step_statistics(W)

    def _final_e_step(self, params: Any) -> None:
        """Labels of the training data under the kept parameters, so that ``fit_predict(X) ==
        fit(X).predict(X)`` for any ``max_iter``/``tol``; they also define the used components (those
        winning at least one training point)."""
        W = self._estimate_logit_weights(params, self._covariance).to(self._data.dtype)
        labels = self._data.labels(W)
        counts = torch.bincount(labels, minlength=self.n_components)
        self.labels_ = labels.cpu().numpy()
        self.used_components_ = (counts > 0).cpu().numpy()
        self.dropped_components_ = np.zeros(self.n_components, dtype=bool)
        self.n_clusters_ = int(self.used_components_.sum())
        self.device_ = str(self._data.device)

    def _predict_chunked(self, X: Any, what: str) -> np.ndarray:
        """Labels, responsibilities or log normalisers of new data, chunk by chunk on the fit's device
        setting, holding only one chunk's (chunk, K) logits on the device at a time.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        what : {"labels", "proba", "score"}
            Argmax over used components, softmax over used components (unused columns 0), or logsumexp
            over all components but the dropped ones (sklearn's ``score_samples`` when none was dropped).

        Returns
        -------
        out : ndarray of shape (n_samples,) or (n_samples, n_components)
        """
        check_is_fitted(self, "means_")
        X = self._validate_X(X, reset=False)
        device, dtype = self._resolve_device_dtype()
        # Any centre works (the features are translation-equivariant); the means' average keeps raw moments
        # small, as the data mean does during fit.
        centre = self.means_.mean(0)
        cov = COVARIANCE_TYPES[self.covariance_type](X.shape[1], device)
        W = self._estimate_logit_weights(self._get_parameters(centre, device), cov).to(dtype)
        unused = ~torch.as_tensor(self.used_components_, device=device)
        dropped = torch.as_tensor(self.dropped_components_, device=device)
        chunk = default_chunk_size(self.chunk_size, cov.n_stats, self.n_components)
        out = []
        for phi in centred_feature_chunks(X, centre, cov, chunk, device, dtype):
            logits = phi @ W
            if what == "score":
                logits[:, dropped] = -torch.inf
                out.append(torch.logsumexp(logits, dim=1).cpu())
                continue
            logits[:, unused] = -torch.inf
            out.append(logits.argmax(1).cpu() if what == "labels" else torch.softmax(logits, dim=1).cpu())
        res = torch.cat(out)
        return res.numpy() if what == "labels" else res.double().numpy()

    # ------------------------------------------------------------------------------------------------------
    # hooks

    @abstractmethod
    def _check_parameters(self, X: np.ndarray) -> None:
        """Resolve the data-dependent parameters (priors) before the data move to the device."""

    @abstractmethod
    def _initialize(self, stats: torch.Tensor) -> Any:
        """Parameters from the initial responsibilities' statistics (sklearn ``_initialize``)."""

    @abstractmethod
    def _m_step(self, stats: torch.Tensor, params: Any) -> Any:
        """New parameters from the E-step's statistics and the current parameters."""

    @abstractmethod
    def _compute_lower_bound(self, params: Any, entropy: float) -> float:
        """The objective after an M-step; the loop stops when it changes by less than ``tol``."""

    @abstractmethod
    def _estimate_logit_weights(self, params: Any, cov: CovarianceType) -> torch.Tensor:
        """``W`` (P, K) in float64 such that ``phi(x) @ W`` are the weighted log-probabilities."""

    @abstractmethod
    def _set_parameters(self, params: Any) -> None:
        """Store the kept parameters as fitted numpy attributes, in the original coordinates."""

    @abstractmethod
    def _get_parameters(self, centre: np.ndarray, device: torch.device) -> Any:
        """Rebuild the parameters from the fitted attributes on ``device``, centred on ``centre``."""
