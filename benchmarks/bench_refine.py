"""Refine a clustering in the feature space: do the labels of the DP-GMM (fitted after UMAP) improve when each
scene takes its neighbours' vote, or a linear classifier's, in the backbone's own space? (Rejected: no.)

The idea is the cheapest self-training there is, with no fine-tuning: UMAP's boundary errors might be corrected
where the classes are linearly separable in the 384/768-d feature space. For each target of a ``gpu_transfer.py``
result folder and each seed, the job's projection and mixture (default prior per scene) are fitted on every
scene; then, on unit-length features,

- ``knn-K``: three rounds of a majority vote among each scene's K nearest neighbours (cosine);
- ``lr-S-C``: logistic regression (inverse regularisation C) trained on the most confident share S of each
  cluster (by the mixture's responsibility), predicting every scene.

One JSON line per (set, seed, method) with the scores against the folders' labels (read for scoring only).

    python benchmarks/bench_refine.py --gpu224 runs/gpu224-self --feature 'selftrain-*__d4' --seeds 0 1 2 \\
        > runs/refine.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from _results import load_gpu224  # benchmarks/ is on sys.path when run as a script
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors

from scenecluster.cluster import make_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.evaluate import score_clusters
from scenecluster.reduce import make_projection


def confident(responsibility: np.ndarray, labels: np.ndarray, share: float) -> np.ndarray:
    """The most confident ``share`` of each cluster of five scenes or more (a boolean mask)."""
    top = responsibility.max(axis=1)
    keep = np.zeros(len(labels), bool)
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        if len(rows) >= 5:
            keep[rows[top[rows] >= np.quantile(top[rows], 1 - share)]] = True
    return keep


def knn_vote(neighbours: np.ndarray, labels: np.ndarray, k: int, rounds: int = 3) -> np.ndarray:
    """Each scene takes the most common label of its ``k`` nearest other scenes, ``rounds`` times."""
    current = labels.copy()
    for _ in range(rounds):
        votes = current[neighbours[:, 1 : k + 1]]
        current = np.array([np.bincount(v).argmax() for v in votes])
    return current


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu224", required=True, help="a gpu_transfer.py result folder (meta.json + .npy)")
    p.add_argument("--feature", default="selftrain-*__d4")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    for name, (X, y) in load_gpu224(args.gpu224, args.feature).items():
        unit = X / np.linalg.norm(X, axis=1, keepdims=True)
        _, neighbours = NearestNeighbors(n_neighbors=31).fit(unit).kneighbors(unit)
        for seed in args.seeds:
            settings = {**ReduceConfig(random_state=seed).model_dump(), "backend": "umap-learn"}
            Z = np.asarray(make_projection(**settings).fit_transform(X), np.float32)
            cfg = ClusterConfig(random_state=seed, prior_covariance="data")  # the data prior per scene x len(X)
            responsibility = np.asarray(make_clusterer(cfg, Z, device="cpu").fit(Z).predict_proba(Z))
            labels = responsibility.argmax(axis=1)
            variants = {"dpgmm": labels}
            for k in (10, 30):
                variants[f"knn-{k}"] = knn_vote(neighbours, labels, k)
            for share in (0.5, 0.8):
                keep = confident(responsibility, labels, share)
                for c in (0.1, 1.0):
                    clf = LogisticRegression(C=c, max_iter=300).fit(unit[keep], labels[keep])
                    variants[f"lr-{share}-{c}"] = clf.predict(unit)
            for method, assigned in variants.items():
                s = score_clusters(y, assigned)
                record = {"set": name, "feature": args.feature, "seed": seed, "method": method}
                record.update({k: round(float(s[k]), 4) for k in ("acc", "nmi", "ari")}, k=int(s["n_clusters"]))
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
