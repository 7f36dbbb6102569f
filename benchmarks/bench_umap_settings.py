"""Does a UMAP setting move the cluster count at large samples? And which classes do the extra clusters split?

The default's count on EuroSAT rises from 8-11 clusters at 1,000 scenes to 13-14 at 27,000 (``docs/benchmarks.md``).
This script fits the job's UMAP on seeded samples of ``--sizes`` scenes, once with the job's settings and once per
``--umap KEY=VALUE`` variant (set on umap-learn's estimator, e.g. ``n_epochs=500`` against its 200 above 10,000
scenes, or ``n_neighbors=90``), then the job's default mixture with its size floor (``--min-cluster-share``), and
prints one JSON line per fit: clusters, accuracy, NMI, UMAP seconds. ``--crosstab`` also prints, per class, the
clusters holding at least a tenth of it, and per cluster its two largest classes. Labels only score.

    python benchmarks/bench_umap_settings.py --embeddings runs/emb112-eurosat-all/embeddings --sizes 20000 27000 \\
        --seeds 0 1 2 --umap n_epochs=500 --min-cluster-share 0 > runs/umap-epochs.jsonl
    python benchmarks/bench_umap_settings.py --embeddings runs/emb112-eurosat-all/embeddings --sizes 3000 27000 \\
        --seeds 0 --crosstab --min-cluster-share 0
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from scenecluster.cluster import drop_small_clusters, make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.embed import read_embeddings
from scenecluster.evaluate import score_clusters
from scenecluster.reduce import make_projection


def parse_setting(text: str) -> tuple[str, int | float]:
    """``KEY=VALUE`` with a numeric value."""
    key, value = text.split("=", 1)
    return key, float(value) if "." in value else int(value)


def crosstab(y: np.ndarray, labels: np.ndarray) -> dict:
    """Per class the clusters holding at least a tenth of it (share), per cluster its size and two largest classes."""
    classes = {}
    for c in np.unique(y):
        ids, counts = np.unique(labels[y == c], return_counts=True)
        share = counts / counts.sum()
        classes[str(c)] = {int(i): round(float(s), 2) for i, s in zip(ids, share, strict=True) if s >= 0.1}
    clusters = {}
    for k in np.unique(labels):
        names, counts = np.unique(y[labels == k], return_counts=True)
        top = np.argsort(-counts)[:2]
        shares = {str(names[i]): round(float(counts[i] / counts.sum()), 2) for i in top}
        clusters[int(k)] = {"n": int(counts.sum()), **shares}
    return {"classes": classes, "clusters": clusters}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[27000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--umap", nargs="*", default=[], help="KEY=VALUE variants of umap-learn's settings")
    p.add_argument("--crosstab", action="store_true")
    p.add_argument(
        "--min-cluster-share",
        type=float,
        default=ClusterConfig().min_cluster_share,
        help="the size floor on a cluster (default: the job's; 0 measures the mixture alone)",
    )
    args = p.parse_args()
    _, X, y = read_embeddings(args.embeddings)
    y = np.asarray(y)
    variants = [None, *map(parse_setting, args.umap)]
    for seed in args.seeds:
        for size in args.sizes:
            rng = np.random.default_rng([seed, len(X)])  # bench_k_graph.py's draw of a whole set
            rows = np.sort(rng.choice(len(X), size=min(size, len(X)), replace=False))
            for variant in variants:
                settings = {**ReduceConfig(random_state=seed).model_dump(), "backend": "umap-learn"}
                projection = make_projection(**settings)
                if variant is not None:
                    projection.set_params(**dict([variant]))
                start = time.perf_counter()
                Z = np.asarray(projection.fit_transform(X[rows]), np.float32)
                umap_s = time.perf_counter() - start
                cfg = ClusterConfig(random_state=seed, min_cluster_share=args.min_cluster_share)
                model = make_clusterer(cfg, Z, device="cpu")
                labels = drop_small_clusters(model, Z, model.fit_predict(Z), cfg.min_cluster_share)
                s = score_clusters(y[rows], labels)
                record = {
                    "n": len(rows),
                    "seed": seed,
                    "umap": dict([variant]) if variant else "default",
                    "k": int(s["n_clusters"]),
                    "acc": round(float(s["acc"]), 4),
                    "nmi": round(float(s["nmi"]), 4),
                    "umap_s": round(umap_s, 1),
                }
                if args.crosstab:
                    record["crosstab"] = crosstab(y[rows], labels)
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
