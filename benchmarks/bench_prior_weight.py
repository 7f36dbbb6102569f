"""The neighbourhood prior's weight: per scene of a cluster of mean size (the job's), or per scene of the archive.

The neighbourhood prior (``cluster.prior_covariance: neighbourhoods``) refits the DP-GMM with a Wishart scale
matrix of ``w x`` the mean covariance of neighbourhoods a tenth of a cluster wide. A component of ``n_k`` scenes
adds that matrix over ``n_k`` to its own covariance. Until the twenty-second session ``w`` was ``0.4 x n``, ``n``
the fitted scenes: for ``K`` clusters of mean size the inflation is ``0.4 K`` neighbourhood covariances, so it
grew with the number of classes (22 classes counted as 13-15, 3 as 5-6). The job's rule is now
``neighbourhood_weight x n / K``, ``K`` the previous fit's count: the same inflation at any count. This benchmark
fits both on the same UMAP layouts of archives that the count has to follow:

- per feature set: 3 and 6 classes of 300 scenes and 10 of 200, drawn at random (seeded; ``--few``), and the whole
  set at 1,000 and 3,000 scenes (``--whole``), and at ``--big NAME=SIZE,...``;
- the union of the ``--union`` sets' classes: 15, 18, 20 and 22 classes of 100-250 scenes (``--many``; ``--many
  19x50 21x100`` are the shapes of WHU-RS19 and UC Merced). Union layouts are cached by shape and seed only: give
  each ``--union`` its own ``--layouts`` folder.

Each archive is projected once (the job's UMAP settings, umap-learn, cached under ``--layouts``); each variant
fits the job's mixture on it and drops clusters under ``cluster.min_cluster_share`` as the job does. Variants:
``cluster:W`` is the job's rule with ``neighbourhood_weight`` W; ``scene:M`` the old rule with multiplier M;
``start:K`` the job's rule with its refits started from K clusters; ``kmeans:true`` and ``kmeans:job`` k-means
told the true count or the job's. Labels only score, and tell ``kmeans:true`` its count.

    python benchmarks/bench_prior_weight.py --embeddings u-eurosat=runs/emb112-eurosat-all/embeddings \\
        u-nwpu12=runs/emb112-nwpu12/embeddings ft-eurosat=runs/emb112-eurosat-ft-nwpu12/embeddings \\
        ft-nwpu12=runs/emb112-nwpu12-ft-eurosat/embeddings --union u-eurosat u-nwpu12 \\
        --big u-eurosat=10000,20000 u-nwpu12=8400 ft-eurosat=6000 ft-nwpu12=8400 \\
        --layouts runs/prior-weight-layouts --variants scene:0.4 cluster:4 cluster:5 > runs/prior-weight.jsonl
    python benchmarks/bench_prior_weight.py --summary runs/prior-weight.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from _results import read_embedding_sets, read_json_lines  # benchmarks/ is on sys.path when run as a script
from sklearn.cluster import KMeans

from scenecluster.cluster import drop_small_clusters, make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.evaluate import score_clusters
from scenecluster.neighbourhood_prior import NeighbourhoodPriorDPGMM
from scenecluster.reduce import make_projection

FEW = ["3x300", "6x300", "10x200"]
MANY = ["15x200", "18x150", "20x250", "22x100", "22x200"]


def shapes(specs: list[str]) -> list[tuple[int, int]]:
    """``CLASSESxSCENES`` specs (``19x50``: 19 classes of 50 scenes) as (classes, scenes) pairs."""
    try:
        return [(int(c), int(s)) for c, s in (spec.lower().split("x") for spec in specs)]
    except ValueError:
        raise SystemExit(f"--few / --many: {specs} are not all CLASSESxSCENES, e.g. 19x50") from None


class PerSceneWeight(NeighbourhoodPriorDPGMM):
    """The neighbourhood prior as it was before the twenty-second session: ``weight x n``, whatever the count."""

    def prior_weight(self, n: int, count: int) -> float:
        return self.weight * n


class StartedAt(NeighbourhoodPriorDPGMM):
    """The job's rule, its refits started from ``start`` clusters instead of the data prior's first fit."""

    start = 10

    def first_fit(self, X: np.ndarray) -> tuple[Any, np.ndarray, int]:
        return None, np.zeros(len(X), dtype=int), self.start


def draw_classes(y: np.ndarray, count: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of ``count`` classes of ``y`` drawn by ``rng``, ``per_class`` scenes each (fewer where a class has)."""
    pick = rng.choice(np.unique(y), size=min(count, len(np.unique(y))), replace=False)
    return np.concatenate(
        [rng.choice(np.flatnonzero(y == c), min(per_class, int((y == c).sum())), replace=False) for c in pick]
    )


