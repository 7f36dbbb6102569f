"""What does the size floor on a cluster (``cluster.min_cluster_share``) cost a rare class?

Each case: every class of the set at ``--per-class`` scenes except one, the rare class, at ``--rare`` scenes (every
``--every``-th class takes its turn). The job's UMAP and default mixture are fitted once; then the clusters under
each ``--shares`` share of the scenes are dropped (:func:`scenecluster.cluster.drop_small_clusters`, as the job
does) and the partition is scored: clusters, accuracy, and whether the rare class has a cluster of its own (one
holding at least half of it, at least half of which it is). One JSON line per case.

    python benchmarks/bench_rare_class.py --embeddings runs/emb112-eurosat-all/embeddings --rare 40 100 \\
        > runs/rare-class.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np

from scenecluster.cluster import drop_small_clusters, make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.embed import read_embeddings
from scenecluster.evaluate import score_clusters
from scenecluster.reduce import make_projection


def has_own_cluster(is_rare: np.ndarray, labels: np.ndarray) -> bool:
    """Whether one cluster holds at least half the rare class and is at least half rare scenes."""
    for k in np.unique(labels[is_rare]):
        if (labels[is_rare] == k).mean() >= 0.5 and is_rare[labels == k].mean() >= 0.5:
            return True
    return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", required=True)
    p.add_argument("--rare", type=int, nargs="+", default=[40, 100], help="scenes of the rare class")
    p.add_argument("--per-class", type=int, default=2000)
    p.add_argument("--every", type=int, default=2, help="every n-th class takes a turn as the rare one")
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.002, 0.005, 0.01])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    _, X, y = read_embeddings(args.embeddings)
    y = np.asarray(y)
    classes = np.unique(y)
    for rare in classes[:: args.every]:
        for n_rare in args.rare:
            rng = np.random.default_rng([args.seed, n_rare, len(rare)])
            sizes = [n_rare if c == rare else args.per_class for c in classes]
            rows = np.concatenate(
                [rng.choice(np.flatnonzero(y == c), n, replace=False) for c, n in zip(classes, sizes, strict=True)]
            )
            settings = {**ReduceConfig(random_state=args.seed).model_dump(), "backend": "umap-learn"}
            Z = np.asarray(make_projection(**settings).fit_transform(X[rows]), np.float32)
            cfg = ClusterConfig(random_state=args.seed, min_cluster_share=0.0)
            model = make_clusterer(cfg, Z, device="cpu")
            labels = model.fit_predict(Z)
            record = {"rare": str(rare), "n_rare": n_rare, "rare_share": round(n_rare / len(rows), 4)}
            for share in args.shares:
                pruned = drop_small_clusters(copy.deepcopy(model), Z, labels, share)
                s = score_clusters(y[rows], pruned)
                record[str(share)] = {
                    "k": int(s["n_clusters"]),
                    "acc": round(float(s["acc"]), 4),
                    "rare_found": has_own_cluster(y[rows] == rare, pruned),
                }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
