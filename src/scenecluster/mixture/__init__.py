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

Layout (along scikit-learn's ``sklearn/mixture/_base.py`` and ``_bayesian_mixture.py``):

* ``_dpgmm.py``: the estimator :class:`DPGMM` (parameters, priors, the model's hooks).
* ``_base.py``: :class:`~scenecluster.mixture._base.ChunkedMixture`, the ``n_init`` / ``max_iter`` loop
  and chunked prediction.
* ``_maths.py``: the updates and the lower bound as pure functions, one per factor.
* ``_covariance.py``: what differs between full and diagonal covariances, dispatched by a dict.
* ``_features.py``: the feature map and the chunked data passes; ``_kmeans.py``: the initialisation;
  ``_priors.py``: prior resolution.
"""

from scenecluster.mixture._dpgmm import DPGMM

__all__ = ["DPGMM"]
