"""Which label-free criterion picks the mixture's prior so that the number of clusters holds at any size?

On the embeddings of finished runs (each with labels, read only to score), for every case (a scene set or a
subset of its classes, a sample size, a seed) the script projects a seeded sample once with the default UMAP,
then fits the DP-GMM over a grid of prior scales on that projection and records, per grid point, the clusters
found, the label scores and the label-free criteria. The grid is of scales *per fitted scene*
(``covariance_prior_scale = c x n``): a component of ``n_k`` scenes weighs the prior against ``n_k`` times its
own scatter, so a fixed scale weakens as the sample grows and the mixture splits more; with ``c x n`` the same
``c`` means the same prior strength at every size (``--absolute`` uses the grid as plain scales instead).
The criteria:

``silhouette``
    the silhouette of the clusters in the input space (cosine, a seeded 2,000-row subsample), as the Tune
    job uses;
``stability``
    the ARI between the clusterings of two fits on disjoint random halves of the projected sample, each
    assigning every scene (the mixture's answer should not depend on which scenes it saw);
``calinski`` / ``davies``
    Calinski-Harabasz and Davies-Bouldin in the input space (L2-normalised).

One JSON line per (case, prior scale); ``--summary`` then reads them back and prints, per criterion, the
clusters and accuracy of its choice in every case, beside the best accuracy any grid point reached.

    python benchmarks/bench_k_selection.py --embeddings eurosat=runs/eurosat-all/embeddings \\
        nwpu12=runs/nwpu12-all/embeddings --sizes 1000 3000 10000 27000 --seeds 0 1 2 > runs/ksel.jsonl
    python benchmarks/bench_k_selection.py --summary runs/ksel.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script
from _results import read_embedding_sets, read_json_lines
from sklearn.metrics import adjusted_rand_score, calinski_harabasz_score, davies_bouldin_score

from scenecluster.cluster import make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.evaluate import input_silhouette, score_clusters
from scenecluster.reduce import make_projection

CRITERIA = {"silhouette": max, "stability": max, "calinski": max, "davies": min}


def cases(
    sets: dict[str, tuple[np.ndarray, np.ndarray]], sizes: list[int], subsets: int, seed: int, only: list[str] | None
) -> Iterator:
    """(name, X, labels) per case: each full set (or those in ``only``) at each size, class subsets, and the
    union of all sets."""
    rng = np.random.default_rng(seed)
    for name, (X, y) in sets.items():
        if only and name not in only:
            continue
        for n in sizes:
            if n <= len(X):
                rows = np.sort(rng.choice(len(X), size=n, replace=False))
                yield f"{name}@{n}", X[rows], y[rows]
        classes = np.unique(y)
        for i in range(subsets):
            pick = rng.choice(classes, size=3 + i % 2, replace=False)
            rows = np.flatnonzero(np.isin(y, pick))
            rows = np.sort(rng.choice(rows, size=min(3000, len(rows)), replace=False))
            yield f"{name}[{'+'.join(sorted(pick))}]", X[rows], y[rows]
    if len(sets) > 1:
        parts = [(X, np.array([f"{name}/{c}" for c in y])) for name, (X, y) in sets.items()]
        X = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        rows = np.sort(rng.choice(len(X), size=min(6000, len(X)), replace=False))
        yield "union", X[rows], y[rows]


def project(X: np.ndarray, seed: int, fit_cap: int) -> np.ndarray:
    """The default projection, fitted on at most ``fit_cap`` rows (as the job's fit sample) and applied to all."""
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(len(X), size=min(fit_cap, len(X)), replace=False))
    settings = {**ReduceConfig(random_state=seed).model_dump(), "backend": "umap-learn"}
    projection = make_projection(**settings)
    projection.fit(X[fit_rows])
    return np.asarray(projection.transform(X) if len(fit_rows) < len(X) else projection.embedding_, np.float32)


def fit_labels(Z: np.ndarray, scale: float, seed: int, rows: np.ndarray | None = None) -> np.ndarray:
    fit_on = Z if rows is None else Z[rows]
    cfg = ClusterConfig(covariance_prior_scale=scale, random_state=seed, prior_covariance="data")
    mixture = make_clusterer(cfg, fit_on, device="cpu").fit(fit_on)
    return np.asarray(mixture.predict(Z))


