"""umap-learn below 4,096 fitted scenes: its own transform, the vectorised one the job uses, and the alternative.

umap-learn fits fewer than 4,096 points with exact neighbours, computed by scikit-learn's ``pairwise_distances``
with umap's own numba metric handed over as a Python callable: one interpreted call per pair. Its ``transform``
does the same between every new scene and every fitted one, so a clustering fitted on 2,700 scenes places a
million new scenes through 2.7 billion Python calls. :func:`scenecluster.reduce.fast_small_transform` names the
metric instead, so scikit-learn computes the matrix in one vectorised call. Measured on the same draws:

- ``own_transform_s`` / ``vectorised_transform_s``: placing the draw's scenes with each;
- ``max_distance_diff`` and ``same_neighbours``: the two distance matrices, and the share of new scenes whose
  ``n_neighbors`` nearest fitted scenes are the same set;
- ``approximate_*``: the other way out, ``force_approximation_algorithm=True`` (pynndescent's index at every
  size), in this warm process; ``--fresh-process`` also times a 300-scene fit in a new process with each path,
  which is what a Ray task pays (pynndescent's descent functions cannot be kept on disk by numba).

    python benchmarks/bench_umap_small.py --embeddings runs/emb112-eurosat-all/embeddings --sizes 1000 3000 4000 \\
        --fresh-process
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np
import umap
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script
from sklearn.metrics import pairwise_distances

from scenecluster.config import ReduceConfig
from scenecluster.embed import read_embeddings
from scenecluster.jitcache import keep_umap_compiles
from scenecluster.reduce import fast_small_transform

FRESH = """
import sys, time
import numpy as np, umap
from scenecluster.jitcache import keep_umap_compiles
keep_umap_compiles()
X = np.random.default_rng(0).normal(size=(300, 384)).astype(np.float32)
start = time.perf_counter()
model = umap.UMAP(n_components=5, n_neighbors=30, min_dist=0.0, metric="cosine", random_state=0, low_memory=True,
                  n_jobs=1, force_approximation_algorithm=sys.argv[1] == "1").fit(X)
model.transform(X[:100])
print(round(time.perf_counter() - start, 2))
"""


def fitted(X: np.ndarray, *, approximate: bool, seed: int) -> tuple[umap.UMAP, float]:
    """The job's UMAP settings fitted on ``X`` by umap's exact or approximate neighbour path, and its seconds."""
    r = ReduceConfig()
    model = umap.UMAP(
        n_components=r.n_components,
        n_neighbors=r.n_neighbors,
        min_dist=r.min_dist,
        metric=r.metric,
        random_state=seed,
        low_memory=True,
        n_jobs=1,
        force_approximation_algorithm=approximate,
    )
    start = time.perf_counter()
    model.fit(X)
    return model, time.perf_counter() - start


def timed_transform(model: umap.UMAP, X: np.ndarray) -> float:
    start = time.perf_counter()
    model.transform(X)
    return round(time.perf_counter() - start, 2)


def compare_distances(own: umap.UMAP, new: np.ndarray) -> dict:
    """The distance matrices of both paths: largest difference, and how often the k nearest agree as sets."""
    k = own.n_neighbors
    a = pairwise_distances(new, own._raw_data, metric=own._input_distance_func)
    b = pairwise_distances(new, own._raw_data, metric=own.metric)
    near_a = np.sort(np.argpartition(a, k, axis=1)[:, :k], axis=1)
    near_b = np.sort(np.argpartition(b, k, axis=1)[:, :k], axis=1)
    return {
        "max_distance_diff": float(np.abs(a - b).max()),
        "same_neighbours": round(float((near_a == near_b).all(axis=1).mean()), 4),
    }


def fresh_process_seconds(approximate: bool) -> float:
    done = subprocess.run(
        [sys.executable, "-c", FRESH, "1" if approximate else "0"], capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 4000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh-process", action="store_true", help="also time a 300-scene fit in a new process")
    args = p.parse_args()
    keep_umap_compiles()
    _, X, _ = read_embeddings(args.embeddings)
    head = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count()}
    for approximate in (False, True):  # compile both paths outside the timings
        warm, _ = fitted(X[:500], approximate=approximate, seed=args.seed)
        warm.transform(X[500:600])
    for size in args.sizes:
        rows = np.random.default_rng([args.seed, size]).choice(len(X), size=size, replace=False)
        fit_rows = rows[: int(size * 0.9)]  # the job holds a tenth out for the novelty threshold
        own, fit_s = fitted(X[fit_rows], approximate=False, seed=args.seed)
        record = {**head, "fitted": len(fit_rows), "placed": size, "own_fit_s": round(fit_s, 2)}
        record["own_transform_s"] = timed_transform(own, X[rows])
        record.update(compare_distances(own, X[rows]))
        record["vectorised_transform_s"] = timed_transform(fast_small_transform(copy.deepcopy(own)), X[rows])
        approx, fit_s = fitted(X[fit_rows], approximate=True, seed=args.seed)
        record["approximate_fit_s"] = round(fit_s, 2)
        record["approximate_transform_s"] = timed_transform(approx, X[rows])
        print(json.dumps(record), flush=True)
    if args.fresh_process:
        seconds = {f"{'approximate' if a else 'own'}_s": fresh_process_seconds(a) for a in (False, True)}
        print(json.dumps({**head, "what": "300-scene fit and transform in a fresh process", **seconds}), flush=True)


if __name__ == "__main__":
    main()