def cases(args, sets: dict[str, tuple[np.ndarray, np.ndarray]], seed: int):
    """(name, group, X, y) of every archive of one seed."""
    big = {name: [int(s) for s in sizes.split(",")] for name, sizes in (b.split("=", 1) for b in args.big)}
    for name, (X, y) in sets.items():
        for count, per_class in shapes(args.few):
            rows = draw_classes(y, count, per_class, np.random.default_rng([seed, count, per_class, len(X)]))
            yield f"{name}|{count}x{per_class}", f"{count} classes", X[rows], y[rows]
        for size in args.whole + big.get(name, []):
            rows = np.random.default_rng([seed, len(X), size]).choice(len(X), min(size, len(X)), replace=False)
            group = f"whole, {size}" if size in args.whole else "whole, large"
            yield f"{name}|whole{size}", group, X[rows], y[rows]
    if args.union:
        X = np.concatenate([sets[name][0] for name in args.union])
        y = np.concatenate([[f"{name}/{c}" for c in sets[name][1]] for name in args.union])
        many = shapes(args.many)
        span = f"{min(c for c, _ in many)}-{max(c for c, _ in many)}" if many else ""
        for count, per_class in many:
            rows = draw_classes(y, count, per_class, np.random.default_rng([seed, count, per_class]))
            yield f"union|{count}x{per_class}", f"union, {span} classes", X[rows], y[rows]


def layout(cache: Path, key: str, X: np.ndarray, seed: int) -> np.ndarray:
    """The job's UMAP projection of ``X`` (umap-learn, seeded), read from ``cache`` when it is there."""
    path = cache / f"{key.replace('|', '__')}__s{seed}.npy"
    if path.exists():
        return np.load(path)
    settings = {**ReduceConfig(random_state=seed).model_dump(), "backend": "umap-learn"}
    Z = np.asarray(make_projection(**settings).fit_transform(X), np.float32)
    np.save(path.with_suffix(".tmp.npy"), Z)
    path.with_suffix(".tmp.npy").rename(path)  # a killed run never leaves half a layout
    return Z


def fit_variant(variant: str, Z: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, list[int]]:
    """Labels (after the job's size floor) and the count path of one variant (see ``--variants``); ``y`` only
    tells ``kmeans:true`` the number of classes."""
    rule, value = variant.split(":")
    if rule == "kmeans":
        if value == "true":
            k = len(np.unique(y))
        elif value == "job":  # the job's count: its rule at the default weight
            k = len(np.unique(fit_variant(f"cluster:{ClusterConfig().neighbourhood_weight}", Z, y, seed)[0]))
        else:
            raise SystemExit(f"--variants: {variant!r}: k-means takes the true count or the job's (kmeans:true, :job)")
        return KMeans(k, n_init=10, random_state=seed).fit_predict(Z), [k]
    cfg = ClusterConfig(random_state=seed)
    model = make_clusterer(cfg, Z, device="cpu")
    if rule == "cluster":
        model.set_params(weight=float(value))
    elif rule == "scene":
        model = PerSceneWeight(model.mixture, weight=float(value), share=cfg.neighbourhood_share)
    elif rule == "start":
        model = StartedAt(model.mixture, weight=cfg.neighbourhood_weight, share=cfg.neighbourhood_share)
        model.start = int(value)
    else:
        raise SystemExit(f"--variants: {variant!r} is none of cluster:W, scene:M, start:K, kmeans:true, kmeans:job")
    labels = np.asarray(model.fit_predict(Z))
    return drop_small_clusters(model, Z, labels, cfg.min_cluster_share), [int(c) for c in model.counts_]