def criteria(X: np.ndarray, Z: np.ndarray, labels: np.ndarray, scale: float, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(X), size=min(2000, len(X)), replace=False))
    halves = rng.permutation(len(Z))
    a = fit_labels(Z, scale, seed, np.sort(halves[: len(Z) // 2]))
    b = fit_labels(Z, scale, seed + 1, np.sort(halves[len(Z) // 2 :]))
    Xn = X[index] / np.linalg.norm(X[index], axis=1, keepdims=True)
    distinct = len(np.unique(labels[index])) > 1
    return {
        "silhouette": input_silhouette(X, labels, index),
        "stability": float(adjusted_rand_score(a, b)),
        "calinski": float(calinski_harabasz_score(Xn, labels[index])) if distinct else 0.0,
        "davies": float(davies_bouldin_score(Xn, labels[index])) if distinct else float("inf"),
    }


def run(args: argparse.Namespace) -> None:
    sets = read_embedding_sets(args.embeddings)
    head = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count()}
    for seed in args.seeds:
        for case, X, y in cases(sets, args.sizes, args.subsets if seed == args.seeds[0] else 0, seed, args.only):
            start = time.perf_counter()
            Z = project(X, seed, args.fit_cap)
            umap_s = time.perf_counter() - start
            for c in args.prior_scales:
                scale = c if args.absolute else c * len(X)
                start = time.perf_counter()
                labels = fit_labels(Z, scale, seed)
                fit_s = time.perf_counter() - start
                scores = score_clusters(y, labels)
                line = {
                    **head,
                    "case": case,
                    "n": len(X),
                    "n_classes": int(scores["n_classes"]),
                    "seed": seed,
                    "prior_c": c,
                    "prior_scale": round(scale, 3),
                    "n_clusters": int(scores["n_clusters"]),
                    **{k: round(float(scores[k]), 4) for k in ("acc", "nmi", "ari")},
                    **{k: round(v, 4) for k, v in criteria(X, Z, labels, scale, seed).items()},
                    "umap_s": round(umap_s, 1),
                    "fit_s": round(fit_s, 2),
                }
                print(json.dumps(line), flush=True)


def summary(path: str) -> None:
    """Per criterion: the choice's clusters and accuracy in every case, and the share of cases within 20% of K."""
    rows = read_json_lines(path)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["seed"]), []).append(row)
    print("| case | seed | classes | best acc (K) | " + " | ".join(f"{c}: K, acc" for c in CRITERIA) + " |")
    print("|---" * (4 + len(CRITERIA)) + "|")
    hits = {c: [] for c in CRITERIA}
    accs = {c: [] for c in CRITERIA}
    for (case, seed), grid in sorted(groups.items()):
        best = max(grid, key=lambda r: r["acc"])
        cells = []
        for name, pick in CRITERIA.items():
            chosen = pick(grid, key=lambda r, name=name: r[name])
            k, truth = chosen["n_clusters"], chosen["n_classes"]
            hits[name].append(abs(k - truth) <= 0.2 * truth)
            accs[name].append(chosen["acc"])
            cells.append(f"{k}, {chosen['acc']:.3f}")
        lead = f"| {case} | {seed} | {grid[0]['n_classes']} | {best['acc']:.3f} ({best['n_clusters']}) | "
        print(lead + " | ".join(cells) + " |")
    print()
    for name in CRITERIA:
        print(f"{name}: K within 20% in {sum(hits[name])}/{len(hits[name])} cases, mean acc {np.mean(accs[name]):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", nargs="+", default=[], help="name=path of a run's embeddings (with labels)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 27000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subsets", type=int, default=3, help="class subsets (3-4 classes) per set, first seed only")
    p.add_argument(
        "--prior-scales",
        type=float,
        nargs="+",
        default=[0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064],
        help="per-scene prior scales c (covariance_prior_scale = c x n)",
    )
    p.add_argument("--absolute", action="store_true", help="the grid is of plain covariance_prior_scale values")
    p.add_argument("--fit-cap", type=int, default=10000, help="UMAP is fitted on at most this many rows")
    p.add_argument("--only", nargs="+", help="sets whose own cases run (the union always uses every set)")
    p.add_argument("--summary", help="summarise a JSON-lines file of this script instead of running")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
    elif args.embeddings:
        run(args)
    else:
        sys.exit("give --embeddings name=path ... or --summary FILE")


if __name__ == "__main__":
    main()
