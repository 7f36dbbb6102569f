"""Fit on a sample, assign everything: does it agree with fitting on everything, and does it flag what it never saw?

Works on the embeddings of a finished run (``embeddings.parquet`` with labels), in one process, with the same
functions the Ray job runs (:func:`scenecluster.fitted.fit_clustering`, :meth:`FittedClustering.assign`, the
held-out novelty calibration of :mod:`scenecluster.scale`):

1. the clustering fitted on every scene, against one fitted on a seeded ``--fit-sample`` and assigned to every
   scene: ARI between the two partitions, and the number of clusters of each;
2. with ``--withhold``: fitted on a sample of the other classes only, then every scene assigned: the share of
   each withheld class flagged novel, against the share of the classes it saw, and the ARI of the seen classes'
   assignments with their labels.

    python benchmarks/bench_fit_sample.py --embeddings runs/eurosat-all/embeddings --fit-sample 5000 2000 10000 \\
        --withhold Highway,River   # the withheld-classes fit uses the first sample size
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import numpy as np
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script
from sklearn.metrics import adjusted_rand_score

from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.embed import read_embeddings
from scenecluster.evaluate import score_clusters
from scenecluster.fitted import fit_clustering
from scenecluster.scale import calibration_split


def settings(
    seed: int, reduce_overrides: dict | None = None, cluster_overrides: dict | None = None
) -> tuple[dict, ClusterConfig]:
    """The job's default projection and mixture settings, with both seeded by ``seed`` (and the ``reduce`` and
    ``cluster`` sections' overrides, e.g. ``{"n_neighbors": 15}``, ``{"consensus_runs": 3}``)."""
    reduce = {**ReduceConfig().model_dump(), "backend": "umap-learn", "random_state": seed, **(reduce_overrides or {})}
    return reduce, ClusterConfig(**{"random_state": seed, **(cluster_overrides or {})})


def fit_and_assign(
    X: np.ndarray,
    fit_rows: np.ndarray,
    *,
    seed: int,
    quantile: float,
    reduce_overrides: dict | None = None,
    cluster_overrides: dict | None = None,
) -> tuple[np.ndarray, dict]:
    """Fit on ``X[fit_rows]`` (minus a calibration tenth, as the job does), assign all of ``X``."""
    reduce, cluster = settings(seed, reduce_overrides, cluster_overrides)
    fit_index, calibration = calibration_split(len(fit_rows), seed)
    start = time.perf_counter()
    fitted, _, _ = fit_clustering(
        X[fit_rows[fit_index]], feature={}, reduce=reduce, cluster=cluster, novelty_quantile=quantile
    )
    fit_s = time.perf_counter() - start
    if len(calibration):
        fitted.calibrate_novelty(X[fit_rows[calibration]], quantile)
    start = time.perf_counter()
    result = fitted.assign(X)
    return result, {
        "fit_s": round(fit_s, 1),
        "assign_s": round(time.perf_counter() - start, 1),
        "n_fit": len(fit_index),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", required=True)
    p.add_argument("--fit-sample", type=int, nargs="+", default=[5000], help="one or more sample sizes")
    p.add_argument("--withhold", default="", help="comma-separated classes left out of the fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--full-seeds",
        type=int,
        nargs="*",
        default=[],
        help="also fit on all scenes with these seeds and print how far full fits agree with each other: "
        "the ceiling of any sample fit's agreement",
    )
    p.add_argument("--novelty-quantile", type=float, default=0.01)
    p.add_argument("--cluster", nargs="*", default=[], help="KEY=VALUE overrides of the cluster section")
    args = p.parse_args()
    overrides = dict(setting(text) for text in args.cluster)
    _, X, labels = read_embeddings(args.embeddings)
    labels = np.asarray(labels)
    rng = np.random.default_rng(args.seed)
    head = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(), "n": len(X)}

    head = {**head, **({"cluster": overrides} if overrides else {})}
    full, full_clusters = fit_all(X, labels, args.seed, overrides)
    if args.full_seeds:
        print_ceiling(X, labels, head, args.seed, full_clusters, args.full_seeds, overrides)

    for fit_sample in args.fit_sample:
        rows = np.sort(rng.choice(len(X), size=min(fit_sample, len(X)), replace=False))
        assigned, timing = fit_and_assign(
            X, rows, seed=args.seed, quantile=args.novelty_quantile, cluster_overrides=overrides
        )
        sampled = score_clusters(labels, assigned["cluster"])
        print(
            json.dumps(
                {
                    **head,
                    "what": "fit on a sample, assign all vs fit on all",
                    "fit_sample": fit_sample,
                    "ari_between": round(adjusted_rand_score(full_clusters, assigned["cluster"]), 4),
                    "k_full": full["n_clusters"],
                    "k_sample": sampled["n_clusters"],
                    "full": _round(full),
                    "sample": _round({**sampled, **timing}),
                }
            ),
            flush=True,
        )

    withheld = [c for c in args.withhold.split(",") if c]
    if withheld:
        seen = ~np.isin(labels, withheld)
        pool = np.flatnonzero(seen)
        rows = np.sort(rng.choice(pool, size=min(args.fit_sample[0], len(pool)), replace=False))
        assigned, timing = fit_and_assign(
            X, rows, seed=args.seed, quantile=args.novelty_quantile, cluster_overrides=overrides
        )
        novel = {c: round(float(assigned["novel"][labels == c].mean()), 4) for c in withheld}
        print(
            json.dumps(
                {
                    **head,
                    "what": "classes withheld from the fit, all assigned",
                    "withheld": withheld,
                    "novel_share_withheld": novel,
                    "novel_share_seen": round(float(assigned["novel"][seen].mean()), 4),
                    "seen": _round({**score_clusters(labels[seen], assigned["cluster"][seen]), **timing}),
                }
            ),
            flush=True,
        )


def fit_all(X: np.ndarray, labels: np.ndarray, seed: int, overrides: dict | None = None) -> tuple[dict, np.ndarray]:
    """The clustering fitted on every scene with ``seed`` (and ``cluster`` ``overrides``): scores, cluster ids."""
    reduce, cluster = settings(seed, cluster_overrides=overrides)
    start = time.perf_counter()
    _, clusters, _ = fit_clustering(X, feature={}, reduce=reduce, cluster=cluster)
    return {**score_clusters(labels, clusters), "fit_s": round(time.perf_counter() - start, 1)}, clusters


def print_ceiling(
    X, labels, head: dict, seed: int, clusters: np.ndarray, other_seeds: list[int], overrides: dict | None = None
) -> None:
    """Full fits with other seeds against the one with ``seed``: ARI between them, and each one's K."""
    for other in other_seeds:
        scores, other_clusters = fit_all(X, labels, other, overrides)
        record = {
            **head,
            "what": "fit on all vs fit on all, another seed",
            "seeds": [seed, other],
            "ari_between": round(adjusted_rand_score(clusters, other_clusters), 4),
            "k_other": scores["n_clusters"],
            "other": _round(scores),
        }
        print(json.dumps(record), flush=True)


def setting(text: str) -> tuple[str, int | float | str]:
    """``KEY=VALUE``, the value as a number where it is one."""
    key, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def _round(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


if __name__ == "__main__":
    main()