def run(args) -> None:
    sets = read_embedding_sets(args.embeddings)
    cache = Path(args.layouts)
    cache.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for key, group, X, y in cases(args, sets, seed):
            start = time.perf_counter()
            Z = layout(cache, key, X, seed)
            umap_s = time.perf_counter() - start
            for variant in args.variants:
                start = time.perf_counter()
                labels, counts = fit_variant(variant, Z, y, seed)
                s = score_clusters(y, labels)
                record = {
                    "case": key,
                    "group": group,
                    "seed": seed,
                    "n": len(y),
                    "classes": len(np.unique(y)),
                    "variant": variant,
                    "k": int(s["n_clusters"]),
                    **{m: round(float(s[m]), 4) for m in ("acc", "nmi", "ari")},
                    "counts": counts,
                    "fit_s": round(time.perf_counter() - start, 2),
                    "umap_s": round(umap_s, 1),
                }
                print(json.dumps(record), flush=True)


def summary(path: str) -> None:
    """Per group and variant: counts within 20% of the classes, mean accuracy, mean count against the classes,
    and (after the first variant) the fits more and less accurate (by 0.005) than the first's on the same
    archive."""
    rows = read_json_lines(path)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by_case: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        by_case[(r["case"], r["seed"])][r["variant"]] = r
    groups: dict[str, list[dict]] = defaultdict(list)
    for fits in by_case.values():
        if len(fits) == len(variants):
            groups[fits[variants[0]]["group"]].append(fits)
            groups["all"].append(fits)
    head = " | ".join(
        f"{v}: within 20%, acc, clusters / classes" + (", more / less accurate" if i else "")
        for i, v in enumerate(variants)
    )
    print(f"| archives | fits | {head} |")
    print("|---" * (len(variants) + 2) + "|")
    order = sorted(groups, key=lambda g: (g == "all", g))
    for group in order:
        fits = groups[group]
        cells = []
        for v in variants:
            within = sum(abs(f[v]["k"] - f[v]["classes"]) <= 0.2 * f[v]["classes"] for f in fits)
            acc = np.mean([f[v]["acc"] for f in fits])
            k = np.mean([f[v]["k"] for f in fits])
            classes = np.mean([f[v]["classes"] for f in fits])
            cell = f"{within}, {acc:.3f}, {k:.1f} / {classes:.1f}"
            if v != variants[0]:
                up = sum(f[v]["acc"] > f[variants[0]]["acc"] + 0.005 for f in fits)
                down = sum(f[v]["acc"] < f[variants[0]]["acc"] - 0.005 for f in fits)
                cell += f", {up} / {down}"
            cells.append(cell)
        print(f"| {group} | {len(fits)} | {' | '.join(cells)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", nargs="*", default=[], help="name=path of each set's embeddings")
    p.add_argument("--union", nargs="*", default=[], help="sets whose classes are pooled for 15-22 class archives")
    p.add_argument("--few", nargs="*", default=FEW, help="archives of one set: CLASSESxSCENES each")
    p.add_argument("--many", nargs="*", default=MANY, help="archives of the union: CLASSESxSCENES each")
    p.add_argument("--whole", type=int, nargs="*", default=[1000, 3000], help="each set sampled to these sizes")
    p.add_argument("--big", nargs="*", default=[], help="NAME=SIZE,... larger samples of a set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--variants",
        nargs="+",
        default=["scene:0.4", "cluster:4"],
        help="cluster:W the job's rule at weight W; scene:M the old rule; start:K the job's rule started from K "
        "clusters instead of the data prior's fit; kmeans:true / kmeans:job k-means told the true count / the job's",
    )
    p.add_argument("--layouts", default="prior-weight-layouts", help="folder caching each archive's projection")
    p.add_argument("--summary", help="print a Markdown table of a result file instead")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
    else:
        run(args)


if __name__ == "__main__":
    main()
