"""Pseudo-labels for self-training: cluster a target's features, keep each cluster's densest scenes.

Issue 10's self-training option: after a first clustering, fine-tune on the target's most confident
assignments. Two earlier tries (see the issue) found that pseudo-labels from the default clustering lock in
its merges, while an *over-segmented* clustering did better; so the pseudo-labels come from the job's
projection and DP-GMM with a weaker covariance prior (``--prior-per-scene``, a quarter of the default), and
fine-tuning may later merge what it split, but cannot split what it was told is one class.

"Confident" is the mixture's own log-likelihood (``score_samples``): responsibilities after UMAP are nearly
all 1.0, so they cannot rank scenes, while the density marks each cluster's core against its fringe. The
``keep`` fraction of each cluster's scenes is kept; clusters under ``--min-size`` kept scenes are dropped.

Writes ``{"labels": {path: cluster}, ...}``. Labels of the target are read only to report the kept set's purity
(``purity_score_only``), never to choose anything. The selection is the product's
(:func:`scenecluster.self_train.select_pseudo_labels`); ``--fit-sample N`` fits on a seeded sample of ``N`` less
the job's held-out tenth, as ``scenecluster pipeline`` does (its pseudo-labels come from the run's fit sample),
where the default fits on every scene, as the GPU benchmark's pseudo-labels did.

    python benchmarks/pseudo_labels.py --embeddings runs/gpu224/emb/eurosat__tuned-nwpu12__one.parquet \\
        --output .gpuxfer/pseudo-eurosat.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench_options import umap  # benchmarks/ is on sys.path when run as a script

from scenecluster.cluster import make_clusterer
from scenecluster.config import ClusterConfig
from scenecluster.embed import read_embeddings
from scenecluster.scale import calibration_split
from scenecluster.self_train import pseudo_label_purity, select_pseudo_labels


def fit_rows(n: int, fit_sample: int | None, seed: int) -> np.ndarray:
    """Every row, or the rows the job would fit on: a seeded sample of ``fit_sample``, less the held-out tenth."""
    if fit_sample is None:
        return np.arange(n)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, fit_sample), replace=False))
    return sample[calibration_split(len(sample), seed)[0]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", required=True)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-sample", type=int, help="fit on a seeded sample of this many, as the pipeline does")
    p.add_argument("--prior-per-scene", type=float, default=0.001)
    p.add_argument("--keep", type=float, default=0.5, help="fraction of each cluster kept (densest first)")
    p.add_argument("--min-size", type=int, default=50, help="clusters with fewer kept scenes are dropped")
    args = p.parse_args()
    paths, X, truth = read_embeddings(args.embeddings)
    rows = fit_rows(len(paths), args.fit_sample, args.seed)
    Z = umap(X[rows], args.seed)
    model = make_clusterer(
        ClusterConfig(random_state=args.seed, prior_per_scene=args.prior_per_scene, prior_covariance="data"),
        Z,
        device="cpu",
    )
    labels = np.asarray(model.fit_predict(Z))
    index, pseudo = select_pseudo_labels(labels, model.score_samples(Z), keep=args.keep, min_size=args.min_size)
    kept = {paths[rows[i]]: int(c) for i, c in zip(index, pseudo, strict=True)}
    report = {
        "embeddings": args.embeddings,
        "seed": args.seed,
        "fit_sample": args.fit_sample,
        "fitted": len(rows),
        "prior_per_scene": args.prior_per_scene,
        "keep": args.keep,
        "clusters_found": int(len(np.unique(labels))),
        "pseudo_classes": int(len(set(kept.values()))),
        "kept": len(kept),
        "of": len(paths),
    }
    if truth is not None:  # how pure the kept set is, and how many true classes it covers: reported only
        report.update(pseudo_label_purity([truth[rows[i]] for i in index], pseudo.tolist()))
    print(json.dumps(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({**report, "labels": kept}))


if __name__ == "__main__":
    main()
