"""Can the neighbour graph set the number of clusters? Its spectrum, and a prior scaled to its neighbourhoods.

The DP-GMM's count barely follows the number of classes (``docs/benchmarks.md``: about 8 clusters for 3 classes
and 12 for 22 at one prior), and no criterion computed on the fitted partitions (silhouette, stability,
Calinski-Harabasz, Davies-Bouldin, the evidence) chose the prior per archive reliably. Two ideas from the graph:

- **The eigengap.** The normalised Laplacian of the fuzzy neighbour graph UMAP builds anyway (``graph_``) has one
  eigenvalue near 0 per weakly connected group of scenes; the largest gap among its smallest eigenvalues is
  spectral clustering's classic estimate of the number of groups (von Luxburg 2007, s. 8.3). Each case records
  the count after the largest gap and after the largest relative gap, and the prior whose count is nearest.
- **A local prior.** The job's Wishart scale matrix is ``c x n x`` the covariance of all fitted scenes. As more
  classes spread the layout out, that covariance grows while each blob does not, so the prior weighs more on each
  class: one reason the count saturates. Here the scale matrix is ``m x n x`` the mean covariance of each scene's
  neighbourhood (``--local-k`` neighbours, or that share of the scenes when below 1), which does not grow with
  the number of blobs.

Cases as in ``bench_k_vs_classes.py``: ``--class-counts`` classes drawn at random (seeded) from the union of the
given sets' classes with ``--per-class`` scenes each, plus each whole set sampled to each ``--full`` size (does
the count drift with N?). Labels only score.

    python benchmarks/bench_k_graph.py --embeddings eurosat=runs/emb112-eurosat/embeddings \\
        nwpu12=runs/emb112-nwpu12/embeddings --seeds 0 1 --full 1000 3000 8400 --priors 0.002 0.004 \\
        --local-priors 0.1 0.2 0.4 --local-k 30 0.01 > runs/k-graph.jsonl
    python benchmarks/bench_k_graph.py --summary runs/k-graph.jsonl

A third rule, ``--adaptive-priors M --adaptive-share S``: neighbourhoods of ``S x N / K`` scenes, ``K`` the
previous fit's count, refitted until a count repeats (:func:`fit_adaptive_prior`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
from _results import (  # benchmarks/ is on sys.path when run as a script
    load_gpu224,
    read_embedding_sets,
    read_json_lines,
)
from scipy.sparse import csgraph
from scipy.sparse.linalg import eigsh

from scenecluster.cluster import drop_small_clusters, make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.evaluate import score_clusters
from scenecluster.neighbourhood_prior import neighbourhood_covariance
from scenecluster.reduce import make_projection


def laplacian_spectrum(graph, max_k: int) -> np.ndarray:
    """The ``max_k + 1`` smallest eigenvalues of the symmetric normalised Laplacian of ``graph``, ascending."""
    lap = csgraph.laplacian(graph.tocsr().astype(np.float64), normed=True)
    k = min(max_k + 1, graph.shape[0] - 2)
    # the smallest eigenvalues of L are 1 minus the largest of D^-1/2 W D^-1/2: found far faster with 'LA'
    values = eigsh(-lap, k=k, which="LA", return_eigenvectors=False, tol=1e-6)
    return np.sort(-values)


def eigengap_counts(values: np.ndarray, min_k: int = 2) -> dict[str, int]:
    """Counts read off the spectrum: after the largest gap, and after the largest gap relative to the value."""
    gaps = np.diff(values)  # gaps[i] = values[i+1] - values[i]: a gap after i+1 eigenvalues
    ks = np.arange(1, len(values))
    ok = ks >= min_k
    relative = gaps / np.maximum(values[1:], 1e-12)
    return {
        "gap": int(ks[ok][np.argmax(gaps[ok])]),
        "relgap": int(ks[ok][np.argmax(relative[ok])]),
    }


def neighbours(spec: float, n: int) -> int:
    """``spec`` neighbours, or with ``spec`` < 1 that share of the ``n`` scenes (at least 10)."""
    return int(spec) if spec >= 1 else max(10, round(spec * n))


def fit_with_covariance(Z: np.ndarray, covariance: np.ndarray, multiplier: float, seed: int) -> np.ndarray:
    """Labels of the job's DP-GMM with its Wishart scale matrix ``multiplier x n x covariance``."""
    mixture = make_clusterer(ClusterConfig(random_state=seed, prior_covariance="data"), Z, device="cpu")
    mixture.set_params(covariance_prior=covariance * multiplier * len(Z)).fit(Z)
    return np.asarray(mixture.predict(Z))


