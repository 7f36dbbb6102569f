"""Tests for scenecluster.cluster.DPGMM: equivalence with scikit-learn's BayesianGaussianMixture (same
maths), invariances, edge cases and the scikit-learn estimator contract."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import BayesianGaussianMixture
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

import scenecluster.mixture._features as features_mod
from scenecluster.cluster import DPGMM

COV_TYPES = ["full", "diag"]


def _blobs(n=600, d=3, centers=4, std=1.0, seed=0):
    return make_blobs(n_samples=n, n_features=d, centers=centers, cluster_std=std, random_state=seed)


def _random_resp(n, k, seed=0):
    resp = np.random.RandomState(seed).rand(n, k)
    return resp / resp.sum(1, keepdims=True)


def _sklearn_bgm(k, covariance_type, **kw):
    return BayesianGaussianMixture(
        n_components=k,
        covariance_type=covariance_type,
        weight_concentration_prior_type="dirichlet_process",
        **kw,
    )


class _FixedInitBGM(BayesianGaussianMixture):
    """sklearn's estimator, initialised from given responsibilities (for end-to-end comparisons)."""

    def __init__(self, resp=None, **kw):
        super().__init__(**kw)
        self.resp = resp

    def _initialize_parameters(self, X, random_state, xp=None):
        self._initialize(X, self.resp)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These fits are tiny: threads buy nothing, and on a shared machine spinning OpenMP/BLAS workers make
    multi-threaded runs many times slower. Restored afterwards for other modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # same for numpy's BLAS and sklearn's OpenMP on the reference side
        yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet_convergence():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


# ---------------------------------------------------------------------------------------------------------
# equivalence with scikit-learn


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_lower_bound_matches_sklearn_each_iteration(covariance_type):
    X, _ = _blobs(n=500, d=3, centers=4, std=1.5)
    k, n_iter = 8, 15
    resp = _random_resp(len(X), k)
    sk = _sklearn_bgm(k, covariance_type)
    sk._check_parameters(X)
    sk._initialize(X, resp)
    sk_bounds = []
    for _ in range(n_iter):
        log_prob_norm, log_resp = sk._e_step(X)
        sk._m_step(X, log_resp)
        sk_bounds.append(sk._compute_lower_bound(log_resp, log_prob_norm))

    ours = DPGMM(k, covariance_type=covariance_type, max_iter=n_iter, tol=0.0, device="cpu", chunk_size=128)
    ours._fit_from_resp(X, resp)
    assert len(ours.lower_bounds_) == n_iter
    np.testing.assert_allclose(ours.lower_bounds_, sk_bounds, rtol=1e-6)
    np.testing.assert_allclose(ours.means_, sk.means_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ours.covariances_, sk.covariances_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ours.precisions_cholesky_, sk.precisions_cholesky_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ours.degrees_of_freedom_, sk.degrees_of_freedom_, rtol=1e-10)
    sk_labels = sk._estimate_weighted_log_prob(X).argmax(1)
    assert adjusted_rand_score(sk_labels, ours.labels_) >= 0.99
    np.testing.assert_allclose(ours.score_samples(X), sk.score_samples(X), rtol=1e-6)


