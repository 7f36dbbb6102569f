"""The cluster count of small archives (a few dozen to a few hundred scenes), through the job's whole fit.

A user trying the tool points it at a handful of scenes first. Fifteen EuroSAT scenes of three classes came out as
15 clusters of one scene each: the data prior's first fit found 4, and the neighbourhood prior's refits (sized for
clusters of 10 scenes or more) split every scene off. This benchmark draws small archives of ``CLASSESxSCENES``
from each labelled embedding set and fits them with :func:`scenecluster.fitted.fit_clustering`, the job's own fit
(the truncation capped at the number of different scenes, UMAP's neighbours capped at the scenes, the small-cluster
floor), under each ``--variants`` entry:

- ``job``: the settings as they ship;
- ``data``: ``cluster.prior_covariance: data`` (the first fit alone, no neighbourhood refits);
- ``refit-small``: the job's settings, the neighbourhood prior refitting whatever its mean cluster's size (as it did
  before ``NeighbourhoodPriorDPGMM.min_mean_cluster``);
- ``set:KEY=VALUE``: any other cluster setting, e.g. ``set:neighbourhood_weight=8``.

Labels only score. One line per archive, seed and variant; ``--summary`` prints a Markdown table per shape.

    python benchmarks/bench_small_archives.py --embeddings sample=runs/s35/sample-d4/embeddings \\
        nwpu30=runs/s35/nwpu30-d4/embeddings --shapes 3x5 3x10 5x6 10x3 10x6 3x30 10x15 \\
        --seeds 0 1 2 3 > runs/s35/small.jsonl
    python benchmarks/bench_small_archives.py --summary runs/s35/small.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
from _results import read_embedding_sets, read_json_lines  # benchmarks/ is on sys.path when run as a script
from bench_prior_weight import draw_classes, shapes

from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.evaluate import score_clusters
from scenecluster.fitted import fit_clustering
from scenecluster.neighbourhood_prior import MIN_NEIGHBOURS, NeighbourhoodPriorDPGMM


def settings_of(variant: str, seed: int) -> ClusterConfig:
    """The cluster settings a ``--variants`` entry names, seeded."""
    if variant in ("job", "refit-small"):
        return ClusterConfig(random_state=seed)
    if variant == "data":
        return ClusterConfig(random_state=seed, prior_covariance="data")
    if variant.startswith("set:") and "=" in variant:
        key, value = variant[4:].split("=", 1)
        return ClusterConfig.model_validate({**ClusterConfig().model_dump(), key: value, "random_state": seed})
    raise SystemExit(f"--variants: {variant!r} is none of job, data, refit-small, set:KEY=VALUE")


def run(args) -> None:
    sets = read_embedding_sets(args.embeddings)
    for name, (X, y) in sets.items():
        for classes, per_class in shapes(args.shapes):
            for seed in args.seeds:
                keep = draw_classes(y, classes, per_class, np.random.default_rng([seed, classes, per_class]))
                for variant in args.variants:
                    start = time.perf_counter()
                    NeighbourhoodPriorDPGMM.min_mean_cluster = 0 if variant == "refit-small" else MIN_NEIGHBOURS
                    fitted, clusters, _ = fit_clustering(
                        X[keep],
                        feature={},
                        reduce={**ReduceConfig(random_state=seed).model_dump(), "backend": "umap-learn"},
                        cluster=settings_of(variant, seed),
                    )
                    scores = score_clusters(y[keep], clusters)
                    line = {
                        "set": name,
                        "shape": f"{classes}x{per_class}",
                        "classes": classes,
                        "n": int(len(keep)),
                        "seed": seed,
                        "variant": variant,
                        "clusters": int(len(np.unique(clusters))),
                        "prior_counts": fitted.info.get("prior_counts"),
                        "acc": round(float(scores["acc"]), 4),
                        "nmi": round(float(scores["nmi"]), 4),
                        "seconds": round(time.perf_counter() - start, 2),
                    }
                    print(json.dumps(line), flush=True)


def summary(path: str) -> None:
    """Per shape (all sets) and variant: fits within 20% of the classes, mean accuracy, mean NMI, clusters."""
    rows = read_json_lines(path)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["shape"]].append(r)
    print("| archive (classes x scenes) | fits | " + " | ".join(f"`{v}`" for v in variants) + " |")
    print("|---" * (len(variants) + 2) + "|")
    for shape, group in sorted(groups.items(), key=lambda kv: tuple(int(x) for x in kv[0].split("x"))):
        cells = []
        for v in variants:
            fits = [r for r in group if r["variant"] == v]
            within = sum(abs(r["clusters"] - r["classes"]) <= 0.2 * r["classes"] for r in fits)
            cells.append(
                f"{within}, {np.mean([r['acc'] for r in fits]):.3f}, NMI {np.mean([r['nmi'] for r in fits]):.3f}, "
                f"{np.mean([r['clusters'] for r in fits]):.1f}"
            )
        print(f"| {shape} | {len(group) // len(variants)} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embeddings", nargs="*", default=[], help="name=path of each labelled set's embeddings")
    p.add_argument("--shapes", nargs="*", default=["3x5", "3x10", "5x6", "10x3", "10x6", "3x30", "10x15"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--variants", nargs="+", default=["job", "refit-small", "data"])
    p.add_argument("--summary", help="print a Markdown table of a result file instead")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
    else:
        run(args)


if __name__ == "__main__":
    main()
