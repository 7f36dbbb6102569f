"""What the report shows, gathered from a finished run's folder rather than from the job's memory.

Reading files makes the report reproducible: ``scenecluster report RUN`` regenerates it from any finished run
(local or S3), and the job itself goes through the same path. Per-cluster figures come from streaming every
assignment part once (counts, sums, and the few most and least typical scenes per cluster), so memory grows
with clusters x thumbnails, not with the archive. The certainty check and the scatter use a seeded sample.

Why a neighbour check: the saved per-scene probability is the mixture's responsibility in the UMAP space,
where clusters are tight, well-separated blobs by construction, so it says 0.99 even for a cluster that is half
one class. Whether a scene's nearest neighbours *in the feature space the model produced* share its cluster
does not depend on how UMAP packed the points, and is the honest signal of which scenes and clusters to doubt.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scenecluster.outputs import OutputFolder

__all__ = [
    "ClusterRow",
    "RunFacts",
    "cluster_rows",
    "diagonal_order",
    "gather_run",
    "neighbour_agreement",
    "read_skipped",
    "top_per_group",
]

ASSIGNMENTS = "assignments"
EMBEDDINGS = "embeddings"
REPORT_SAMPLE = "clustering/report_sample.parquet"
COLUMNS = ["path", "cluster", "probability", "label", "log_likelihood", "novel"]
KNN_SAMPLE = 5000  # scenes whose neighbours are searched (all pairs: 5,000^2 dot products take about a second)
N_NEIGHBOURS = 10
MIXED_PURITY = 0.6  # below this share of its majority class a cluster is flagged "mixed"
SPLIT_RECALL = 0.6  # a class whose best cluster holds less than this share of it, and leads 2+ clusters, is "split"
DOUBT_AGREEMENT = 0.7  # mean neighbour agreement below this flags a cluster "doubtful"


@dataclass
class RunFacts:
    """Everything the page needs, already reduced to sizes that do not grow with the archive."""

    name: str
    location: str
    config: dict[str, Any]
    identity: dict[str, Any]
    metrics: dict[str, Any]
    finished: str
    cluster_ids: np.ndarray  # (n_clusters,)
    sizes: np.ndarray  # (n_clusters,)
    probability_sum: np.ndarray
    probability_min: np.ndarray
    novel: np.ndarray
    classes: list[str] | None  # column order of ``table``
    table: np.ndarray | None  # (n_clusters, n_classes) scene counts
    typical: pa.Table  # highest log-likelihood scenes per cluster
    unsure: pa.Table  # lowest-probability scenes per cluster
    novel_scenes: pa.Table  # lowest log-likelihood scenes flagged novel
    sample: dict[str, np.ndarray] = field(default_factory=dict)  # scatter + neighbour-check sample
    projection: str = ""
    projection_dims: int | None = None  # dimensions of the space the scenes were clustered or assigned in
    skipped: tuple[int, list[tuple[str, str]]] = (0, [])

    @property
    def n_scenes(self) -> int:
        return int(self.sizes.sum())


def top_per_group(table: pa.Table, group: str, key: str, k: int, *, descending: bool) -> pa.Table:
    """The ``k`` rows with the highest (or lowest) ``key`` within each value of ``group``."""
    if table.num_rows == 0:
        return table
    g = table.column(group).to_numpy(zero_copy_only=False)
    s = table.column(key).to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.lexsort((-s if descending else s, g))
    sorted_g = g[order]
    starts = np.r_[0, np.flatnonzero(sorted_g[1:] != sorted_g[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return table.take(pa.array(order[rank < k]))


class _Totals:
    """Running per-cluster sums over assignment parts, and the candidate scenes for the strips."""

    def __init__(self, k: int, sample_paths: set[str]) -> None:
        self.k, self.sample_paths = k, sample_paths
        self.sizes: dict[int, int] = {}
        self.prob_sum: dict[int, float] = {}
        self.prob_min: dict[int, float] = {}
        self.novel: dict[int, int] = {}
        self.pairs: dict[tuple[int, str], int] = {}
        self.typical: pa.Table | None = None
        self.unsure: pa.Table | None = None
        self.novel_rows: pa.Table | None = None
        self.sampled: list[pa.Table] = []

    def add(self, part: pa.Table) -> None:
        if "label" not in part.column_names:
            part = part.append_column("label", pa.nulls(part.num_rows, pa.string()))
        part = part.select(COLUMNS + (["coords"] if "coords" in part.column_names else []))
        clusters = part.column("cluster").to_numpy()
        prob = part.column("probability").to_numpy(zero_copy_only=False)
        novel = part.column("novel").to_numpy(zero_copy_only=False)
        for cid in np.unique(clusters).tolist():
            m = clusters == cid
            self.sizes[cid] = self.sizes.get(cid, 0) + int(m.sum())
            self.prob_sum[cid] = self.prob_sum.get(cid, 0.0) + float(prob[m].sum())
            self.prob_min[cid] = min(self.prob_min.get(cid, 1.0), float(prob[m].min()))
            self.novel[cid] = self.novel.get(cid, 0) + int(novel[m].sum())
        for c, lab in zip(clusters.tolist(), part.column("label").to_pylist(), strict=True):
            if lab is not None:
                self.pairs[(c, lab)] = self.pairs.get((c, lab), 0) + 1
        slim = part.drop_columns(["coords"]) if "coords" in part.column_names else part
        self.typical = _merge(self.typical, slim, "log_likelihood", self.k, descending=True)
        self.unsure = _merge(self.unsure, slim, "probability", self.k, descending=False)
        flagged = slim.filter(pc.equal(slim.column("novel"), True))
        both = flagged if self.novel_rows is None else pa.concat_tables([self.novel_rows, flagged])
        self.novel_rows = both.take(pc.sort_indices(both, [("log_likelihood", "ascending")])[: 3 * self.k])
        if self.sample_paths:
            self.sampled.append(part.filter(pc.is_in(part.column("path"), pa.array(list(self.sample_paths)))))


def _merge(current: pa.Table | None, new: pa.Table, key: str, k: int, *, descending: bool) -> pa.Table:
    both = new if current is None else pa.concat_tables([current, new])
    return top_per_group(both, "cluster", key, k, descending=descending)


def _contingency(pairs: dict[tuple[int, str], int], ids: np.ndarray) -> tuple[list[str] | None, np.ndarray | None]:
    if not pairs:
        return None, None
    classes = sorted({lab for _, lab in pairs})
    row = {c: i for i, c in enumerate(ids.tolist())}
    table = np.zeros((len(ids), len(classes)), dtype=np.int64)
    for (c, lab), n in pairs.items():
        table[row[c], classes.index(lab)] = n
    return classes, table


def read_skipped(out: OutputFolder, limit: int = 20) -> tuple[int, list[tuple[str, str]]]:
    """How many scenes the run could not read, and the first ``limit`` of them as (path, reason).

    The skipped-scenes file (``skipped.jsonl``) is read by :func:`scenecluster.embed.read_skipped`, its writer's
    module, so its format is known in one place.
    """
    from scenecluster.embed import read_skipped as read_skipped_table

    rows = read_skipped_table(out)
    return len(rows), rows[:limit]


def _finished(out: OutputFolder, metrics: dict[str, Any]) -> str:
    """When the run finished: recorded in metrics.json, else the time metrics.json was written."""
    if metrics.get("finished_at"):
        return str(metrics["finished_at"])
    if out.exists("metrics.json"):
        mtime = out.fs.get_file_info(out.path("metrics.json")).mtime
        if mtime is not None:
            return mtime.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") + " (file time)"
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _scatter_rows(out: OutputFolder, cap: int, seed: int) -> tuple[pa.Table | None, str]:
    """The scatter's sample (path, x, y) and which projection its positions come from."""
    if out.exists(REPORT_SAMPLE):
        table = out.read_table(REPORT_SAMPLE)
        table = table.filter(pc.invert(pc.is_nan(table.column("x"))))
        if table.num_rows > cap:
            table = table.take(pa.array(np.sort(np.random.default_rng(seed).choice(table.num_rows, cap, False))))
        return table.select(["path", "x", "y"]), "umap2d"
    return None, "pca"


