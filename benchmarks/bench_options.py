"""Which options lift label-free accuracy on unseen targets? Every option beside the references, per seed.

Works on the embeddings of finished runs (``embeddings`` folders or files with labels, read only to score). A
*feature* is one embeddings folder (``name=path``; names that share the part before ``+`` are the same scenes
embedded differently, e.g. ``eurosat=...`` and ``eurosat+d4=...`` with ``--views d4``); the rows compared are the
scenes all of a set's features hold, in path order, so each option sees the same seeded sample. Per feature and
seed the script fits:

``default``
    the job's projection (UMAP, cosine, 5 dims, 30 neighbours) and DP-GMM with its default prior;
``whiten``
    PCA-whitening to ``--whiten-dims`` before the same UMAP (each direction of variance weighted alike);
``umap-ensemble``
    three UMAP projections with different seeds, concatenated, then the DP-GMM: a cluster the projections agree
    on stays one, a split that one seed's layout invents is outvoted;
``kmeans-true-k``
    k-means with the true number of classes on the default projection: an oracle on K, the reference a
    reader asks for (it uses the labels' count, which no real archive has).

``--subsets N`` adds N subsets of 3-4 classes of each set and ``--union`` a sample of all sets' classes together
(the cases of ``bench_k_selection.py``): an option must hold for a few broad classes and for many fine ones.
One JSON line per (feature, option, seed); ``--summary`` prints the mean and spread per (feature, option).

    python benchmarks/bench_options.py --embeddings eurosat=runs/opt-eurosat/embeddings \\
        eurosat+d4=runs/opt-eurosat-d4/embeddings --seeds 0 1 2 > runs/options.jsonl
    python benchmarks/bench_options.py --summary runs/options.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script
from _results import read_json_lines
from bench_k_selection import cases
from sklearn.decomposition import PCA

from scenecluster.cluster import make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.embed import read_embeddings
from scenecluster.evaluate import score_clusters
from scenecluster.reduce import make_projection

_PROJECTIONS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def umap(X: np.ndarray, seed: int) -> np.ndarray:
    """The job's UMAP of ``X``; the same (array, seed) is projected once (``default`` and the oracle share it).

    The cache holds ``X`` itself, so its id cannot be reused by another array while the entry lives.
    """
    key = (id(X), seed)
    if key not in _PROJECTIONS:
        settings = {**ReduceConfig(random_state=seed).model_dump(), "backend": "umap-learn"}
        _PROJECTIONS[key] = (X, np.asarray(make_projection(**settings).fit_transform(X), np.float32))
    return _PROJECTIONS[key][1]


def dpgmm(Z: np.ndarray, seed: int) -> np.ndarray:
    """The DP-GMM with the data prior, as every option in docs/benchmarks.md was measured (the neighbourhood prior,
    the job's default since, is set beside it by ``bench_k_graph.py``)."""
    cfg = ClusterConfig(random_state=seed, prior_covariance="data")
    return np.asarray(make_clusterer(cfg, Z, device="cpu").fit_predict(Z))


def option_default(X: np.ndarray, y: np.ndarray, seed: int, args) -> np.ndarray:
    return dpgmm(umap(X, seed), seed)


def option_whiten(X: np.ndarray, y: np.ndarray, seed: int, args) -> np.ndarray:
    W = PCA(n_components=min(args.whiten_dims, X.shape[1]), whiten=True, random_state=seed).fit_transform(X)
    return dpgmm(umap(W.astype(np.float32), seed), seed)


def option_umap_ensemble(X: np.ndarray, y: np.ndarray, seed: int, args) -> np.ndarray:
    Z = np.concatenate([umap(X, seed * 100 + k) for k in range(3)], axis=1)
    return dpgmm(Z, seed)


def option_kmeans_true_k(X: np.ndarray, y: np.ndarray, seed: int, args) -> np.ndarray:
    cfg = ClusterConfig(method="kmeans", n_components=len(np.unique(y)), random_state=seed)
    Z = umap(X, seed)
    return np.asarray(make_clusterer(cfg, Z, device="cpu").fit_predict(Z))


OPTIONS: dict[str, Callable] = {
    "default": option_default,
    "whiten": option_whiten,
    "umap-ensemble": option_umap_ensemble,
    "kmeans-true-k": option_kmeans_true_k,
}


def load_features(specs: list[str], sample: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name=path`` -> (X, labels) on the scenes every feature of the same set holds, a seeded sample of them."""
    raw = {}
    for spec in specs:
        name, path = spec.split("=", 1)
        paths, X, y = read_embeddings(path)
        raw[name] = {p: (x, label) for p, x, label in zip(paths, X, y, strict=True)}
    out = {}
    for name, rows in raw.items():
        base = name.split("+")[0]
        common = sorted(set.intersection(*(set(r) for n, r in raw.items() if n.split("+")[0] == base)))
        pick = np.random.default_rng(seed).permutation(len(common))[: min(sample, len(common))]
        chosen = [common[i] for i in np.sort(pick)]
        out[name] = (np.stack([rows[p][0] for p in chosen]), np.array([rows[p][1] for p in chosen]))
    return out


def run(args: argparse.Namespace) -> None:
    loaded = load_features(args.embeddings, args.sample, args.sample_seed)
    features = dict(loaded)
    if args.subsets or args.union:
        sets = {name: data for name, data in loaded.items() if "+" not in name}
        if args.cases_only:
            features = {}
        for case, X, y in cases(sets, [], args.subsets, args.sample_seed, None):
            if case != "union" or args.union:
                features[case] = (X, y)
        if args.variant_subsets:  # each feature's own subsets, drawn alike: a set's variants get the same ones
            for name, data in loaded.items():
                for case, X, y in cases({name: data}, [], args.subsets, args.sample_seed, None):
                    features.setdefault(f"{case}*", (X, y))
    head = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count()}
    for name, (X, y) in features.items():
        for option in args.options:
            for seed in args.seeds:
                start = time.perf_counter()
                labels = OPTIONS[option](X, y, seed, args)
                scores = score_clusters(y, labels)
                line = {
                    **head,
                    "feature": name,
                    "option": option,
                    "seed": seed,
                    "n": len(X),
                    "n_classes": int(scores["n_classes"]),
                    "n_clusters": int(scores["n_clusters"]),
                    **{k: round(float(scores[k]), 4) for k in ("acc", "nmi", "ari")},
                    "seconds": round(time.perf_counter() - start, 1),
                }
                print(json.dumps(line), flush=True)


def summary(path: str) -> None:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in read_json_lines(path):
        groups[(r["feature"], r["option"])].append(r)
    print("| feature | option | seeds | clusters (truth) | acc | NMI | ARI |")
    print("|---|---|---|---|---|---|---|")
    for (feature, option), rows in groups.items():

        def cell(key: str, rows=rows) -> str:
            values = np.array([r[key] for r in rows], float)
            return f"{values.mean():.3f} ± {values.std():.3f}"

        ks = ", ".join(str(r["n_clusters"]) for r in rows)
        print(
            f"| {feature} | {option} | {len(rows)} | {ks} ({rows[0]['n_classes']}) | "
            f"{cell('acc')} | {cell('nmi')} | {cell('ari')} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", nargs="+", default=[], help="name=path of each feature")
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sample", type=int, default=5000, help="scenes per set (a seeded sample)")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--whiten-dims", type=int, default=64)
    p.add_argument("--subsets", type=int, default=0, help="also this many 3-4-class subsets of each set")
    p.add_argument("--union", action="store_true", help="also a sample of the union of the sets' classes")
    p.add_argument("--cases-only", action="store_true", help="only the subsets and the union, not the sets")
    p.add_argument(
        "--variant-subsets",
        action="store_true",
        help="also the subsets of every feature, variants included, each drawn as if its set came first (same "
        "classes and rows for a set's variants); named <case>*",
    )
    p.add_argument("--summary", help="print the table of a finished run's JSON lines")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
    elif args.embeddings:
        run(args)
    else:
        sys.exit("give --embeddings name=path ... or --summary FILE")


if __name__ == "__main__":
    main()
