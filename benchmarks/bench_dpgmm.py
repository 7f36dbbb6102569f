"""Benchmark ``scenecluster.cluster.DPGMM`` against scikit-learn's ``BayesianGaussianMixture``.

Both fit the same data (Gaussian blobs, D features, K components, dirichlet_process, full covariances) for
the same fixed number of iterations (no convergence test), each from its own k-means initialisation. Each
iteration (E-step, M-step, lower bound: the body of the fit loop) is timed on its own; the minimum and the
median over iterations are reported (the minimum is the least disturbed by other processes sharing the
cores; iterations do the same work, so it is a fair per-iteration cost). Initialisation is reported
separately. The speedup uses the minima.
One JSON line per size.

Example::

    python benchmarks/bench_dpgmm.py --sizes 20000 100000 1000000 --iters 5 --skip-sklearn-above 100000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

# On a shared machine torch's OpenMP workers spin-wait at every parallel region; when another process holds
# the cores that makes a 2-thread run 5-20x slower than a 1-thread one. PASSIVE waiting removes that cliff
# at no measurable cost here. Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402  (after the environment is set)
import torch  # noqa: E402
from _hardware import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.mixture import BayesianGaussianMixture  # noqa: E402
from sklearn.utils import check_random_state  # noqa: E402

from scenecluster.cluster import DPGMM  # noqa: E402


def make_data(n: int, d: int, n_centers: int, seed: int = 0) -> np.ndarray:
    """Blobs with random (anisotropic) covariances, so full covariances matter."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=8.0, size=(n_centers, d))
    labels = rng.integers(n_centers, size=n)
    mix = rng.normal(size=(n_centers, d, d)) / np.sqrt(d)
    return centers[labels] + np.einsum("nd,nde->ne", rng.normal(size=(n, d)), mix[labels])


def step_ours(
    X: np.ndarray, k: int, iters: int, device: str, dtype: str | None, resp: np.ndarray | None = None
) -> dict:
    """Initialise like ``DPGMM.fit`` then time each fused E/M pass + lower bound separately."""
    model = DPGMM(k, max_iter=iters, tol=0.0, device=device, dtype=dtype, random_state=0)
    t0 = time.perf_counter()
    Xv = model._validate_X(X, reset=True)
    model._check_parameters(Xv)
    model._setup(Xv)
    fit_device, fit_dtype = model._data.device, model._data.dtype
    gen = torch.Generator(device=fit_device).manual_seed(0)
    params = model._initialize_parameters(gen, resp)
    _sync(fit_device)
    init_s = time.perf_counter() - t0
    times, bound = [], float("nan")
    for _ in range(iters):
        t = time.perf_counter()
        stats, entropy = model._e_step(params)
        params = model._m_step(stats, params)
        bound = model._compute_lower_bound(params, entropy)
        _sync(fit_device)
        times.append(time.perf_counter() - t)
    return {
        "init_s": init_s,
        "s_per_iter": float(np.min(times)),
        "median_s_per_iter": float(np.median(times)),
        "lower_bound": bound,
        "device": str(fit_device),
        "dtype": str(fit_dtype).replace("torch.", ""),
    }


def step_sklearn(X: np.ndarray, k: int, iters: int, resp: np.ndarray | None = None) -> dict:
    """Body of sklearn's own fit loop (``_e_step``, ``_m_step``, ``_compute_lower_bound``), each timed."""
    model = BayesianGaussianMixture(
        n_components=k,
        weight_concentration_prior_type="dirichlet_process",
        covariance_type="full",
        max_iter=iters,
        tol=0.0,
        random_state=0,
    )
    t0 = time.perf_counter()
    model._check_parameters(X)
    if resp is None:
        model._initialize_parameters(X, check_random_state(0))
    else:
        model._initialize(X, resp)
    init_s = time.perf_counter() - t0
    times, bound = [], float("nan")
    for _ in range(iters):
        t = time.perf_counter()
        log_prob_norm, log_resp = model._e_step(X)
        model._m_step(X, log_resp)
        bound = float(model._compute_lower_bound(log_resp, log_prob_norm))
        times.append(time.perf_counter() - t)
    return {
        "init_s": init_s,
        "s_per_iter": float(np.min(times)),
        "median_s_per_iter": float(np.median(times)),
        "lower_bound": bound,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 1_000_000])
    ap.add_argument("--features", type=int, default=10)
    ap.add_argument("--components", type=int, default=50)
    ap.add_argument("--centers", type=int, default=20, help="true clusters in the synthetic data")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    ap.add_argument("--dtype", default=None, help="float32/float64; default float64 on CPU, float32 on GPU")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument(
        "--skip-sklearn-above",
        type=int,
        default=100_000,
        help="only time sklearn for n <= this (it takes ~40 s per iteration at 1M)",
    )
    ap.add_argument(
        "--sklearn-iters",
        type=int,
        default=None,
        help="iterations for sklearn above --skip-sklearn-above; omitted = skip it there",
    )
    ap.add_argument(
        "--same-init",
        action="store_true",
        help="start both from the same responsibilities (sklearn KMeans labels): lower bounds must agree",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cpu = cpu_model()
    DPGMM(5, max_iter=2, device=args.device).fit(make_data(2000, args.features, 5))  # warm-up
    for n in args.sizes:
        X = make_data(n, args.features, args.centers)
        resp = None
        if args.same_init:
            labels = KMeans(args.components, n_init=1, random_state=0).fit(X).labels_
            resp = np.eye(args.components)[labels]
        ours = step_ours(X, args.components, args.iters, args.device, args.dtype, resp)
        row = {
            "date": datetime.date.today().isoformat(),
            "cpu": cpu,
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "device": ours["device"],
            "dtype": ours["dtype"],
            "n": n,
            "d": args.features,
            "k": args.components,
            "same_init": args.same_init,
            "iters": args.iters,
            "ours_init_s": ours["init_s"],
            "ours_s_per_iter": ours["s_per_iter"],
            "ours_median_s_per_iter": ours["median_s_per_iter"],
            "ours_lower_bound": ours["lower_bound"],
        }
        sk_iters = args.iters if n <= args.skip_sklearn_above else args.sklearn_iters
        if sk_iters:
            sk = step_sklearn(X, args.components, sk_iters, resp)
            row.update(
                {
                    "sklearn_iters": sk_iters,
                    "sklearn_init_s": sk["init_s"],
                    "sklearn_s_per_iter": sk["s_per_iter"],
                    "sklearn_median_s_per_iter": sk["median_s_per_iter"],
                    "sklearn_lower_bound": sk["lower_bound"],
                    "speedup_per_iter": sk["s_per_iter"] / ours["s_per_iter"],
                }
            )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
