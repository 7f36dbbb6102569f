"""Can over-clustering then merging components that share a mode of the fitted density choose K for few and many
classes alike?

The per-scene prior (``cluster.prior_per_scene``) holds K across archive sizes, but it does so by setting a
smallest cluster share: a component of a fraction ``f`` of the scenes has ``prior_per_scene / f`` times the data's
covariance added to its own, so K stays near 10-14 whether the archive holds 3, 12 or 22 classes. A weaker prior
over-segments instead; components that cut one non-Gaussian UMAP blob in pieces then share one **mode** of the
mixture's density, and components of two separated blobs do not. Modal EM (Li, Ray & Lindsay 2007, JMLR 8) climbs
from each component's mean to its mode; components that reach the same mode become one cluster. The number of
modes of a density estimate converges as N grows, so the count neither drifts with N nor has a floor share.

Per case of :func:`bench_k_selection.cases` and seed: one UMAP, then the DP-GMM at each ``--priors`` value, with
and without the merge; one JSON line each (clusters, acc, NMI, ARI).

    python benchmarks/bench_mode_merge.py --gpu224 runs/gpu224 --feature untuned__d4 \\
        --seeds 0 1 > runs/mode-merge.jsonl
    python benchmarks/bench_mode_merge.py --summary runs/mode-merge.jsonl

A tried-and-rejected idea (``docs/benchmarks.md``): the components are separate modes almost everywhere, because
UMAP with ``min_dist`` 0 draws a class as several tight, separated sub-blobs, not one blob a mixture cuts up.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any

import numpy as np
from _results import (  # benchmarks/ is on sys.path when run as a script
    load_gpu224,
    read_embedding_sets,
    read_json_lines,
)
from bench_k_selection import cases

from scenecluster.cluster import make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.evaluate import score_clusters
from scenecluster.reduce import make_projection


def _precisions(covariances: np.ndarray) -> np.ndarray:
    """(K, D, D) precision matrices from full (K, D, D) or diagonal (K, D) covariances."""
    if covariances.ndim == 2:
        return np.stack([np.diag(1.0 / c) for c in covariances])
    return np.linalg.inv(covariances)


def _log_densities(x: np.ndarray, means: np.ndarray, precisions: np.ndarray, log_norms: np.ndarray) -> np.ndarray:
    """(S, K) log N(x_s; mu_k, Sigma_k) for points x (S, D)."""
    diff = x[:, None, :] - means[None, :, :]
    maha = np.einsum("skd,kde,ske->sk", diff, precisions, diff)
    return log_norms[None, :] - 0.5 * maha


def component_modes(
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    *,
    max_iter: int = 1000,
    tol: float = 1e-7,
    same_mode: float = 0.05,
) -> np.ndarray:
    """The mode index reached from each component's mean, shape (K,).

    Each step is Modal EM's fixed point ``x <- (sum_k p_k P_k)^-1 sum_k p_k P_k mu_k`` with ``p_k`` the
    component's posterior at ``x`` and ``P_k`` its precision; it never decreases the density. Two climbs
    reach the same mode when they end within ``same_mode`` of the smaller component scale (the root mean
    variance of the components they started from).
    """
    weights = np.asarray(weights, np.float64)
    means = np.asarray(means, np.float64)
    covariances = np.asarray(covariances, np.float64)
    k, d = means.shape
    precisions = _precisions(covariances)
    _, logdet = np.linalg.slogdet(precisions)
    log_norms = np.log(np.maximum(weights, 1e-300)) + 0.5 * logdet - 0.5 * d * np.log(2 * np.pi)
    weighted_means = np.einsum("kde,ke->kd", precisions, means)
    x = means.copy()
    for _ in range(max_iter):
        log_p = _log_densities(x, means, precisions, log_norms)
        p = np.exp(log_p - log_p.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        a = np.einsum("sk,kde->sde", p, precisions)
        b = p @ weighted_means
        new = np.linalg.solve(a, b[..., None])[..., 0]
        step = np.abs(new - x).max()
        x = new
        if step < tol:
            break
    scale = (
        np.sqrt(np.trace(covariances, axis1=1, axis2=2) / d)
        if covariances.ndim == 3
        else np.sqrt(covariances.mean(axis=1))
    )
    modes = np.full(k, -1)
    for i in range(k):
        if modes[i] >= 0:
            continue
        close = np.linalg.norm(x - x[i], axis=1) <= same_mode * np.minimum(scale, scale[i])
        modes[close & (modes < 0)] = i
    return np.unique(modes, return_inverse=True)[1]


def merge_by_mode(mixture: Any, labels: np.ndarray) -> np.ndarray:
    """``labels`` (component ids of ``mixture``) relabelled so that components sharing a mode are one cluster.

    Only the components that hold scenes take part (a truncated DP leaves the rest empty); the merged ids run
    from 0 in order of the smallest component id of each group.
    """
    labels = np.asarray(labels)
    used = np.unique(labels)
    weights = np.asarray(mixture.weights_)[used]
    modes = component_modes(
        weights / weights.sum(), np.asarray(mixture.means_)[used], np.asarray(mixture.covariances_)[used]
    )
    lookup = np.zeros(int(used.max()) + 1, dtype=np.int64)
    lookup[used] = modes
    return lookup[labels]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", nargs="*", default=[], help="name=path of each set (embeddings folders)")
    p.add_argument("--gpu224", help="a gpu_transfer.py result folder (meta.json + .npy)")
    p.add_argument("--feature", default="untuned__d4", help="with --gpu224: <backbone>__<views>")
    p.add_argument("--size", type=int, default=5000)
    p.add_argument("--subsets", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--priors", type=float, nargs="+", default=[0.0005, 0.001, 0.002, 0.004])
    p.add_argument("--summary")
    args = p.parse_args()
    if args.summary:
        return summary(args.summary)
    sets = load_gpu224(args.gpu224, args.feature) if args.gpu224 else {}
    sets.update(read_embedding_sets(args.embeddings))
    feature = args.feature if args.gpu224 else "embeddings"
    for seed in args.seeds:
        for case, X, y in cases(sets, [args.size], args.subsets, seed, None):
            start = time.perf_counter()
            settings = {**ReduceConfig(random_state=seed).model_dump(), "backend": "umap-learn"}
            Z = np.asarray(make_projection(**settings).fit_transform(X), np.float32)
            umap_s = time.perf_counter() - start
            for c in args.priors:
                cfg = ClusterConfig(
                    covariance_prior_scale=max(c * len(Z), 2.0), random_state=seed, prior_covariance="data"
                )
                mixture = make_clusterer(cfg, Z, device="cpu").fit(Z)
                labels = np.asarray(mixture.predict(Z))
                merged = merge_by_mode(mixture, labels)
                for variant, lab in (("dpgmm", labels), ("mode-merge", merged)):
                    s = score_clusters(y, lab)
                    print(
                        json.dumps(
                            {
                                "feature": feature,
                                "case": case,
                                "seed": seed,
                                "n": len(X),
                                "classes": int(s["n_classes"]),
                                "prior_c": c,
                                "variant": variant,
                                "k": int(s["n_clusters"]),
                                **{k: round(float(s[k]), 4) for k in ("acc", "nmi", "ari")},
                                "umap_s": round(umap_s, 1),
                            }
                        ),
                        flush=True,
                    )


def summary(path: str) -> None:
    rows = read_json_lines(path)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        kind = "subset" if "[" in r["case"] else r["case"].split("@")[0]
        groups[(r["feature"], r["variant"], r["prior_c"], kind)].append(r)
    print("| feature | variant | c | case kind | runs | K within 20% | K / truth (mean) | acc | NMI |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (feature, variant, c, kind), rs in sorted(groups.items()):
        within = sum(abs(r["k"] - r["classes"]) <= 0.2 * r["classes"] for r in rs)
        ratio = np.mean([r["k"] / r["classes"] for r in rs])
        print(
            f"| {feature} | {variant} | {c} | {kind} | {len(rs)} | {within} | {ratio:.2f} | "
            f"{np.mean([r['acc'] for r in rs]):.3f} | {np.mean([r['nmi'] for r in rs]):.3f} |"
        )


if __name__ == "__main__":
    main()