def scored(y: np.ndarray, labels: np.ndarray) -> dict:
    """The count, accuracy and NMI of ``labels`` against ``y``, as each fit's record holds them."""
    s = score_clusters(y, labels)
    return {"k": int(s["n_clusters"]), **{m: round(float(s[m]), 4) for m in ("acc", "nmi")}}


def fit_local_prior(Z: np.ndarray, y: np.ndarray, multiplier: float, k_spec: float, seed: int) -> dict:
    """The job's DP-GMM, its Wishart scale matrix ``multiplier x n x`` the mean covariance of each scene's
    neighbourhood (the grain of UMAP's blobs, which unlike the data's whole covariance does not grow as more
    classes spread the layout out), not the data's."""
    labels = fit_with_covariance(Z, neighbourhood_covariance(Z, neighbours(k_spec, len(Z))), multiplier, seed)
    return {"m": multiplier, "local_k": k_spec, **scored(y, labels)}


def fit_adaptive_prior(
    Z: np.ndarray, y: np.ndarray, multiplier: float, share: float, seed: int, min_shares: list[float] | None = None
) -> dict:
    """The local prior with neighbourhoods of ``share`` of a cluster's scenes: ``share x n / K`` neighbours, ``K``
    the previous fit's count (first the default prior's), refitted until the count repeats: the job's own
    ``cluster.prior_covariance: neighbourhoods`` (:class:`scenecluster.neighbourhood_prior.NeighbourhoodPriorDPGMM`).

    Fixed neighbours shrink with N (the count drifts up as the archive grows); a fixed share of all scenes is a
    larger part of each class when the classes are many (the count saturates). A share of the *clusters'* size
    scales with neither, if the count it gives is near the classes' own. ``min_shares``: also score the fit with
    its clusters of fewer than that share of the scenes dropped (:func:`without_small_clusters`).

    ``multiplier`` is the job's ``neighbourhood_weight``: since the twenty-second session a weight per scene of a
    cluster of mean size (4.0 equals the old 0.4 at 10 clusters). The tables in ``docs/benchmarks.md`` that ran
    ``--adaptive-priors 0.4`` measured the earlier weight per archive scene; ``bench_prior_weight.py`` compares
    the two.
    """
    cfg = ClusterConfig(
        random_state=seed, prior_covariance="neighbourhoods", neighbourhood_weight=multiplier, neighbourhood_share=share
    )
    mixture = make_clusterer(cfg, Z, device="cpu")
    labels = mixture.fit_predict(Z)
    record = {"m": multiplier, "share": share, **scored(y, labels), "counts": mixture.counts_}
    if min_shares:
        record["pruned"] = without_small_clusters(mixture, Z, y, min_shares)
    return record


def without_small_clusters(model, Z: np.ndarray, y: np.ndarray, shares: list[float]) -> list[dict]:
    """The fitted ``model``'s labels with each cluster of fewer than ``share x n`` scenes dropped, as the job drops
    them (:func:`scenecluster.cluster.drop_small_clusters`, on a copy per share). One record per share."""
    import copy

    labels = np.asarray(model.predict(Z))
    return [
        {"min_share": share, **scored(y, drop_small_clusters(copy.deepcopy(model), Z, labels, share))}
        for share in shares
    ]


def load(args) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if args.gpu224:
        return load_gpu224(args.gpu224, args.feature)
    return read_embedding_sets(args.embeddings)


