"""A self-contained HTML report of one clustering run.

Every figure is a PNG embedded as base64, so the single file can be mailed or opened from S3 without the
images it describes.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scenecluster.evaluate import contingency  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(n: int) -> np.ndarray:
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return np.array([cmap(i % cmap.N) for i in range(max(n, 1))])


def scatter_figure(xy: np.ndarray, clusters: np.ndarray) -> str:
    """2-D UMAP scatter coloured by cluster."""
    ids = np.unique(clusters)
    colors = _colors(len(ids))
    fig, ax = plt.subplots(figsize=(7, 6))
    size = max(1.0, min(12.0, 20000 / max(len(xy), 1)))
    for color, cid in zip(colors, ids, strict=True):
        m = clusters == cid
        ax.scatter(xy[m, 0], xy[m, 1], s=size, color=color, label=str(cid), linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("UMAP (2-D) coloured by cluster")
    if len(ids) <= 30:
        ax.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), title="cluster")
    return _png(fig)


def sizes_figure(clusters: np.ndarray) -> str:
    ids, counts = np.unique(clusters, return_counts=True)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(ids) + 2), 3))
    ax.bar([str(i) for i in ids], counts, color=_colors(len(ids)))
    ax.set_xlabel("cluster")
    ax.set_ylabel("images")
    ax.set_title("Cluster sizes")
    return _png(fig)


def confusion_figure(labels: Sequence[str], clusters: np.ndarray) -> str:
    """Cluster x class counts, rows ordered by cluster id."""
    table, cids, classes = contingency(labels, clusters)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(classes) + 3), max(4, 0.35 * len(cids) + 2)))
    ax.imshow(table, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(cids)), [str(c) for c in cids], fontsize=8)
    ax.set_xlabel("true class")
    ax.set_ylabel("cluster")
    if table.size <= 900:
        for (i, j), v in np.ndenumerate(table):
            if v:
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v > table.max() / 2 else "black",
                )
    ax.set_title("Confusion matrix")
    return _png(fig)


def montage_figure(images: list[np.ndarray | None], title: str) -> str:
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.2 * n, 1.4), squeeze=False)
    for ax, img in zip(axes[0], images, strict=True):
        ax.axis("off")
        if img is not None:
            ax.imshow(img)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.8, bottom=0.02, wspace=0.05)
    fig.suptitle(title, fontsize=8, x=0.01, ha="left")
    return _png(fig)


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1100px}"
    "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}"
    "img{max-width:100%}"
)


def _montage_title(cid, count: int, members: np.ndarray, labels: Sequence[str] | None) -> str:
    """``cluster <id>: <n> images``, with its most common true class when labels are known."""
    title = f"cluster {cid}: {count} images"
    if labels is not None:
        names, c = np.unique(np.asarray(labels)[members], return_counts=True)
        top = names[np.argmax(c)]
        title += f" (most: {top}, {c.max() / count:.0%})"
    return title


def _montages(
    paths: Sequence[str],
    clusters: np.ndarray,
    read_thumbnail: Callable[[str], np.ndarray | None],
    labels: Sequence[str] | None,
    thumbnails_per_cluster: int,
    seed: int,
) -> list[str]:
    """One montage of randomly picked members per cluster, largest cluster first."""
    rng = np.random.default_rng(seed)
    ids, counts = np.unique(clusters, return_counts=True)
    montages = []
    for cid, count in sorted(zip(ids, counts, strict=True), key=lambda t: -t[1]):
        members = np.flatnonzero(clusters == cid)
        pick = rng.choice(members, size=min(thumbnails_per_cluster, len(members)), replace=False)
        title = _montage_title(cid, count, members, labels)
        montages.append(montage_figure([read_thumbnail(paths[i]) for i in pick], title))
    return montages


def _figure_sections(
    clusters: np.ndarray, xy: np.ndarray, xy_index: np.ndarray, labels: Sequence[str] | None
) -> list[str]:
    """The scatter, the cluster sizes and (with labels) the confusion matrix, as ``<img>`` tags."""
    sections = [
        f'<img src="{scatter_figure(xy, clusters[xy_index])}" alt="UMAP scatter">',
        f'<img src="{sizes_figure(clusters)}" alt="cluster sizes">',
    ]
    if labels is not None:
        sections.append(f'<img src="{confusion_figure(labels, clusters)}" alt="confusion matrix">')
    return sections


def _metric_rows(metrics: dict) -> str:
    """Table rows of the metrics, the per-stage times left out."""
    shown = {k: v for k, v in metrics.items() if k != "stage_seconds"}
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in shown.items())


def _stage_rows(stage_seconds: dict[str, float]) -> str:
    """Table rows of the seconds each stage took."""
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.1f} s</td></tr>" for k, v in stage_seconds.items())


def _page(body: str) -> str:
    """The whole HTML document around ``body``."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>scenecluster report</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def write_report(
    *,
    paths: Sequence[str],
    clusters: np.ndarray,
    xy: np.ndarray,
    xy_index: np.ndarray,
    metrics: dict,
    read_thumbnail: Callable[[str], np.ndarray | None],
    labels: Sequence[str] | None = None,
    thumbnails_per_cluster: int = 8,
    seed: int = 0,
) -> str:
    """Render the report and return its HTML text (the caller writes it atomically).

    Parameters
    ----------
    xy : ndarray of shape (n_points, 2)
        2-D projection of the rows ``xy_index`` (a subsample on big runs).
    read_thumbnail : callable
        ``path -> uint8 (h, w, 3)`` or ``None`` for an image that cannot be read any more.
    """
    clusters = np.asarray(clusters)
    montages = _montages(paths, clusters, read_thumbnail, labels, thumbnails_per_cluster, seed)
    sections = _figure_sections(clusters, xy, xy_index, labels)
    body = "\n".join(
        [
            "<h1>scenecluster report</h1>",
            f"<table>{_metric_rows(metrics)}</table>",
            "<h2>Time per stage</h2>",
            f"<table>{_stage_rows(metrics.get('stage_seconds', {}))}</table>",
            "<h2>Projection, sizes" + (", confusion" if labels is not None else "") + "</h2>",
            *sections,
            "<h2>Scenes per cluster</h2>",
            *(f'<div><img src="{m}" alt="montage"></div>' for m in montages),
        ]
    )
    return _page(body)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)