def gather_run(out: OutputFolder, *, metrics: dict[str, Any] | None = None, k: int = 8) -> RunFacts:
    """Read a finished run folder (a cluster or an assign run) into :class:`RunFacts`.

    ``metrics`` replaces ``metrics.json`` (the job passes its own before that file is written).
    """
    config = out.read_yaml("config.yaml", default={}) or {}
    metrics = metrics if metrics is not None else out.read_json("metrics.json", default={})
    seed = int((config.get("data") or {}).get("seed") or 0)
    cap = int((config.get("report") or {}).get("scatter_points") or 20000)
    xy_rows, projection = _scatter_rows(out, cap, seed)
    totals = _Totals(k, set(xy_rows.column("path").to_pylist()) if xy_rows is not None else set())
    parts = [n for n in out.list(ASSIGNMENTS) if n.endswith(".parquet")]
    for name in parts:
        totals.add(out.read_table(posixpath.join(ASSIGNMENTS, name)))
    ids = np.array(sorted(totals.sizes), dtype=np.int64)
    classes, table = _contingency(totals.pairs, ids)
    empty = pa.table({c: pa.array([], pa.float64()) for c in COLUMNS})
    facts = RunFacts(
        name=posixpath.basename(out.root.rstrip("/")) or out.root,
        location=out.display(""),
        config=config,
        identity=out.read_json("run.json", default={}),
        metrics=metrics,
        finished=_finished(out, metrics),
        cluster_ids=ids,
        sizes=np.array([totals.sizes[c] for c in ids], dtype=np.int64),
        probability_sum=np.array([totals.prob_sum[c] for c in ids]),
        probability_min=np.array([totals.prob_min[c] for c in ids]),
        novel=np.array([totals.novel[c] for c in ids], dtype=np.int64),
        classes=classes,
        table=table,
        typical=totals.typical if totals.typical is not None else empty,
        unsure=totals.unsure if totals.unsure is not None else empty,
        novel_scenes=totals.novel_rows if totals.novel_rows is not None else empty,
        skipped=read_skipped(out),
    )
    facts.sample, projection = _sample(out, parts, totals, xy_rows, projection, cap, seed)
    facts.projection, _, dims = projection.partition(":")
    facts.projection_dims = int(dims) if dims else (config.get("reduce") or {}).get("n_components")
    return facts