def cases_for(seed: int, args, y: np.ndarray, sets) -> list[tuple[str, int, np.ndarray]]:
    classes = np.unique(y)
    cases = []
    for per_class in args.per_class:
        for count in args.class_counts:
            rng = np.random.default_rng([seed, per_class, count])
            pick = rng.choice(classes, size=min(count, len(classes)), replace=False)
            sizes = [min(per_class, int((y == c).sum())) for c in pick]
            rows = np.concatenate(
                [rng.choice(np.flatnonzero(y == c), n, replace=False) for c, n in zip(pick, sizes, strict=True)]
            )
            cases.append((f"{len(pick)} classes x {per_class}", len(pick), rows))
    offset = 0
    for name, (x, labels) in sets.items():
        for size in args.full:
            rng = np.random.default_rng([seed, len(x)])
            rows = offset + np.sort(rng.choice(len(x), size=min(size, len(x)), replace=False))
            cases.append((f"{name} x {len(rows)}", len(np.unique(labels)), rows))
        offset += len(x)
    return cases


def run(args) -> None:
    sets = load(args)
    X = np.concatenate([x for x, _ in sets.values()])
    y = np.concatenate([np.array([f"{name}/{c}" for c in labels]) for name, (_, labels) in sets.items()])
    for seed in args.seeds:
        for case, count, rows in cases_for(seed, args, y, sets):
            settings = {**ReduceConfig(random_state=seed).model_dump(), "backend": "umap-learn"}
            start = time.perf_counter()
            projection = make_projection(**settings)
            Z = np.asarray(projection.fit_transform(X[rows]), np.float32)
            umap_s = time.perf_counter() - start
            start = time.perf_counter()
            values = laplacian_spectrum(projection.graph_, args.max_k)
            spectrum_s = time.perf_counter() - start
            fits = []
            for c in args.priors:
                scale = max(2.0, c * len(rows))  # the data prior, as the job set it before the neighbourhood prior
                cfg = ClusterConfig(covariance_prior_scale=scale, random_state=seed, prior_covariance="data")
                labels = np.asarray(make_clusterer(cfg, Z, device="cpu").fit(Z).predict(Z))
                fits.append({"c": c, **scored(y[rows], labels)})
            local = [fit_local_prior(Z, y[rows], m, k, seed) for m in args.local_priors for k in args.local_k]
            adaptive = [
                fit_adaptive_prior(Z, y[rows], m, share, seed, args.min_share)
                for m in args.adaptive_priors
                for share in args.adaptive_share
            ]
            record = {
                "case": case,
                "classes": count,
                "n": len(rows),
                "seed": seed,
                **eigengap_counts(values),
                "eigenvalues": [round(float(v), 5) for v in values],
                "fits": fits,
                "local_fits": local,
                "adaptive_fits": adaptive,
                "umap_s": round(umap_s, 1),
                "spectrum_s": round(spectrum_s, 2),
            }
            print(json.dumps(record), flush=True)


def nearest(fits: list[dict], k: int) -> dict:
    """The fit whose count is nearest ``k`` (ties: the larger prior, i.e. fewer clusters)."""
    return min(fits, key=lambda f: (abs(f["k"] - k), -f["c"]))


def is_whole_set(case: str) -> bool:
    """Whether ``case`` is a whole set sampled to a size (``eurosat x 3000``), not a draw of classes."""
    return " classes x " not in case


def variants(record: dict) -> list[tuple[str, dict]]:
    """Each fit of a case under its variant's name, eigengap choices included."""
    named = [(f"data prior, c = {f['c']}", f) for f in record["fits"]]
    named += [
        (f"local prior, m = {f['m']}, neighbours {f.get('local_k', 30):g}", f) for f in record.get("local_fits", [])
    ]
    named += [
        (f"local prior, m = {f['m']}, neighbours {f['share']:g} of a cluster", f)
        for f in record.get("adaptive_fits", [])
    ]
    named += [
        (f"local prior, m = {f['m']}, share {f['share']:g}, clusters under {p['min_share']:g} dropped", p)
        for f in record.get("adaptive_fits", [])
        for p in f.get("pruned", [])
    ]
    named += [("data prior at the c nearest the eigengap", nearest(record["fits"], record["gap"]))]
    named += [("data prior at the c nearest the relative eigengap", nearest(record["fits"], record["relgap"]))]
    return named


