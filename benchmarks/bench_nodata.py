"""Tiles cut at the edge of a footprint: does leaving GeoTIFF nodata out of the stretch change how they cluster?

Satellite archives are tiled from orbits and mosaics, so some tiles are part nodata (GDAL's ``GDAL_NODATA`` tag
names the value). The job stretches 16-bit scenes between each band's 2nd and 98th percentile; counting the nodata
pixels puts the 2nd percentile at the nodata value and pales the real ground. ``embed.nodata: auto`` (the default)
leaves them out and shows them black; ``none`` is the behaviour before it.

``--write`` turns a class-folder archive of 8-bit scenes into 16-bit GeoTIFFs as a sensor's archive holds them
(reflectance x 10^4 of dull ground: ``300 + 8 * value``), and cuts ``--edge-share`` of the scenes at a footprint
edge: 20-50% of the tile beyond a straight edge (along a random side, or ``--slanted`` at a random angle) set to 0,
tagged ``GDAL_NODATA=0``; their names start with ``edge_``. The scenes picked depend on ``--seed`` only, so an
archive with ``--edge-share 0`` holds the same scenes whole.
``--orthophoto`` writes the scenes as aerial mosaics store them instead: 8-bit RGB, JPEG-compressed in 32-pixel
tiles, with the edge tiles' outside black (blurred by JPEG, so no nodata value can find it) and marked by an
internal 1-bit mask IFD, as GDAL writes one (``GDAL_TIFF_INTERNAL_MASK``); ``--nodata none`` ignores the mask.
``--score`` reads the job's runs and reports accuracy over all scenes, over the edge tiles and over the whole ones,
under one Hungarian matching per run.

    python benchmarks/bench_nodata.py --write /tmp/nodata-eurosat --source ../shared/data/eurosat --per-class 40
    scenecluster cluster /tmp/nodata-eurosat --labels folders --views one -o runs/nodata/eurosat-auto
    scenecluster cluster /tmp/nodata-eurosat --labels folders --views one --nodata none -o runs/nodata/eurosat-none
    python benchmarks/bench_nodata.py --score runs/nodata/eurosat-auto runs/nodata/eurosat-none
"""

from __future__ import annotations

import argparse
import json
import posixpath
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import tifffile
from PIL import Image
from scipy.optimize import linear_sum_assignment

from scenecluster.evaluate import contingency

GDAL_NODATA = 42113
EDGE_PREFIX = "edge_"


def to_sensor_range(rgb8: np.ndarray) -> np.ndarray:
    """8-bit RGB ``(H, W, 3)`` -> 16-bit bands ``(3, H, W)`` in a dull reflectance range, never 0 (0 is nodata)."""
    return (300 + 8 * np.moveaxis(rgb8.astype(np.uint16), -1, 0)).astype(np.uint16)


def outside_edge(height: int, width: int, rng: np.random.Generator, slanted: bool = False) -> np.ndarray:
    """20-50% of a tile beyond a straight edge, ``(H, W)`` true outside: one side of the tile (a mosaic's or a
    grid's edge) or, ``slanted``, a line at a random angle (an orbit's swath edge crossing the tile)."""
    share = rng.uniform(0.2, 0.5)
    angle = rng.uniform(0, 2 * np.pi) if slanted else rng.integers(4) * np.pi / 2
    rows, cols = np.mgrid[0:height, 0:width]
    across = np.cos(angle) * (cols - width / 2) + np.sin(angle) * (rows - height / 2)
    return across > np.quantile(across, 1 - share)


def cut_at_edge(bands: np.ndarray, rng: np.random.Generator, slanted: bool = False) -> np.ndarray:
    """Set the tile's part beyond an edge (:func:`outside_edge`) to 0 in every band."""
    edge = bands.copy()
    edge[:, outside_edge(*edge.shape[1:], rng, slanted)] = 0
    return edge


def write_orthophoto(path: Path, rgb8: np.ndarray, outside: np.ndarray | None) -> None:
    """8-bit RGB as a JPEG-compressed tiled TIFF; with ``outside``, that part black and an internal mask after
    the image marking the rest valid (NewSubfileType 4, 1 bit), where GDAL puts it."""
    rgb = rgb8.copy()
    if outside is not None:
        rgb[outside] = 0
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, photometric="rgb", compression="jpeg", compressionargs={"level": 90}, tile=(32, 32))
        if outside is not None:
            tif.write(~outside, subfiletype=4, photometric="mask", compression="deflate", tile=(32, 32))