def _sample(
    out: OutputFolder, parts: list[str], totals: _Totals, xy_rows: pa.Table | None, projection: str, cap: int, seed: int
) -> tuple[dict[str, np.ndarray], str]:
    """The scatter sample joined to its assignments, with 2-D positions and each scene's neighbour agreement."""
    if xy_rows is not None:
        rows = pa.concat_tables(totals.sampled) if totals.sampled else None
        if rows is None or rows.num_rows == 0:
            return {}, projection
        xy = {p: (x, y) for p, x, y in zip(*(xy_rows.column(c).to_pylist() for c in ("path", "x", "y")), strict=True)}
        rows = rows.filter(pc.is_in(rows.column("path"), pa.array(list(xy))))
        positions = np.array([xy[p] for p in rows.column("path").to_pylist()], dtype=np.float64)
    else:
        rows = _sample_assignments(out, parts, cap, seed)
        if rows is None or rows.num_rows == 0 or "coords" not in rows.column_names:
            return {}, projection
        from sklearn.decomposition import PCA

        coords = np.asarray(rows.column("coords").to_pylist(), dtype=np.float64)
        projection = f"pca:{coords.shape[1]}"
        positions = PCA(n_components=2, random_state=seed).fit_transform(coords) if coords.shape[1] > 2 else coords
    sample = {c: np.asarray(rows.column(c).to_pylist(), dtype=object) for c in ("path", "label")}
    for c in ("cluster", "probability", "log_likelihood"):
        sample[c] = rows.column(c).to_numpy(zero_copy_only=False)
    sample["x"], sample["y"] = positions[:, 0], positions[:, 1]
    sample["agreement"] = _agreement_for(out, sample["path"], sample["cluster"], seed)
    return sample, projection


