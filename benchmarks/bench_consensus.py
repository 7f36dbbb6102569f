"""Does a consensus over UMAP seeds bring the cluster count nearer the classes, for few and many classes alike?

UMAP draws a broad class as several sub-blobs and the mixture counts each, so archives of 3-6 classes get 5-12
clusters. Where a sub-blob ends moves with UMAP's seed, while two classes stay apart in every seed; merging the
clusters that other seeds keep together (:func:`scenecluster.consensus.merge_co_associated`) should undo the
first and leave the second. It can only merge, so it must also be checked where the count is already right or
too low: whole sets of 10-12 classes and the union of both sets' classes (22).

Per case (a seeded archive: ``classes`` classes of a set with ``per`` scenes each, or ``per`` scenes of the whole
set; ``union`` draws from both untuned sets' classes) and seed: the job's fit and assignment
(:func:`bench_fit_sample.fit_and_assign`) with ``--runs`` seeds (seed, seed + 100, ...); the first run's clusters
alone, then merged by the next 2 and the next 4 runs at each ``--thresholds`` value. One JSON line each; labels
only score. ``--summary`` prints the table of ``docs/benchmarks.md``.

    python benchmarks/bench_consensus.py --embeddings eurosat=runs/emb112-eurosat-all/embeddings \\
        nwpu12=runs/emb112-nwpu12/embeddings eurosat-ft=runs/emb112-eurosat-ft-nwpu12/embeddings \\
        nwpu12-ft=runs/emb112-nwpu12-ft-eurosat/embeddings --union eurosat nwpu12 --seeds 2 3 4 > runs/consensus.jsonl
    python benchmarks/bench_consensus.py --summary runs/consensus.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections import defaultdict

import numpy as np
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script
from _results import read_embedding_sets, read_json_lines
from bench_count_vs_size import archive_rows, class_pool, job_fit_rows
from bench_fit_sample import fit_and_assign

from scenecluster.consensus import apply_merges, merge_co_associated
from scenecluster.evaluate import score_clusters

PLAN = ((3, 300), (4, 300), (6, 300), (0, 3000))  # (classes, scenes per class), or (0: the whole set, scenes)
UNION = (22, 200)


def scores(y: np.ndarray, labels: np.ndarray) -> list:
    """``[clusters, acc, nmi, ari]``, rounded."""
    s = score_clusters(y, labels)
    return [int(s["n_clusters"]), round(s["acc"], 3), round(s["nmi"], 3), round(s["ari"], 3)]


def load(specs: list[str], union: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name=path`` embeddings with their labels, plus ``union`` (the named sets' rows, labels prefixed)."""
    sets = {name: (X, labels.astype(str)) for name, (X, labels) in read_embedding_sets(specs).items()}
    if union:
        parts = [sets[name] for name in union]
        sets["union"] = (
            np.concatenate([X for X, _ in parts]),
            np.concatenate([np.char.add(f"{name}:", y) for name, (_, y) in zip(union, parts, strict=True)]),
        )
    return sets


def run(args) -> None:
    sets = load(args.embeddings, args.union)
    head = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count()}
    plan = [(name, c, per) for name in sets if name != "union" for c, per in PLAN]
    plan += [("union", *UNION)] if args.union else []
    for seed in args.seeds:
        for name, classes, per in plan:
            X, labels = sets[name]
            pool = class_pool(labels, classes, seed) if classes else np.arange(len(labels))
            rows = pool[archive_rows(len(pool), classes * per if classes else per, seed)]
            fit_rows = job_fit_rows(len(rows), args.fit_sample, seed)
            runs = [
                np.asarray(fit_and_assign(X[rows], fit_rows, seed=seed + 100 * r, quantile=0.01)[0]["cluster"])
                for r in range(args.runs)
            ]
            y = labels[rows]
            record = {
                **head,
                "set": name,
                "classes": int(len(np.unique(y))),
                "seed": seed,
                "size": int(len(rows)),
                "first": scores(y, runs[0]),
                "other_k": [int(len(np.unique(o))) for o in runs[1:]],
            }
            for n_others in sorted({2, args.runs - 1}):
                for threshold in args.thresholds:
                    into = merge_co_associated(runs[0], runs[1 : 1 + n_others], threshold)
                    labels_after = apply_merges(runs[0], into)
                    record[f"r{n_others + 1}t{threshold}"] = scores(y, labels_after)
            print(json.dumps(record), flush=True)


def summary(path: str) -> None:
    """Per kind of case (few classes, whole sets, the union): the first run against each consensus variant."""
    records = read_json_lines(path)
    variants = ["first"] + sorted(k for k in records[0] if k.startswith("r") and "t" in k[1:] and k[1].isdigit())
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        kind = "union (22)" if r["set"] == "union" else f"{r['classes']} classes" if r["classes"] <= 6 else "whole set"
        groups[kind].append(r)
    print("| archives | fits | variant | within 20% | mean acc | mean NMI | clusters minus classes | acc up / down |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in sorted(groups, key=lambda k: (k.startswith(("whole", "union")), k)):
        rs = groups[kind]
        for v in variants:
            within = sum(abs(r[v][0] - r["classes"]) <= 0.2 * r["classes"] for r in rs)
            up = sum(r[v][1] > r["first"][1] + 1e-9 for r in rs)
            down = sum(r[v][1] < r["first"][1] - 1e-9 for r in rs)
            print(
                f"| {kind} | {len(rs)} | {v} | {within} | {np.mean([r[v][1] for r in rs]):.3f} "
                f"| {np.mean([r[v][2] for r in rs]):.3f} | {np.mean([r[v][0] - r['classes'] for r in rs]):+.1f} "
                f"| {up} / {down} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", nargs="*", default=[], help="name=path of each set's embeddings")
    p.add_argument("--union", nargs="*", default=[], help="sets (of one backbone) whose classes form a union case")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", type=int, default=5, help="fits per case: the first and the others that vote")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    p.add_argument("--fit-sample", type=int, default=20000)
    p.add_argument("--summary", help="print the Markdown table of a result file instead")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
    else:
        run(args)


if __name__ == "__main__":
    main()