def write(
    folder: str, source: str, per_class: int, edge_share: float, seed: int, slanted: bool, orthophoto: bool = False
) -> None:
    picks, edges = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])  # same scenes at any share
    for class_dir in sorted(p for p in Path(source).iterdir() if p.is_dir()):
        images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif"))
        picked = picks.choice(len(images), size=min(per_class, len(images)), replace=False)
        out = Path(folder) / class_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for i in sorted(picked):
            rgb8 = np.asarray(Image.open(images[i]).convert("RGB"))
            if orthophoto:
                cut = edges.random() < edge_share
                outside = outside_edge(*rgb8.shape[:2], edges, slanted) if cut else None
                write_orthophoto(out / f"{EDGE_PREFIX if cut else ''}{images[i].stem}.tif", rgb8, outside)
                continue
            bands = to_sensor_range(rgb8)
            if edges.random() < edge_share:
                name, bands, tags = (
                    EDGE_PREFIX + images[i].stem,
                    cut_at_edge(bands, edges, slanted),
                    [(GDAL_NODATA, "s", 0, "0")],
                )
            else:
                name, tags = images[i].stem, []
            tifffile.imwrite(
                out / f"{name}.tif", bands, photometric="minisblack", planarconfig="separate", extratags=tags
            )


def matched_accuracy(labels: np.ndarray, clusters: np.ndarray, subset: np.ndarray) -> float | None:
    """Accuracy of ``subset`` under the Hungarian matching of clusters to classes made on all scenes (None for an
    empty subset: the edge tiles of an archive of whole scenes)."""
    if not subset.any():
        return None
    table, found, classes = contingency(labels, clusters)  # rows: clusters, columns: classes
    rows, cols = linear_sum_assignment(table, maximize=True)
    match = {found[r]: classes[c] for r, c in zip(rows, cols, strict=True)}
    hits = np.array([match.get(c) == lab for c, lab in zip(clusters, labels, strict=True)])
    return float(hits[subset].mean())


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def score(run: str) -> dict:
    table = pads.dataset(posixpath.join(run, "assignments")).to_table(columns=["path", "cluster", "label"])
    paths = np.array(table["path"].to_pylist())
    labels, clusters = np.array(table["label"].to_pylist()), np.array(table["cluster"].to_pylist())
    edge = np.array([posixpath.basename(p).startswith(EDGE_PREFIX) for p in paths])
    metrics = json.loads(Path(run, "metrics.json").read_text())
    return {
        "run": run,
        "scenes": len(paths),
        "edge_tiles": int(edge.sum()),
        "clusters": metrics["n_clusters"],
        "acc": _rounded(matched_accuracy(labels, clusters, np.ones_like(edge))),
        "acc_edge": _rounded(matched_accuracy(labels, clusters, edge)),
        "acc_whole": _rounded(matched_accuracy(labels, clusters, ~edge)),
        "nmi": round(metrics["nmi"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FOLDER", help="write a 16-bit GeoTIFF archive with edge tiles here")
    parser.add_argument("--source", help="class-folder archive of 8-bit scenes to convert")
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--edge-share", type=float, default=0.5, help="share of the scenes cut at an edge")
    parser.add_argument("--seed", type=int, default=0, help="seeds the scenes picked (with 0) and the edges cut")
    parser.add_argument("--slanted", action="store_true", help="edges at a random angle, not along a side")
    parser.add_argument("--orthophoto", action="store_true", help="8-bit JPEG tiles with GDAL's internal mask")
    parser.add_argument("--score", nargs="+", metavar="RUN", help="the job's output folders to score")
    args = parser.parse_args()
    if args.write:
        if not args.source:
            parser.error("--write needs --source")
        write(args.write, args.source, args.per_class, args.edge_share, args.seed, args.slanted, args.orthophoto)
    for run in args.score or []:
        print(json.dumps(score(run)))


if __name__ == "__main__":
    main()