def _sample_assignments(out: OutputFolder, parts: list[str], size: int, seed: int) -> pa.Table | None:
    """A seeded uniform sample of ``size`` assignment rows across the parts (for runs without a report sample)."""
    import pyarrow.parquet as pq

    counts = [pq.read_metadata(out.path(posixpath.join(ASSIGNMENTS, n)), filesystem=out.fs).num_rows for n in parts]
    total = int(sum(counts))
    if total == 0:
        return None
    chosen = np.arange(total) if size >= total else np.sort(np.random.default_rng(seed).choice(total, size, False))
    starts = np.r_[0, np.cumsum(counts)]
    tables = []
    for i, name in enumerate(parts):
        local = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
        if len(local):
            tables.append(out.read_table(posixpath.join(ASSIGNMENTS, name)).take(pa.array(local)))
    table = pa.concat_tables(tables)
    if "label" not in table.column_names:
        table = table.append_column("label", pa.nulls(table.num_rows, pa.string()))
    return table


def _agreement_for(out: OutputFolder, paths: np.ndarray, clusters: np.ndarray, seed: int) -> np.ndarray:
    """Neighbour agreement of up to ``KNN_SAMPLE`` of ``paths`` (NaN for the rest), from their embeddings."""
    from scenecluster.vectors import vector_matrix

    result = np.full(len(paths), np.nan)
    pick = np.arange(len(paths))
    if len(pick) > KNN_SAMPLE:
        pick = np.sort(np.random.default_rng([seed, 2]).choice(len(paths), KNN_SAMPLE, replace=False))
    wanted = {p: i for i, p in zip(pick.tolist(), paths[pick].tolist(), strict=True)}
    index, vectors = [], []
    for name in out.list(EMBEDDINGS):
        if not name.endswith(".parquet"):
            continue
        part = out.read_table(posixpath.join(EMBEDDINGS, name)).select(["path", "embedding"])
        part = part.filter(pc.is_in(part.column("path"), pa.array(list(wanted))))
        if part.num_rows:
            index.extend(wanted[p] for p in part.column("path").to_pylist())
            vectors.append(vector_matrix(part, "embedding"))
    if len(index) > N_NEIGHBOURS:
        rows = np.asarray(index)
        result[rows] = neighbour_agreement(np.concatenate(vectors), clusters[rows])
    return result


def neighbour_agreement(X: np.ndarray, clusters: np.ndarray, n_neighbors: int = N_NEIGHBOURS) -> np.ndarray:
    """Share of each row's ``n_neighbors`` nearest rows (cosine, in ``X``) that are in its cluster.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        The model's features, before any projection.
    clusters : ndarray of shape (n_samples,)

    Returns
    -------
    ndarray of shape (n_samples,), values in [0, 1].
    """
    X = np.asarray(X, dtype=np.float32)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    k = min(n_neighbors, len(X) - 1)
    clusters = np.asarray(clusters)
    out = np.empty(len(X))
    for start in range(0, len(X), 1024):  # blocks keep the similarity matrix to 1,024 x n
        sim = X[start : start + 1024] @ X.T
        sim[np.arange(len(sim)), np.arange(start, start + len(sim))] = -np.inf  # a scene is not its own neighbour
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[start : start + len(sim)] = (clusters[nearest] == clusters[start : start + len(sim), None]).mean(axis=1)
    return out


