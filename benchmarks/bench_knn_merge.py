"""Can over-clustering then merging by neighbour-graph connectivity choose K for few and many classes alike?

A tried-and-rejected idea, kept so the measurement can be repeated. UMAP's fuzzy neighbour graph (``graph_``,
free after the fit) shows whether two mixture components are one blob cut in two (many edges between them) or two
separate groups. Per case of :func:`bench_k_selection.cases` the script fits the DP-GMM with a weak prior, then
merges the pair of clusters with the highest PAGA-style connectivity (edge weight between them over what random
edges would give) until none exceeds a threshold ``t``; one JSON line per (case, prior) with the clusters and
accuracy at each ``t``.

    python benchmarks/bench_knn_merge.py --embeddings eurosat=runs/eurosat-all/embeddings \\
        nwpu12=runs/nwpu12-all/embeddings > runs/knn-merge.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import scipy.sparse as sp
from _results import read_embedding_sets  # benchmarks/ is on sys.path when run as a script
from bench_k_selection import cases  # benchmarks/ is on sys.path when run as a script

from scenecluster.cluster import make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.evaluate import score_clusters
from scenecluster.reduce import make_projection


def connectivity(graph: sp.csr_matrix, labels: np.ndarray) -> np.ndarray:
    """Edge weight between each pair of clusters over its expectation under random wiring (PAGA's measure)."""
    k = labels.max() + 1
    member = sp.csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(k, len(labels)))
    between = (member @ graph @ member.T).toarray()
    degree = between.sum(1)
    ratio = between / np.maximum(np.outer(degree, degree) / degree.sum(), 1e-12)
    np.fill_diagonal(ratio, 0)
    return ratio


def merge(graph: sp.csr_matrix, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Merge the most connected pair until no pair is connected above ``threshold``."""
    labels = np.unique(labels, return_inverse=True)[1]
    while labels.max() > 0:
        ratio = connectivity(graph, labels)
        i, j = np.unravel_index(np.argmax(ratio), ratio.shape)
        if ratio[i, j] < threshold:
            break
        labels = np.unique(np.where(labels == j, i, labels), return_inverse=True)[1]
    return labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", nargs="+", required=True, help="name=path of each set")
    p.add_argument("--size", type=int, default=5000)
    p.add_argument("--priors", type=float, nargs="+", default=[0.001, 0.002, 0.004])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.3])
    args = p.parse_args()
    sets = read_embedding_sets(args.embeddings)
    for case, X, y in cases(sets, [args.size], 2, 0, None):
        projection = make_projection(**{**ReduceConfig(random_state=0).model_dump(), "backend": "umap-learn"})
        Z = np.asarray(projection.fit_transform(X), np.float32)
        graph = sp.csr_matrix(projection.graph_)
        for c in args.priors:
            cfg = ClusterConfig(covariance_prior_scale=c * len(X), random_state=0, prior_covariance="data")
            labels = np.asarray(make_clusterer(cfg, Z, device="cpu").fit_predict(Z))
            base = score_clusters(y, labels)
            row = {
                "case": case,
                "classes": int(base["n_classes"]),
                "prior_c": c,
                "k": int(base["n_clusters"]),
                "acc": round(base["acc"], 3),
            }
            for t in args.thresholds:
                merged = score_clusters(y, merge(graph, labels, t))
                row[f"t={t}"] = [int(merged["n_clusters"]), round(merged["acc"], 3)]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