def summary(path: str) -> None:
    """Per variant: counts within 20% of the classes, mean accuracy, the slope of log(count) on log(classes)
    (1: the count follows the classes; 0: it ignores them), the mean count per number of classes, and the whole
    sets' counts at each size."""
    rows = read_json_lines(path)
    fits: dict[str, list] = defaultdict(list)
    sizes: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    eigengap = [(r["classes"], r["gap"], r["relgap"]) for r in rows]
    for r in rows:
        for name, f in variants(r):
            fits[name].append((r["classes"], f["k"], f["acc"]))
            if is_whole_set(r["case"]):
                sizes[name][(r["case"].split(" x ")[0], r["n"])].append(f["k"])
    print("| variant | K within 20% | mean acc | slope | mean K for 3 / 6 / 10 / 12 / 15 / 22 classes |")
    print("|---|---|---|---|---|")
    for name, v in fits.items():
        a = np.array(v, float)
        within = int((abs(a[:, 1] - a[:, 0]) <= 0.2 * a[:, 0]).sum())
        slope = np.polyfit(np.log(a[:, 0]), np.log(a[:, 1]), 1)[0]
        per = " / ".join(f"{a[a[:, 0] == c, 1].mean():.1f}" for c in np.unique(a[:, 0]))
        print(f"| {name} | {within} of {len(a)} | {a[:, 2].mean():.3f} | {slope:.2f} | {per} |")
    e = np.array(eigengap, float)
    for label, col in (("eigengap", 1), ("relative eigengap", 2)):
        within = int((abs(e[:, col] - e[:, 0]) <= 0.2 * e[:, 0]).sum())
        per = " / ".join(f"{e[e[:, 0] == c, col].mean():.1f}" for c in np.unique(e[:, 0]))
        print(f"| {label} (the count itself) | {within} of {len(e)} | | | {per} |")
    print()
    print("| variant | whole sets: clusters at each size (seeds) |")
    print("|---|---|")
    for name, cases in sizes.items():
        cells = [f"{set_name} x {n}: {', '.join(map(str, ks))}" for (set_name, n), ks in sorted(cases.items())]
        print(f"| {name} | {'; '.join(cells)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", nargs="*", default=[], help="name=path of each set's embeddings")
    p.add_argument("--gpu224", help="a gpu_transfer.py result folder (meta.json + .npy) instead")
    p.add_argument("--feature", default="untuned__d4")
    p.add_argument("--class-counts", type=int, nargs="*", default=[3, 6, 10, 15, 22])
    p.add_argument("--per-class", type=int, nargs="+", default=[100, 300])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--priors", type=float, nargs="+", default=[0.0005, 0.001, 0.002, 0.004, 0.008, 0.016])
    p.add_argument("--local-priors", type=float, nargs="*", default=[], help="multipliers of the local prior")
    p.add_argument("--local-k", type=float, nargs="+", default=[30], help="neighbours (or share if < 1)")
    p.add_argument("--adaptive-priors", type=float, nargs="*", default=[], help="multipliers, cluster-share k")
    p.add_argument("--adaptive-share", type=float, nargs="+", default=[0.25], help="neighbours: share of N / K")
    p.add_argument(
        "--min-share", type=float, nargs="*", default=[], help="also drop clusters under these shares of the scenes"
    )
    p.add_argument("--full", type=int, nargs="*", default=[5000], help="also each whole set, sampled to these sizes")
    p.add_argument("--max-k", type=int, default=40, help="eigenvalues looked at (the largest count it can give)")
    p.add_argument("--summary")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
    else:
        run(args)


if __name__ == "__main__":
    main()
