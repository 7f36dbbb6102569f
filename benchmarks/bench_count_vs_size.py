"""The job's cluster count and accuracy at each archive size, with every default as it ships.

Issue 10 asks for K within 20% of the truth at 1,000, 3,000, 10,000 and all 27,000 EuroSAT scenes. Earlier
benchmarks measured the mixture on its own (``make_clusterer`` on every scene); this one runs what
``scenecluster cluster`` does to an archive of that size: a seeded draw of ``size`` scenes stands for the archive,
the job's fit (:func:`scenecluster.fitted.fit_clustering`: UMAP, the DP-GMM with its neighbourhood prior, the
size floor) sees at most ``scale.fit_sample`` of them less the novelty hold-out, and every scene of the archive
is then assigned and scored against its folder label. One seed seeds the draw, the projection and the mixture.

    python benchmarks/bench_count_vs_size.py --embeddings eurosat=runs/emb112-eurosat-all/embeddings \\
        --sizes 1000 3000 10000 27000 --seeds 0 1 2 > runs/count-vs-size.jsonl
    python benchmarks/bench_count_vs_size.py --summary runs/count-vs-size.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections import defaultdict

import numpy as np
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script
from _results import read_embedding_set, read_json_lines
from bench_fit_sample import fit_and_assign, setting

from scenecluster.config import ScaleConfig
from scenecluster.evaluate import score_clusters


def archive_rows(n: int, size: int, seed: int) -> np.ndarray:
    """The rows of a seeded ``size``-scene archive drawn from ``n`` (all of them when ``size >= n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, size]).choice(n, size=size, replace=False))


def job_fit_rows(n: int, fit_sample: int, seed: int) -> np.ndarray:
    """The archive rows the job's fit draws: all of them up to ``fit_sample``, else a seeded sample."""
    if n <= fit_sample:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=fit_sample, replace=False))


def class_pool(labels: np.ndarray, classes: int, seed: int) -> np.ndarray:
    """The rows of ``classes`` seeded classes of ``labels`` (every row when ``classes`` is 0)."""
    if not classes:
        return np.arange(len(labels))
    chosen = np.random.default_rng([seed, classes]).choice(np.unique(labels), size=classes, replace=False)
    return np.flatnonzero(np.isin(labels, chosen))


def run(
    name: str,
    path: str,
    sizes: list[int],
    seeds: list[int],
    fit_sample: int,
    quantile: float,
    reduce: dict,
    classes: int = 0,
    cluster: dict | None = None,
) -> None:
    """One JSON line per (size, seed): clusters found, the truth, and the scores of every assigned scene. With
    ``classes``, each seed's archive is drawn from that many of the set's classes only."""
    X, labels = read_embedding_set(path)  # path#cls: the CLS half of cls+mean
    head = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count()}
    for size in sizes:
        for seed in seeds:
            pool = class_pool(labels, classes, seed)
            rows = pool[archive_rows(len(pool), size, seed)]
            Xa, ya = X[rows], labels[rows]
            fit_rows = job_fit_rows(len(rows), fit_sample, seed)
            assigned, timing = fit_and_assign(
                Xa, fit_rows, seed=seed, quantile=quantile, reduce_overrides=reduce, cluster_overrides=cluster
            )
            scores = score_clusters(ya, assigned["cluster"])
            record = {
                **head,
                "set": f"{name}[{classes} classes]" if classes else name,
                "size": len(rows),
                "seed": seed,
                "classes": int(len(np.unique(ya))),
                "fit_sample": fit_sample,
                **({"reduce": reduce} if reduce else {}),
                **({"cluster": cluster} if cluster else {}),
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()},
                **timing,
            }
            print(json.dumps(record), flush=True)


def summary(path: str) -> None:
    """A Markdown table: per set and size, the clusters of each seed and the mean accuracy, NMI and ARI."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in read_json_lines(path):
        groups[(r["set"], r["size"])].append(r)
    print("| target | scenes | classes | clusters per seed | within 20% | acc (mean) | NMI | ARI |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, size), rs in sorted(groups.items()):  # one variant per file
        truth = rs[0]["classes"]
        ks = [r["n_clusters"] for r in sorted(rs, key=lambda r: r["seed"])]
        within = sum(abs(k - truth) <= 0.2 * truth for k in ks)
        mean = {m: np.mean([r[m] for r in rs]) for m in ("acc", "nmi", "ari")}
        print(
            f"| {name} | {size:,} | {truth} | {' / '.join(map(str, ks))} | {within} of {len(ks)} "
            f"| {mean['acc']:.3f} | {mean['nmi']:.3f} | {mean['ari']:.3f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", nargs="*", default=[], help="name=path of each set's embeddings")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 27000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fit-sample", type=int, default=ScaleConfig().fit_sample, help="the job's scale.fit_sample")
    p.add_argument("--novelty-quantile", type=float, default=ScaleConfig().novelty_quantile)
    p.add_argument("--reduce", nargs="*", default=[], help="KEY=VALUE overrides of the reduce section")
    p.add_argument("--cluster", nargs="*", default=[], help="KEY=VALUE overrides of the cluster section")
    p.add_argument("--classes", type=int, default=0, help="draw each archive from this many seeded classes")
    p.add_argument("--summary", help="print a Markdown table of a result file instead")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
        return
    if not args.embeddings:
        p.error("give --embeddings name=path (or --summary FILE)")
    reduce = dict(setting(o) for o in args.reduce)
    cluster = dict(setting(o) for o in args.cluster)
    for spec in args.embeddings:
        name, _, path = spec.partition("=")
        run(name, path, args.sizes, args.seeds, args.fit_sample, args.novelty_quantile, reduce, args.classes, cluster)


if __name__ == "__main__":
    main()
