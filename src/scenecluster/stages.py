"""Driver side of the fit and assignment stages: start the Ray work of :mod:`scenecluster.scale`, add up counts.

The driver asks for one fit task (a GPU when the run has GPUs) and an actor pool for assignment (a task per part
for a run of at most ``embed.task_parts`` parts), and keeps only what they return: the fit's summary with the
report's sample, and per-part counts that add up to the cluster sizes, the novel count and the (cluster x label)
table the archive is scored from.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scenecluster.outputs import OutputFolder

__all__ = [
    "AssignSummary",
    "assign_parts",
    "assign_pool_sizes",
    "assigns_on_gpu",
    "check_enough_scenes",
    "every_so_often",
    "export_assignments",
    "fit_remote",
    "forget_other_assignments",
    "get_interruptibly",
    "run_tasks_interruptibly",
]

CLUSTERING = "clustering"
ASSIGNMENTS = "assignments"
REPORT_SAMPLE = "clustering/report_sample.parquet"
ASSIGNED_WITH = "assigned_with.json"  # which saved clustering (location and digest) wrote assignments/


def check_enough_scenes(n: int, cfg, where: str) -> None:
    """Refuse, in one line that says what to change, a run whose fit could never work on ``n`` scenes.

    ``where`` finishes "too few scenes to cluster: {n} ..." (e.g. "under /data/tiles").

    Called before the embedding when the listing's count is known (no ``.tar`` shards), and again after it,
    when unreadable scenes may have left fewer.

    Raises
    ------
    InputError
        Starting ``too few scenes to cluster:``.
    """
    from scenecluster.errors import InputError
    from scenecluster.reduce import min_samples
    from scenecluster.scale import fit_count

    method, dims = cfg.reduce.method, cfg.reduce.n_components
    need, n_fit = min_samples(method, dims), fit_count(n, cfg.scale.fit_sample)
    if n_fit >= need:
        return
    message = f"too few scenes to cluster: {n} {where}"
    if n_fit < min_samples(method, 1):
        raise InputError(f"{message}; clustering needs at least {min_samples(method, 1)}")
    if n_fit < n:
        message += f", of which the fit sees {n_fit} (--fit-sample {cfg.scale.fit_sample})"
    widest = max(d for d in range(1, dims) if min_samples(method, d) <= n_fit)
    raise InputError(
        f"{message}; a {dims}-d {method} projection needs at least {need}: use --umap-dims {widest} or fewer, "
        "or add scenes"
    )


def fit_remote(
    out: OutputFolder,
    parts: list[tuple[str, int]],
    cfg,
    spec,
    resources,
    *,
    fit_key: str,
    data_prior_fit_key: str,
    reading: int | None = None,
) -> dict[str, Any]:
    """Fit (or reuse) the run's clustering in one Ray task; a changed ``fit_key`` refits and drops assignments.

    ``data_prior_fit_key`` (the fit key under the data prior, which self-training's pseudo-labels are keyed on)
    and ``reading`` (the revision that read the fitted scenes other than JPEG, None for JPEGs alone: a later
    ``assign`` compares it with its own) are recorded beside it in ``clustering.json``."""
    import ray

    from scenecluster.scale import fit_on_sample

    previous = _saved_fit(out)
    if previous is not None and previous["fit_key"] == fit_key and not previous["stale"] and out.exists(REPORT_SAMPLE):
        return {**previous["summary"], "reused": True, "report": _read_report_sample(out), "stage_seconds": {}}
    for folder in (ASSIGNMENTS, CLUSTERING):
        for name in out.list(folder):
            out.delete(posixpath.join(folder, name))
    reduce = {**cfg.reduce.model_dump(), "backend": resources.umap_backend(cfg.reduce.backend)}
    task = ray.remote(fit_on_sample).options(num_cpus=1, num_gpus=1 if resources.use_gpu else 0)
    result = get_interruptibly(
        task.remote(
            out,
            parts,
            fit_sample=cfg.scale.fit_sample,
            seed=cfg.data.seed,
            feature=spec.identity(),
            reduce=reduce,
            cluster=cfg.cluster,
            device=resources.fit_device,
            novelty_quantile=cfg.scale.novelty_quantile,
            scatter_points=cfg.report.scatter_points,
            fit_key=fit_key,
            data_prior_fit_key=data_prior_fit_key,
            reading=reading,
        )
    )
    _write_report_sample(out, result["report"])
    return {**result, "reused": False}


def get_interruptibly(ref, poll_s: float = 0.25):
    """``ray.get(ref)``, but Ctrl-C stops it at once and cancels the task (:func:`run_tasks_interruptibly` of one)."""
    return run_tasks_interruptibly(lambda _: ref, [ref], in_flight=1, poll_s=poll_s)[0]


def every_so_often(
    seconds: float, line: Callable[[int], str], echo: Callable[[str], None] | None
) -> Callable[[int], None] | None:
    """A callback that runs ``echo(line(n))`` for a count ``n`` at most once every ``seconds``, counted from now
    (a stage quicker than that prints nothing more than its own line); None without ``echo``."""
    if echo is None:
        return None
    last = time.monotonic()

    def maybe(n: int) -> None:
        nonlocal last
        if time.monotonic() - last >= seconds:
            echo(line(n))
            last = time.monotonic()

    return maybe


def run_tasks_interruptibly(
    submit: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    in_flight: int,
    on_done: Callable[[int], None] | None = None,
    poll_s: float = 0.25,
) -> list[Any]:
    """``ray.get(submit(item))`` for every item, in ``items``' order, with at most ``in_flight`` tasks submitted at
    a time; ``on_done(n)`` after each of the ``n`` first to finish.

    The driver waits in short ``ray.wait`` rounds so that Python handles SIGINT between them (a long blocking get
    can sit in Ray's C++ code while the interrupt waits). Then, or when a task fails, the tasks still running are
    force-cancelled, so that none goes on, or gets retried, after the driver has given up.
    """
    import ray

    results: list[Any] = [None] * len(items)
    pending: dict[Any, int] = {}
    submitted = finished = 0
    try:
        while finished < len(items):
            while submitted < len(items) and len(pending) < max(1, in_flight):
                pending[submit(items[submitted])] = submitted
                submitted += 1
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
            for ref in ready:
                index = pending.pop(ref)  # finished: only the others are cancelled if this one failed
                results[index] = ray.get(ref)
                finished += 1
                if on_done is not None:
                    on_done(finished)
        return results
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _saved_fit(out: OutputFolder) -> dict[str, Any] | None:
    if not out.exists(f"{CLUSTERING}/clustering.json"):
        return None
    meta = json.loads(out.read_text(f"{CLUSTERING}/clustering.json"))
    from scenecluster.fitted import filled_its_truncation

    return {"fit_key": meta.get("fit_key"), "summary": meta.get("summary", {}), "stale": filled_its_truncation(meta)}


def _write_report_sample(out: OutputFolder, report: dict[str, Any]) -> None:
    n = len(report["paths"])
    xy = np.full((n, 2), np.nan, dtype=np.float32)
    xy[np.asarray(report["xy_index"], dtype=np.int64)] = report["xy"]
    table = {"path": pa.array(report["paths"], pa.string()), "cluster": pa.array(report["clusters"], pa.int32())}
    if report["labels"] is not None:
        table["label"] = pa.array(report["labels"], pa.string())
    table.update(x=pa.array(xy[:, 0]), y=pa.array(xy[:, 1]))
    out.write_table(REPORT_SAMPLE, pa.table(table))


def _read_report_sample(out: OutputFolder) -> dict[str, Any]:
    table = out.read_table(REPORT_SAMPLE)
    xy = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)
    index = np.flatnonzero(~np.isnan(xy[:, 0]))
    return {
        "paths": table.column("path").to_pylist(),
        "labels": table.column("label").to_pylist() if "label" in table.column_names else None,
        "clusters": table.column("cluster").to_numpy(),
        "xy": xy[index],
        "xy_index": index,
    }


@dataclass
class AssignSummary:
    """Counts added up over every assigned part."""

    n: int
    novel: int
    sizes: dict[int, int]
    contingency: np.ndarray | None  # (clusters x labels) when the scenes have labels

    @property
    def n_clusters(self) -> int:
        return sum(1 for v in self.sizes.values() if v > 0)


def assign_pool_sizes(resources, actors: int, *, on_gpu: bool, at_least: int = 1) -> tuple[int, int]:
    """``(min, max)`` of the assignment actor pool: ``actors`` of them, or for ``0`` a pool that Ray Data grows
    from one actor to one per GPU of the cluster (``on_gpu``) or one per CPU, and to no fewer than ``at_least``.

    Why grow: a run of a few parts is done before a second actor has loaded the clustering, while an archive of
    millions needs every core; one actor per CPU, since each runs umap-learn's ``transform`` on one thread. An
    autoscaling cluster may have fewer nodes when the run starts than its embedding stage brings up, hence
    the floor of the embedding actors.
    """
    if actors:
        return actors, actors
    per_cluster = resources.num_gpus // resources.gpus_per_actor if on_gpu else resources.num_cpus
    return 1, max(1, int(per_cluster), at_least)


def assigns_on_gpu(resources, clustering_from: OutputFolder) -> bool:
    """Assignment actors hold GPUs only where the saved projection runs there (cuML): umap-learn's ``transform``
    is CPU work, and one actor per GPU would leave all but 8 of a cluster's 128 cores idle on it."""
    from scenecluster.fitted import read_clustering_meta

    backend = read_clustering_meta(clustering_from).get("reduce", {}).get("backend")
    return resources.use_gpu and backend == "cuml"


def assign_parts(
    out: OutputFolder,
    clustering_from: OutputFolder,
    resources,
    actors: int,
    with_labels: bool,
    at_least: int = 1,
    task_parts: int = 4,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 60.0,
) -> AssignSummary:
    """Run :class:`scenecluster.scale.PartAssigner` actors over the run's parts; add up their counts.

    ``actors`` fixes the pool's size; ``0`` lets it grow (:func:`assign_pool_sizes`), and a run of at most
    ``task_parts`` parts is assigned by Ray tasks instead, one part each and as many at a time as the pool could
    grow to: a few parts keep few actors busy, and a task runs in a worker the fit or the embedding already
    started, where a pool starts a fresh actor process (5-6 s of a 32-scene run's 11 s here). Ray Data logs a
    pool's progress; for the tasks ``progress`` is told the parts done, at most every ``progress_every_s``, as the
    embedding's tasks do (four ``.tar`` shards may hold many scenes).
    """
    import ray

    from scenecluster.manifest import manifest_parts, part_dataset
    from scenecluster.scale import PartAssigner, assign_named_parts

    forget_other_assignments(out, clustering_from)
    on_gpu = assigns_on_gpu(resources, clustering_from)
    device = "cuda" if on_gpu else "cpu"
    num_gpus = resources.gpus_per_actor if on_gpu else 0
    parts = manifest_parts(out)
    smallest, largest = assign_pool_sizes(resources, actors, on_gpu=on_gpu, at_least=at_least)
    if not actors and len(parts) <= task_parts:
        task = ray.remote(assign_named_parts).options(num_cpus=1, num_gpus=num_gpus)
        done = run_tasks_interruptibly(
            lambda part: task.remote(out, clustering_from, [part[1]], device=device, with_labels=with_labels),
            parts,
            in_flight=largest,
            on_done=every_so_often(
                progress_every_s, lambda n: f"[assign] {n} of {len(parts)} parts assigned", progress
            ),
        )
        texts = (text for texts_of_part in done for text in texts_of_part)
    else:
        ds = part_dataset(out, columns=["name"], parts=parts).map_batches(
            PartAssigner,
            fn_constructor_args=(out, clustering_from),
            fn_constructor_kwargs={"device": device, "with_labels": with_labels},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=smallest, max_size=largest),
            num_cpus=0.5,
            num_gpus=num_gpus,
        )
        texts = (text for batch in ds.iter_batches(batch_size=None, batch_format="numpy") for text in batch["counts"])
    n = novel = 0
    sizes: Counter = Counter()
    pairs: Counter = Counter()
    for text in texts:
        counts = json.loads(text)
        n, novel = n + counts["n"], novel + counts["novel"]
        sizes.update({int(k): v for k, v in counts["sizes"].items()})
        pairs.update({(int(c), lab): k for c, lab, k in counts["pairs"]})
    return AssignSummary(n=n, novel=novel, sizes=dict(sizes), contingency=_table(pairs) if pairs else None)


def forget_other_assignments(out: OutputFolder, clustering_from: OutputFolder) -> None:
    """Delete ``out``'s assignment parts unless the clustering in ``clustering_from`` wrote them, as it is now.

    Why: assignment parts are kept by name so that a rerun resumes, and a part's name says which scenes it holds,
    not which clustering assigned them. ``assign`` into the same output with another ``--clustering``, or after
    that run was fitted again, would otherwise find every part done and keep the old clusters. ``clustering.json``
    is written last by every fit, so its digest changes with any refit.
    """
    import hashlib

    digest = hashlib.sha1(clustering_from.read_bytes(f"{CLUSTERING}/clustering.json")).hexdigest()
    key = {"clustering": clustering_from.uri, "sha1": digest}
    if out.read_json(ASSIGNED_WITH, default={}) == key:
        return
    for name in out.list(ASSIGNMENTS):
        out.delete(posixpath.join(ASSIGNMENTS, name))
    out.write_text(ASSIGNED_WITH, json.dumps(key))


def _table(pairs: Counter) -> np.ndarray:
    clusters = sorted({c for c, _ in pairs})
    labels = sorted({lab for _, lab in pairs})
    table = np.zeros((len(clusters), len(labels)), dtype=np.int64)
    for (c, lab), k in pairs.items():
        table[clusters.index(c), labels.index(lab)] = k
    return table


def export_assignments(out: OutputFolder) -> None:
    """Stream the assignment parts, in listing order, into one ``assignments.parquet``."""
    writer: pq.ParquetWriter | None = None
    with out.open_atomic("assignments.parquet") as sink:
        for name in out.list(ASSIGNMENTS):
            table = out.read_table(posixpath.join(ASSIGNMENTS, name))
            if writer is None:
                writer = pq.ParquetWriter(sink, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
