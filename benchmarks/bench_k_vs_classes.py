"""Does the number of clusters follow the number of classes? Balanced class subsets of growing size.

The issue asks for a count that holds "for a few broad classes and for many fine ones alike", and most public
scene benchmarks hold many (19-45 classes) with 50-800 scenes each. This script draws, from the union of the
given sets' classes, ``--class-counts`` classes at random (seeded) with ``--per-class`` scenes each, projects them
with the job's UMAP and fits the DP-GMM at each per-scene prior ``c``; one JSON line per (count, per-class, seed,
c) with the clusters found, the scores and the mixture's **evidence** at that prior (below). ``--full N`` adds
each whole set, sampled to N scenes, as a case. ``--summary`` prints clusters found against classes, and what
choosing ``c`` per case by the evidence gives.

The evidence is the variational lower bound with the prior's normaliser put back. scikit-learn's bound (and so
the DP-GMM's ``lower_bound_``) drops terms that are constant for a given prior; one of them, ``-K log Z(W_0,
nu_0)`` of the K Normal-Wishart priors, moves with the Wishart scale: with ``W_0^-1 = s Sigma_data`` it is ``K
nu_0 D / 2 log s`` plus a constant. With it the bound is comparable across ``s``, and its maximum is the
type-II maximum-likelihood (empirical Bayes) choice of the prior, made without labels.

    python benchmarks/bench_k_vs_classes.py --gpu224 runs/gpu224 --feature untuned__d4 \\
        --class-counts 3 6 10 15 22 --per-class 100 300 --seeds 0 1 > runs/k-vs-classes.jsonl
    python benchmarks/bench_k_vs_classes.py --summary runs/k-vs-classes.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
from _results import load_gpu224, read_json_lines  # benchmarks/ is on sys.path when run as a script

from scenecluster.cluster import make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.evaluate import score_clusters
from scenecluster.reduce import make_projection


def evidence(mixture, scale: float) -> float:
    """The DP-GMM's lower bound plus the Wishart prior normaliser's scale term (module docstring)."""
    n_features = mixture.means_.shape[1]
    correction = mixture.n_components * mixture.degrees_of_freedom_prior_ * n_features / 2 * np.log(scale)
    return float(mixture.lower_bound_ + correction)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu224", help="a gpu_transfer.py result folder (meta.json + .npy)")
    p.add_argument("--feature", default="untuned__d4")
    p.add_argument("--class-counts", type=int, nargs="*", default=[3, 6, 10, 15, 22])
    p.add_argument("--per-class", type=int, nargs="+", default=[100, 300])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--priors", type=float, nargs="+", default=[0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016])
    p.add_argument("--full", type=int, default=0, help="also each whole set, sampled to this many scenes")
    p.add_argument("--reduce", nargs="*", default=[], metavar="KEY=VALUE", help="projection settings to change")
    p.add_argument("--summary")
    args = p.parse_args()
    if args.summary:
        return summary(args.summary)
    changed = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.reduce)}
    sets = load_gpu224(args.gpu224, args.feature)
    X = np.concatenate([x for x, _ in sets.values()])
    y = np.concatenate([np.array([f"{name}/{c}" for c in labels]) for name, (_, labels) in sets.items()])
    classes = np.unique(y)
    for seed in args.seeds:
        cases = []
        for per_class in args.per_class:
            for count in args.class_counts:
                rng = np.random.default_rng([seed, per_class, count])
                pick = rng.choice(classes, size=min(count, len(classes)), replace=False)
                rows = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in pick])
                cases.append((f"{len(pick)} classes x {per_class}", len(pick), per_class, rows))
        if args.full:
            offset = 0
            for name, (x, _) in sets.items():
                rng = np.random.default_rng([seed, len(x)])
                rows = offset + np.sort(rng.choice(len(x), size=min(args.full, len(x)), replace=False))
                cases.append((name, len(np.unique(y[rows])), 0, rows))
                offset += len(x)
        for case, count, per_class, rows in cases:
            settings = {**ReduceConfig(random_state=seed).model_dump(), "backend": "umap-learn", **changed}
            start = time.perf_counter()
            Z = np.asarray(make_projection(**settings).fit_transform(X[rows]), np.float32)
            umap_s = time.perf_counter() - start
            for c in args.priors:
                scale = c * len(rows)
                cfg = ClusterConfig(covariance_prior_scale=scale, random_state=seed, prior_covariance="data")
                mixture = make_clusterer(cfg, Z, device="cpu").fit(Z)
                s = score_clusters(y[rows], np.asarray(mixture.predict(Z)))
                print(
                    json.dumps(
                        {
                            "feature": args.feature,
                            "reduce": changed,
                            "case": case,
                            "classes": count,
                            "per_class": per_class,
                            "seed": seed,
                            "prior_c": c,
                            "evidence": round(evidence(mixture, scale), 1),
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
    fits: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["case"], r["classes"], r["prior_c"])].append(r)
        fits[(r["case"], r["classes"], r["seed"])].append(r)
    for (case, count, _seed), rs in fits.items():
        if all("evidence" in r for r in rs):
            groups[(case, count, "evidence")].append(max(rs, key=lambda r: r["evidence"]))
    print("| case | classes | c | clusters found | acc | NMI |")
    print("|---|---|---|---|---|---|")
    for (case, count, c), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))):
        ks = ", ".join(str(r["k"]) for r in rs)
        if c == "evidence":
            ks = ", ".join(f"{r['k']} (c {r['prior_c']})" for r in rs)
        print(
            f"| {case} | {count} | {c} | {ks} | {np.mean([r['acc'] for r in rs]):.3f} | "
            f"{np.mean([r['nmi'] for r in rs]):.3f} |"
        )


if __name__ == "__main__":
    main()