@pytest.mark.parametrize("covariance_type", COV_TYPES)
@pytest.mark.parametrize(
    "case",
    [
        {"centers": 5, "std": 0.5, "seed": 1},  # well separated
        {"centers": [[0, 0], [1.5, 0.5], [0.5, 1.8]], "std": 1.0, "seed": 2},  # heavily overlapping
    ],
    ids=["separated", "overlapping"],
)
def test_final_assignments_agree_with_sklearn(covariance_type, case):
    X, _ = make_blobs(
        n_samples=600,
        n_features=2,
        centers=case["centers"],
        cluster_std=case["std"],
        random_state=case["seed"],
    )
    k = 10
    labels0 = KMeans(k, n_init=1, random_state=0).fit(X).labels_
    resp = np.eye(k)[labels0]
    sk = _FixedInitBGM(
        resp=resp,
        n_components=k,
        covariance_type=covariance_type,
        weight_concentration_prior_type="dirichlet_process",
        max_iter=300,
        tol=1e-6,
    )
    sk_labels = sk.fit_predict(X)
    ours = DPGMM(k, covariance_type=covariance_type, max_iter=300, tol=1e-6, device="cpu")
    ours._fit_from_resp(X, resp)
    assert adjusted_rand_score(sk_labels, ours.labels_) >= 0.99
    assert ours.n_iter_ == sk.n_iter_
    np.testing.assert_allclose(ours.lower_bound_, sk.lower_bound_, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# properties of the fit


@pytest.mark.parametrize("covariance_type", COV_TYPES)
@pytest.mark.parametrize("hyper", [False, True], ids=["fixed-alpha", "gamma-hyperprior"])
def test_lower_bound_never_decreases(covariance_type, hyper):
    X, _ = _blobs(n=400, d=3, centers=5, std=1.2, seed=3)
    kw = {"concentration_prior_shape": 1.0, "concentration_prior_rate": 1.0} if hyper else {}
    model = DPGMM(
        12,
        covariance_type=covariance_type,
        init_params="random",
        max_iter=60,
        tol=0.0,
        random_state=0,
        device="cpu",
        **kw,
    ).fit(X)
    bounds = np.asarray(model.lower_bounds_)
    assert len(bounds) == 60
    assert np.all(np.diff(bounds) >= -1e-9 * np.abs(bounds[1:])), np.diff(bounds).min()
    assert bounds[-1] > bounds[0]  # it does move


def test_gamma_hyperprior_updates_concentration():
    X, _ = _blobs(n=400, d=2, centers=3, std=0.5, seed=4)
    model = DPGMM(10, concentration_prior_shape=2.0, concentration_prior_rate=0.5, random_state=0, device="cpu")
    model.fit(X)
    w1, w2 = model.concentration_posterior_
    assert w1 == pytest.approx(2.0 + 10)
    assert w2 > 0.5  # the rate grows by -sum E[log(1 - V_k)] > 0
    assert model.weight_concentration_prior_ == pytest.approx(w1 / w2)
    assert model.weight_concentration_prior_ != pytest.approx(2.0 / 0.5)
    fixed = DPGMM(10, random_state=0, device="cpu").fit(X)
    assert fixed.concentration_posterior_ is None
    with pytest.raises(ValueError, match="both"):
        DPGMM(5, concentration_prior_shape=1.0, device="cpu").fit(X)


@pytest.mark.parametrize("covariance_type", COV_TYPES)
@pytest.mark.parametrize("init_params", ["kmeans", "kmeans++", "random"])
def test_fit_predict_equals_fit_then_predict(covariance_type, init_params):
    X, _ = _blobs(n=300, d=3, centers=4, std=1.5, seed=5)
    kw = dict(covariance_type=covariance_type, init_params=init_params, max_iter=7, random_state=1, device="cpu")
    labels = DPGMM(10, **kw).fit_predict(X)
    model = DPGMM(10, **kw).fit(X)
    np.testing.assert_array_equal(labels, model.predict(X))
    np.testing.assert_array_equal(model.predict_proba(X).argmax(1), model.predict(X))


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_translation_moves_only_means(covariance_type):
    X, _ = _blobs(n=400, d=3, centers=4, std=1.0, seed=6)
    c = np.array([1e3, -250.0, 7.5])
    kw = dict(covariance_type=covariance_type, random_state=0, device="cpu", max_iter=50)
    a = DPGMM(8, **kw).fit(X)
    b = DPGMM(8, **kw).fit(X + c)
    np.testing.assert_allclose(b.means_, a.means_ + c, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(b.covariances_, a.covariances_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(b.weights_, a.weights_, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(b.lower_bound_, a.lower_bound_, rtol=1e-8)
    np.testing.assert_array_equal(b.labels_, a.labels_)
    np.testing.assert_array_equal(b.predict(X[:50] + c), a.predict(X[:50]))


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_covariance_times_precision_is_identity(covariance_type):
    X, _ = _blobs(n=300, d=4, centers=3, seed=7)
    m = DPGMM(6, covariance_type=covariance_type, random_state=0, device="cpu").fit(X)
    if covariance_type == "full":
        eye = np.broadcast_to(np.eye(4), m.covariances_.shape)
        np.testing.assert_allclose(m.covariances_ @ m.precisions_, eye, atol=1e-8)
    else:
        np.testing.assert_allclose(m.covariances_ * m.precisions_, 1.0, atol=1e-10)
    assert abs(m.weights_.sum() - 1) < 1e-12


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_recovers_blobs(covariance_type):
    X, y = _blobs(n=1000, d=5, centers=6, std=1.0, seed=8)
    m = DPGMM(20, covariance_type=covariance_type, random_state=0, device="cpu").fit(X)
    assert adjusted_rand_score(y, m.labels_) >= 0.95
    assert 6 <= m.n_clusters_ <= 7
    # the clusters in use carry essentially all the weight
    assert m.weights_[m.used_components_].sum() > 0.98


def test_chunking_and_feature_cache_do_not_change_the_result(monkeypatch):
    X, _ = _blobs(n=500, d=3, centers=4, std=1.5, seed=9)
    resp = _random_resp(len(X), 7, seed=1)
    ref = DPGMM(7, max_iter=10, tol=0.0, device="cpu")._fit_from_resp(X, resp)
    monkeypatch.setattr(features_mod, "_PHI_CACHE_BYTES", 0)
    chunked = DPGMM(7, max_iter=10, tol=0.0, device="cpu", chunk_size=33)._fit_from_resp(X, resp)
    np.testing.assert_allclose(chunked.lower_bounds_, ref.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(chunked.means_, ref.means_, rtol=1e-9, atol=1e-10)


def test_float32_close_to_float64():
    X, _ = _blobs(n=800, d=4, centers=5, std=1.0, seed=10)
    a = DPGMM(10, random_state=0, device="cpu", dtype="float64").fit(X)
    b = DPGMM(10, random_state=0, device="cpu", dtype=torch.float32).fit(X)
    assert adjusted_rand_score(a.labels_, b.labels_) >= 0.99
    assert b.means_.dtype == np.float64


def test_n_init_keeps_best_bound():
    X, _ = _blobs(n=300, d=2, centers=5, std=1.5, seed=11)
    single = [DPGMM(8, init_params="random", max_iter=20, random_state=s, device="cpu").fit(X) for s in range(3)]
    multi = DPGMM(8, init_params="random", max_iter=20, n_init=3, random_state=0, device="cpu").fit(X)
    assert multi.lower_bound_ >= single[0].lower_bound_ - 1e-9
    # The same three restarts fitted one by one: a shared RandomState hands each fit the seed that the
    # n_init=3 fit draws for that restart, so the kept bound must be the best of theirs.
    shared = np.random.RandomState(0)
    restarts = [DPGMM(8, init_params="random", max_iter=20, random_state=shared, device="cpu").fit(X) for _ in range(3)]
    assert multi.lower_bound_ == pytest.approx(max(r.lower_bound_ for r in restarts))


def test_convergence_warning():
    X, _ = _blobs(n=200, d=2, centers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning):
            DPGMM(5, max_iter=2, tol=0.0, device="cpu").fit(X)
        m = DPGMM(5, max_iter=500, tol=1e-3, random_state=0, device="cpu").fit(X)
    assert m.converged_ and m.n_iter_ < 500


# ---------------------------------------------------------------------------------------------------------
# edge cases


def test_one_point_per_cluster():
    X = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 20.0]])
    m = DPGMM(5, random_state=0, device="cpu").fit(X)
    assert m.used_components_[m.labels_].all()
    assert 1 <= m.n_clusters_ <= 5
    np.testing.assert_array_equal(m.predict(X), m.labels_)


def test_duplicated_points():
    base = np.array([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    X = np.repeat(base, 40, axis=0)
    y = np.repeat(np.arange(3), 40)
    m = DPGMM(6, random_state=0, device="cpu").fit(X)
    assert np.isfinite(m.lower_bound_)
    assert adjusted_rand_score(y, m.labels_) == pytest.approx(1.0)
    assert m.n_clusters_ == 3


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_one_feature(covariance_type):
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-5, 1, 200), rng.normal(5, 1, 200)])[:, None]
    y = np.repeat([0, 1], 200)
    m = DPGMM(6, covariance_type=covariance_type, random_state=0, device="cpu").fit(X)
    assert adjusted_rand_score(y, m.labels_) >= 0.95
    assert m.means_.shape == (6, 1)


def test_emptied_component_is_never_predicted():
    X, _ = _blobs(n=300, d=2, centers=3, std=0.5, seed=12)
    k = 6
    resp = np.eye(k)[KMeans(3, n_init=1, random_state=0).fit(X).labels_ % 3]  # columns 3..5 start empty
    m = DPGMM(k, max_iter=50, device="cpu")._fit_from_resp(X, resp)
    assert not m.used_components_[3:].any()
    grid = np.random.default_rng(0).uniform(X.min(0) - 20, X.max(0) + 20, size=(2000, 2))
    assert m.used_components_[m.predict(grid)].all()
    assert m.n_clusters_ == len(np.unique(m.labels_))

    # Masking is what keeps unused components out: mark a component that does win points as unused.
    victim = np.bincount(m.labels_).argmax()
    m.used_components_ = m.used_components_.copy()
    m.used_components_[victim] = False
    assert victim not in m.predict(X)
    np.testing.assert_allclose(m.predict_proba(X)[:, victim], 0.0)
    np.testing.assert_allclose(m.predict_proba(X).sum(1), 1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(bad):
    X, _ = _blobs(n=50, d=2)
    X[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        DPGMM(3, device="cpu").fit(X)
    fitted = DPGMM(3, device="cpu", random_state=0).fit(_blobs(n=50, d=2)[0])
    with pytest.raises(ValueError, match="NaN or inf"):
        fitted.predict(X)


def test_input_validation():
    with pytest.raises(ValueError, match="minimum of 2"):
        DPGMM(3, device="cpu").fit(np.zeros((1, 2)))
    X, _ = _blobs(n=50, d=2)
    with pytest.raises(ValueError, match="n_components"):
        DPGMM(0, device="cpu").fit(X)
    with pytest.raises(ValueError, match="covariance_type"):
        DPGMM(3, covariance_type="tied", device="cpu").fit(X)
    with pytest.raises(ValueError, match="degrees_of_freedom_prior"):
        DPGMM(3, degrees_of_freedom_prior=0.5, device="cpu").fit(X)
    with pytest.raises(ValueError, match="mean_prior"):
        DPGMM(3, mean_prior=[0.0, 0.0, 0.0], device="cpu").fit(X)
    with pytest.raises(ValueError, match="device"):
        DPGMM(3, device="tpu").fit(X)
    with pytest.raises(ValueError, match="features"):
        DPGMM(3, device="cpu", random_state=0).fit(X).predict(np.zeros((4, 3)))


def test_params_clone_and_pickle():
    m = DPGMM(7, covariance_type="diag", tol=1e-4, device="cpu", random_state=3)
    assert m.get_params()["n_components"] == 7
    assert m.set_params(n_components=4, reg_covar=1e-5) is m
    assert m.n_components == 4 and m.reg_covar == 1e-5
    c = clone(m)
    assert c.get_params() == m.get_params() and c is not m
    X, _ = _blobs(n=200, d=3)
    m.fit(X)
    assert not hasattr(c, "means_")
    restored = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(restored.predict(X), m.predict(X))
    assert isinstance(restored.means_, np.ndarray)


def test_custom_priors_are_used():
    X, _ = _blobs(n=300, d=2, centers=3, seed=13)
    kw = dict(
        mean_prior=[1.0, 2.0],
        mean_precision_prior=0.5,
        degrees_of_freedom_prior=3.0,
        covariance_prior=np.eye(2) * 2.0,
        weight_concentration_prior=0.3,
    )
    k = 5
    resp = _random_resp(len(X), k, seed=2)
    sk = _sklearn_bgm(k, "full", **kw)
    sk._check_parameters(X)
    sk._initialize(X, resp)
    log_prob_norm, log_resp = sk._e_step(X)
    sk._m_step(X, log_resp)
    ours = DPGMM(k, max_iter=1, tol=0.0, device="cpu", **kw)._fit_from_resp(X, resp)
    np.testing.assert_allclose(ours.lower_bound_, sk._compute_lower_bound(log_resp, log_prob_norm), rtol=1e-8)
    np.testing.assert_allclose(ours.means_, sk.means_, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# scikit-learn estimator contract

# Every check applies and passes; kept explicit so a future exception has a place and needs a reason.
_EXPECTED_FAILED: dict[str, str] = {}


@parametrize_with_checks(
    [DPGMM(n_components=5, max_iter=30, device="cpu", random_state=0)],
    expected_failed_checks=lambda est: _EXPECTED_FAILED,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ---------------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_cuda_matches_cpu(covariance_type):
    X, _ = _blobs(n=5000, d=6, centers=8, std=1.0, seed=14)
    resp = np.eye(16)[KMeans(16, n_init=1, random_state=0).fit(X).labels_]
    cpu = DPGMM(16, covariance_type=covariance_type, device="cpu", max_iter=100)._fit_from_resp(X, resp)
    gpu32 = DPGMM(16, covariance_type=covariance_type, device="cuda", max_iter=100)._fit_from_resp(X, resp)
    gpu64 = DPGMM(16, covariance_type=covariance_type, device="cuda", dtype="float64", max_iter=100)
    gpu64._fit_from_resp(X, resp)
    assert gpu32.device_.startswith("cuda")
    assert adjusted_rand_score(cpu.labels_, gpu32.labels_) >= 0.99
    np.testing.assert_allclose(gpu64.lower_bounds_, cpu.lower_bounds_, rtol=1e-9)
    fitted = DPGMM(16, covariance_type=covariance_type, device="cuda", random_state=0).fit(X)
    np.testing.assert_array_equal(fitted.predict(X), fitted.labels_)
