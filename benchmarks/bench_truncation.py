"""Archives of more classes than the DP-GMM's truncation: the count with a fixed truncation and with it grown.

``cluster.n_components`` (50) is the most clusters one fit can use. Scene sets with about that many classes or
more exist (RESISC45: 45, Million-AID: 51, fMoW: 62) but this project holds none, so the classes here are
synthetic, in two settings:

- ``mixture``: the job's clusterer alone on far-apart round blobs in 5-d (UMAP's output dimension), ``per_class``
  scenes each;
- ``job``: the job's whole fit (:func:`scenecluster.fitted.fit_clustering`: UMAP with the default settings, the
  neighbourhood prior, the 0.5% floor) on 64-d class features (random class centres, unit noise), scored against
  the classes.

Each runs once with the truncation fixed (``cluster.grow_truncation: false``, the behaviour before
:func:`scenecluster.cluster.fit_clusterer`) and once as the job ships.

    python benchmarks/bench_truncation.py --classes 10 30 45 60 90 --seeds 0 1 2 > runs/truncation.jsonl
    python benchmarks/bench_truncation.py --setting job --classes 22 45 60 --per-class 150 --seeds 0 1 2 >> ...
    python benchmarks/bench_truncation.py --summary runs/truncation.jsonl

and image archives through the job itself (60 classes of one colour each, :func:`write_solid`, or of striped
images, :func:`write_stripes`):

    python benchmarks/bench_truncation.py --write-solid /tmp/solid60 --classes 60 --per-class 40
    python benchmarks/bench_truncation.py --write-stripes /tmp/stripes60x80 --classes 60 --per-class 80
    scenecluster cluster /tmp/stripes60x80 --labels folders --image-size 56 --views one -o runs/stripes60x80
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections import defaultdict

import numpy as np
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script
from _results import read_json_lines

from scenecluster.cluster import fit_clusterer
from scenecluster.config import ClusterConfig, ReduceConfig
from scenecluster.evaluate import score_clusters
from scenecluster.fitted import fit_clustering


def blobs(k: int, per_class: int, dims: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` classes of ``per_class`` scenes around uniform random centres in ``[-spread, spread]^dims``, unit
    noise (5-d: 0.5)."""
    rng = np.random.default_rng([seed, k])
    centres = rng.uniform(-spread, spread, size=(k, dims))
    noise = 0.5 if dims <= 5 else 1.0
    X = np.concatenate([c + rng.normal(scale=noise, size=(per_class, dims)) for c in centres]).astype(np.float32)
    return X, np.repeat(np.arange(k), per_class)


def write_stripes(folder: str, classes: int, per_class: int, seed: int = 0) -> None:
    """``classes`` folders of ``per_class`` 64 px PNGs: each class one colour and one stripe frequency and angle, each
    scene a random phase of its stripes plus pixel noise. A class is then a curve (the phase) in feature space, not
    a blob: the shape on which the neighbourhood prior's count kept rising with the room it was given."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    for k in range(classes):
        colour, frequency = rng.uniform(0, 255, size=3), rng.integers(1, 6)
        os.makedirs(f"{folder}/c{k:02d}", exist_ok=True)
        for i in range(per_class):
            stripes = 40 * np.sin(2 * np.pi * frequency * (xx + (k % 3) * yy) + rng.uniform(0, 2 * np.pi))
            pixels = colour + stripes[..., None] + rng.normal(0, 8, (64, 64, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(f"{folder}/c{k:02d}/{i}.png")


def write_solid(folder: str, classes: int, per_class: int, seed: int = 1) -> None:
    """``classes`` folders of ``per_class`` 64 px PNGs, each class one colour plus pixel noise: round classes, as
    the blobs of the ``mixture`` and ``job`` settings, but through the whole job from images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        colour = rng.uniform(0, 255, size=3)
        os.makedirs(f"{folder}/c{k:02d}", exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(f"{folder}/c{k:02d}/{i}.png")


def fit(setting: str, X: np.ndarray, seed: int, grow: bool) -> np.ndarray:
    """The labels of one fit, with the truncation fixed (``grow`` False) or grown as the job does."""
    cfg = ClusterConfig(random_state=seed, grow_truncation=grow)
    if setting == "mixture":
        return fit_clusterer(cfg, X, device="cpu")[1]
    reduce = ReduceConfig(random_state=seed, backend="umap-learn").model_dump()
    return fit_clustering(X, feature={}, reduce=reduce, cluster=cfg)[1]


def run(setting: str, classes: list[int], per_class: int, seeds: list[int]) -> None:
    dims, spread = (5, 12.0) if setting == "mixture" else (64, 1.0)
    for k in classes:
        for seed in seeds:
            X, y = blobs(k, per_class, dims, spread, seed)
            for grow in (False, True):
                start = time.perf_counter()
                labels = fit(setting, X, seed, grow)
                row = {
                    "setting": setting,
                    "classes": k,
                    "per_class": per_class,
                    "seed": seed,
                    "truncation": "grown" if grow else "fixed 50",
                    **score_clusters(y, labels),
                    "seconds": round(time.perf_counter() - start, 2),
                    "cpu": cpu_model(),
                    "cores": os.cpu_count(),
                    "date": datetime.date.today().isoformat(),
                }
                print(json.dumps(row), flush=True)


def summary(path: str) -> None:
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for row in read_json_lines(path):
        cells[(row["setting"], row["classes"], row["truncation"])].append(row)
    print("| setting | classes | truncation | clusters per seed | acc | NMI | seconds |")
    print("|---|---|---|---|---|---|---|")
    for (setting, k, truncation), rows in sorted(cells.items()):
        counts = " / ".join(str(r["n_clusters"]) for r in rows)
        mean = {m: np.mean([r[m] for r in rows]) for m in ("acc", "nmi", "seconds")}
        print(
            f"| {setting} | {k} | {truncation} | {counts} | {mean['acc']:.3f} | {mean['nmi']:.3f} | "
            f"{mean['seconds']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["mixture", "job"], default="mixture")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 30, 45, 60, 90])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--summary", metavar="JSONL", help="print the Markdown table of a results file")
    parser.add_argument("--write-stripes", metavar="DIR", help="write a striped image archive there (write_stripes)")
    parser.add_argument("--write-solid", metavar="DIR", help="write a one-colour-a-class archive there (write_solid)")
    args = parser.parse_args()
    if args.write_stripes:
        write_stripes(args.write_stripes, args.classes[0], args.per_class)
    elif args.write_solid:
        write_solid(args.write_solid, args.classes[0], args.per_class)
    elif args.summary:
        summary(args.summary)
    else:
        run(args.setting, args.classes, args.per_class, args.seeds)


if __name__ == "__main__":
    main()