@dataclass
class ClusterRow:
    """One row of the per-cluster table."""

    cluster: int
    size: int
    share: float
    mean_probability: float
    min_probability: float
    novel: int
    agreement: float  # NaN when no sampled scene is in the cluster
    n_checked: int
    majority: str | None = None
    purity: float = float("nan")
    majority_recall: float = float("nan")
    second: tuple[str, float] | None = None
    matched: str | None = None
    matched_share: float = float("nan")
    matched_recall: float = float("nan")
    flags: list[str] = field(default_factory=list)


def cluster_rows(facts: RunFacts) -> list[ClusterRow]:
    """Per-cluster sizes, probabilities, neighbour agreement and (with labels) purity, recall and flags."""
    total = max(facts.n_scenes, 1)
    agree = facts.sample.get("agreement")
    rows = []
    for i, cid in enumerate(facts.cluster_ids.tolist()):
        a = np.zeros(0)
        if agree is not None:
            a = agree[(facts.sample["cluster"] == cid) & ~np.isnan(agree)]
        rows.append(
            ClusterRow(
                cluster=int(cid),
                size=int(facts.sizes[i]),
                share=facts.sizes[i] / total,
                mean_probability=facts.probability_sum[i] / max(facts.sizes[i], 1),
                min_probability=float(facts.probability_min[i]),
                novel=int(facts.novel[i]),
                agreement=float(a.mean()) if len(a) else float("nan"),
                n_checked=len(a),
            )
        )
    if facts.table is not None and facts.classes is not None:
        _add_label_columns(rows, facts.table, facts.classes)
    for row in rows:
        if row.agreement < DOUBT_AGREEMENT:
            row.flags.append(f"doubtful: {row.agreement:.0%} of neighbours agree")
    return rows


def _add_label_columns(rows: list[ClusterRow], table: np.ndarray, classes: list[str]) -> None:
    from scipy.optimize import linear_sum_assignment

    class_totals = np.maximum(table.sum(axis=0), 1)
    matched = dict(zip(*linear_sum_assignment(table, maximize=True), strict=True))
    leaders = table.argmax(axis=1)
    for i, row in enumerate(rows):
        counts, n = table[i], max(table[i].sum(), 1)
        order = np.argsort(-counts, kind="stable")
        j = int(order[0])
        row.majority, row.purity, row.majority_recall = classes[j], counts[j] / n, counts[j] / class_totals[j]
        if len(order) > 1 and counts[order[1]]:
            row.second = (classes[int(order[1])], counts[order[1]] / n)
        if i in matched:
            m = int(matched[i])
            row.matched, row.matched_share, row.matched_recall = classes[m], counts[m] / n, counts[m] / class_totals[m]
        if row.purity < MIXED_PURITY and row.second:
            row.flags.append(f"mixed: {row.majority} {row.purity:.0%}, {row.second[0]} {row.second[1]:.0%}")
        siblings = [rows[r].cluster for r in np.flatnonzero(leaders == j) if r != i]
        if siblings and row.majority_recall < SPLIT_RECALL:
            row.flags.append(f"split: {row.majority} also leads cluster {', '.join(map(str, siblings))}")


def diagonal_order(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders that put Hungarian-matched (cluster, class) pairs on the diagonal.

    Columns: matched classes, largest pair first, then unmatched classes. Rows: the matched clusters in the
    same order, then the unmatched clusters grouped under the column of their majority class.
    """
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(table, maximize=True)
    pairs = sorted(zip(r.tolist(), c.tolist(), strict=True), key=lambda p: -table[p[0], p[1]])
    cols = [p[1] for p in pairs] + [j for j in range(table.shape[1]) if j not in set(c.tolist())]
    position = {j: k for k, j in enumerate(cols)}
    rest = [i for i in range(table.shape[0]) if i not in set(r.tolist())]
    rest.sort(key=lambda i: (position[int(table[i].argmax())], -table[i].sum()))
    return np.array([p[0] for p in pairs] + rest, dtype=np.int64), np.array(cols, dtype=np.int64)
