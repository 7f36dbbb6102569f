"""The clustering job: list -> embed -> fit on a sample -> assign every scene -> metrics, exports, report.

:func:`run_cluster_job` is the one public entry for clustering; the CLI, ``rayjobs/cluster.py`` and the tests
all call it. :func:`run_assign_job` assigns new scenes with a saved run's clustering. Both resolve the feature
(:mod:`scenecluster.features`) and the resources (:mod:`scenecluster.devices`) once, and every per-scene
stage runs on Ray workers over parts (:mod:`scenecluster.scale`): the driver holds counts, the fitted sample
for the report, and nothing that grows with the archive. Each stage prints a one-line summary and its wall
time lands in ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from scenecluster import __version__
from scenecluster.config import AssignJobConfig, ClusterJobConfig, FeatureConfig, dump_config
from scenecluster.data import input_filesystem, local_path
from scenecluster.devices import Resources, decide, resolve_cpu_dtype
from scenecluster.embed import SKIPPED, embed_parts, export_embeddings, write_skipped
from scenecluster.errors import InputError
from scenecluster.evaluate import scores_from_contingency
from scenecluster.features import FeatureSpec, resolve_feature_spec, store_access
from scenecluster.manifest import check_run_paths, listed_reading, write_manifest
from scenecluster.model_store import is_store_uri, publish_model_folder
from scenecluster.outputs import OutputFolder, prepare_output
from scenecluster.pixels import READING_REVISION
from scenecluster.reduce import umap_neighbours
from scenecluster.report import build_report
from scenecluster.stages import AssignSummary, assign_parts, check_enough_scenes, export_assignments, fit_remote

__all__ = ["StageTimer", "relabel_by_size", "run_assign_job", "run_cluster_job", "run_identity"]

#: The folder under an object-storage output that holds the run's copy of a local model folder.
MODEL_FOLDER = "model"


def run_identity(cfg: ClusterJobConfig | AssignJobConfig, spec: FeatureSpec) -> dict[str, Any]:
    """The settings that determine the embeddings: a rerun with the same identity may reuse them.

    The seed is part of it only when it draws ``data.sample``; otherwise it moves only the fit (sample, UMAP,
    mixture), so a rerun with another seed refits on the embeddings it has (the benchmark's seeds do this).
    """
    return {
        "input": cfg.data.input,
        "labels": cfg.data.labels,
        "sample": cfg.data.sample,
        "seed": cfg.data.seed if cfg.data.sample is not None else None,
        **spec.identity(),
    }


class StageTimer:
    """Times named stages and prints a one-line summary for each."""

    def __init__(self, echo=print) -> None:
        self.seconds: dict[str, float] = {}
        self.echo = echo

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        note: dict[str, str] = {}
        yield note
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.echo(f"[{name}] {note.get('summary', 'done')} ({self.seconds[name]:.1f} s)")


def run_cluster_job(cfg: ClusterJobConfig, *, overwrite: bool = False, echo=print) -> dict[str, Any]:
    """Run the whole job and return the metrics (also written to ``OUT/metrics.json``).

    Raises
    ------
    scenecluster.errors.SceneClusterError
        For bad input, settings or output folders, with a one-line message, before any Ray task starts.
    """
    timer = StageTimer(echo)
    started = _now()
    spec, out, resources = _prepare(cfg, overwrite, timer)
    manifest, embedded = _embed_stage(
        cfg, out, spec, resources, timer, check=lambda n, where: check_enough_scenes(n, cfg, where)
    )
    with timer.stage("fit") as note:
        from scenecluster.scale import fit_count

        n_fit = fit_count(embedded.n_ok, cfg.scale.fit_sample)
        reading = READING_REVISION if manifest.n_revised else None
        keys = {
            "fit_key": _fit_key(cfg, spec, n_fit, reading=reading),
            "data_prior_fit_key": _fit_key(_with_data_prior(cfg), spec, n_fit, reading=reading),
        }
        fit = fit_remote(out, embedded.parts, cfg, spec, resources, **keys, reading=reading)
        timer.seconds.update({k: v for k, v in fit["stage_seconds"].items()})
        note["summary"] = fit_summary(cfg, fit)
    assigned = _assign_stage(cfg, out, out, resources, timer)
    metrics = {**_metrics(embedded, assigned, fit), **_run_facts(resources, started)}
    _exports(cfg, out, embedded, timer)
    _report_stage(out, metrics, timer)
    return _finish(out, metrics, timer)


def _assign_stage(
    cfg: ClusterJobConfig | AssignJobConfig,
    out: OutputFolder,
    clustering_from: OutputFolder,
    resources: Resources,
    timer: StageTimer,
) -> AssignSummary:
    """Assign every part of ``out`` with the clustering saved in ``clustering_from`` (the run's own, or ``assign``'s
    ``--clustering``), as the run's ``[assign]`` stage."""
    with timer.stage("assign") as note:
        assigned = assign_parts(
            out,
            clustering_from,
            resources,
            cfg.scale.assign_actors,
            cfg.data.labels == "folders",
            at_least=cfg.embed.num_actors,
            task_parts=cfg.embed.task_parts,
            progress=timer.echo,
        )
        note["summary"] = f"{assigned.n} scenes in {assigned.n_clusters} clusters, {assigned.novel} novel"
    return assigned


def fit_summary(cfg: ClusterJobConfig, fit: dict[str, Any]) -> str:
    """The fit stage's line: what was fitted (or reused) on how many scenes, the clusters, and whether the mixture
    needed more room than ``--max-clusters`` (:func:`scenecluster.cluster.fit_clusterer`)."""
    info = fit.get("info", {})
    grown = (
        f" (the mixture's truncation grew from {info['n_components_configured']} to {info['n_components']})"
        if "n_components_configured" in info
        else ""
    )
    return (
        f"{'reused' if fit['reused'] else 'fitted'} {cfg.reduce.method} + {cfg.cluster.method} on "
        f"{fit['n_fit']} scenes: {fit['n_clusters']} clusters{grown}"
    )


def run_assign_job(cfg: AssignJobConfig, *, overwrite: bool = False, echo=print) -> dict[str, Any]:
    """Embed the scenes of ``cfg.data.input`` with a saved run's feature and assign them with its clustering.

    Cluster ids are the saved run's; scenes less likely than the run's calibrated threshold are ``novel``.
    """
    from scenecluster.fitted import read_clustering_meta

    timer = StageTimer(echo)
    started = _now()
    source = OutputFolder(cfg.clustering, endpoint_url=cfg.data.endpoint_url)
    if source.is_local and not Path(source.root).is_dir():
        raise InputError(f"clustering {cfg.clustering!r} is not a folder: give the output folder of a clustering run")
    meta = read_clustering_meta(source)
    feature = meta["feature"]
    saved = _feature_settings(feature)
    overruled = overruled_feature_settings(cfg.embed, saved)
    if overruled:  # e.g. --model or --layer: the clustering only knows its own feature space
        echo(f"[assign] the saved clustering's feature is used, not the {', '.join(overruled)} given")
    cfg = cfg.model_copy(update={"embed": cfg.embed.model_copy(update=saved)}, deep=True)
    spec, out, resources = _prepare(cfg, overwrite, timer, fitted_feature=feature)
    manifest, embedded = _embed_stage(cfg, out, spec, resources, timer)
    mismatch = reading_mismatch(meta, source, manifest.n_revised)
    if mismatch:
        echo(f"[assign] {mismatch}")
    assigned = _assign_stage(cfg, out, source, resources, timer)
    metrics = {
        **_metrics(embedded, assigned, None),
        "clustering": source.display("clustering"),
        **_run_facts(resources, started),
    }
    _exports(cfg, out, embedded, timer)
    _report_stage(out, metrics, timer)
    return _finish(out, metrics, timer)


def reading_mismatch(meta: dict[str, Any], source: OutputFolder, n_revised: int) -> str | None:
    """What to tell a user whose ``n_revised`` listed scenes other than JPEG are read by this scenecluster's
    :data:`~scenecluster.pixels.READING_REVISION`, when the saved clustering (``meta``, saved in ``source``) was
    fitted on such scenes read by another (an earlier one, or a later one after a downgrade); None when nothing
    differs.

    Why a warning and not a refusal: the vectors of most scenes move little across a revision (the footprint's
    edge, a band's role), and the clustering still assigns them; but they may sit apart from the vectors it was
    fitted on, and a rerun of the fitted run re-embeds only those scenes and refits (:mod:`scenecluster.manifest`).
    A clustering fitted on JPEGs alone (``reading`` None) fits any revision's scenes.
    """
    fitted = meta["reading"] if "reading" in meta else listed_reading(source)  # saved before it was recorded
    if not n_revised or fitted is None or fitted == READING_REVISION:
        return None
    return (
        f"warning: the clustering in {source.display('clustering')} was fitted on scenes other than JPEG read by "
        f"another scenecluster (reading revision {fitted}, this one's is {READING_REVISION}), and {n_revised:,} of "
        "the scenes listed here are such scenes: their vectors may sit apart from the ones it was fitted on. Run "
        "that clustering again into its output folder with this scenecluster (it re-embeds only those scenes and "
        "refits), then assign with it"
    )


def overruled_feature_settings(embed, saved: dict[str, Any]) -> list[str]:
    """The feature settings set in ``embed`` (an ``EmbedConfig``) away from their defaults that the saved
    clustering's feature ``saved`` replaces, as ``embed.<name>=<value>``: ``assign`` says so instead of quietly
    embedding with other settings than the user asked for."""
    given = embed.model_dump(include=set(saved), exclude_defaults=True)
    return [f"embed.{name}={value}" for name, value in sorted(given.items()) if value != saved[name]]


def _feature_settings(feature: dict[str, Any]) -> dict[str, Any]:
    """The saved run's feature as ``embed`` settings; a run saved before the pixel settings used their defaults."""
    pixels = {k: feature.get(k, FeatureConfig.model_fields[k].default) for k in FeatureConfig.PIXEL_SETTINGS}
    pixels["percentiles"] = tuple(pixels["percentiles"])  # JSON keeps a list; the setting is a tuple
    return {
        "model": feature["model"],
        "layer": feature["layer"],
        "pooling": feature["pooling"],
        "image_size": feature["image_size"],
        **pixels,
        "views": feature.get("views", "one"),
    }


def _local_model(model: str) -> Path | None:
    """The local folder ``model`` names (a path or a ``file://`` URI), or None (a Hub id, an ``s3://`` URI)."""
    try:
        folder = Path(local_path(model)).expanduser()
    except ValueError:  # NotLocalError is one: a Hub id is not, an s3:// URI is
        return None
    return folder if folder.is_dir() else None


def _published_model(cfg) -> tuple[Path, str] | None:
    """The run's local model folder and where the run copies it, ``<output>/model``, when the output is in object
    storage; else None.

    Why: such a run's actors may start on nodes that cannot see the driver's disk (on an autoscaling or KubeRay
    cluster, a fine-tuned backbone exported on the head node), and its saved clustering names the model for an
    ``assign`` run long after that node is gone (:func:`scenecluster.model_store.publish_model_folder`).
    """
    folder = _local_model(cfg.embed.model) if is_store_uri(cfg.output) else None
    return None if folder is None else (folder, f"{cfg.output.rstrip('/')}/{MODEL_FOLDER}")


def _prepare(
    cfg, overwrite: bool, timer: StageTimer, fitted_feature: dict[str, Any] | None = None
) -> tuple[FeatureSpec, OutputFolder, Resources]:
    """Check the input, resolve the feature, claim the output, decide the resources: all before heavy work.

    ``fitted_feature``: the saved clustering's feature, for ``assign``; its model must still hold the weights the
    clustering was fitted on, or the new scenes would land in a space the clustering has never seen.
    """
    from scenecluster.raycluster import ensure_ray

    check_run_paths(cfg.data.input, cfg.output, endpoint_url=cfg.data.endpoint_url)
    # The feature is checked against the model's config (not its weights) before the output is claimed and
    # Ray starts, so a bad layer or model fails in the driver in a second; for the offline model this also
    # builds its folder once here rather than in every actor.
    spec = resolve_feature_spec(
        cfg.embed.model,
        layer=cfg.embed.layer,
        pooling=cfg.embed.pooling,
        image_size=cfg.embed.image_size,
        pixels=cfg.embed.pixel_spec(),
        views=cfg.embed.views,
        endpoint_url=cfg.data.endpoint_url,
    )
    saved_weights = (fitted_feature or {}).get("weights")
    if saved_weights is not None and spec.weights != saved_weights:
        raise InputError(
            f"the clustering in {cfg.clustering} was fitted on features of {spec.model} when it held weights "
            f"{saved_weights}, and it now holds {spec.weights}: assign with the backbone the clustering was "
            "fitted with, or cluster again with this one"
        )
    published = _published_model(cfg)
    if published is not None:  # same weights, so the same fingerprint: only where workers read them changes
        copy = published[1]
        spec = dataclasses.replace(spec, model=copy, source=copy, **store_access(copy, cfg.data.endpoint_url))
    out = prepare_output(
        OutputFolder(cfg.output, endpoint_url=cfg.data.endpoint_url), run_identity(cfg, spec), overwrite=overwrite
    )
    out.write_text("config.yaml", dump_config(cfg))
    if published is not None:
        folder, copy = published
        uploaded = publish_model_folder(folder, copy, endpoint_url=cfg.data.endpoint_url)
        timer.echo(
            f"[model] {cfg.embed.model} {'copied to' if uploaded else 'already in'} {copy}: every node's "
            "actors load it there, and the run names it for later runs"
        )
    inventory = ensure_ray(cfg.resources)
    timer.echo(f"[ray] {inventory.where}: {inventory.num_cpus:g} CPUs, {inventory.num_gpus:g} GPUs")
    resources = decide(
        cfg.resources.device,
        inventory,
        actors=cfg.embed.num_actors,
        torch_threads=cfg.resources.torch_threads,
        actor_gpus=cfg.embed.actor_gpus,
        decode=cfg.embed.decode,
        actor_cpus=cfg.embed.actor_cpus,
        cpu_dtype=cfg.resources.cpu_dtype,
    )
    return spec, out, resources


def _embed_stage(
    cfg,
    out: OutputFolder,
    spec: FeatureSpec,
    resources: Resources,
    timer: StageTimer,
    check: Callable[[int, str], None] | None = None,
):
    """List, then embed every scene; return the listing's counts and the pass's. ``check(n, where)`` may refuse the
    count before and after the embedding."""
    with timer.stage("list") as note:
        manifest = write_manifest(
            cfg.data.input,
            out,
            identity=spec.identity(),
            chunk_size=cfg.embed.chunk_size,
            endpoint_url=cfg.data.endpoint_url,
            sample=cfg.data.sample,
            seed=cfg.data.seed,
            progress=lambda n: timer.echo(f"[list] {n:,} images so far under {cfg.data.input}"),
        )
        parts = f"{manifest.n_parts} part{'s' if manifest.n_parts != 1 else ''}"
        note["summary"] = f"{manifest.n_sources} images under {cfg.data.input} in {parts}" + (
            # a rerun goes on over the scenes first listed; without a word, scenes added since vanish silently
            ", as listed by the run before in this folder (scenes added since: `scenecluster assign`, or another "
            "--output)"
            if manifest.kept
            else ""
        )
    if check is not None and manifest.n_archives == 0:  # a shard's members are only counted when it is read
        check(manifest.n_sources, f"under {cfg.data.input}")
    with timer.stage("embed") as note:
        filesystem = input_filesystem(cfg.data.input, endpoint_url=cfg.data.endpoint_url)[0]
        embedded = embed_parts(
            out, filesystem, spec, resources, cfg.embed, with_labels=cfg.data.labels == "folders", progress=timer.echo
        )
        write_skipped(out)
        note["summary"] = embedded.summary()
    if check is not None:
        check(embedded.n_ok, f"of {embedded.n_images} could be read under {cfg.data.input} (see {SKIPPED})")
    return manifest, embedded


def _fit_key(cfg: ClusterJobConfig, spec: FeatureSpec, n_fit: int, *, reading: int | None = None) -> str:
    """What decides the fitted clustering: a change refits and reassigns.

    The run's identity (input, sample, feature and weights) is in it: ``--overwrite`` over a run of other scenes or
    another feature replaces the embeddings, and a fit kept from the old ones would assign the new scenes with the
    old clusters (and show the old scenes in the report). UMAP's neighbour count is in it as the fit of ``n_fit``
    scenes uses it (:func:`scenecluster.reduce.umap_neighbours`), not as ``neighbors_share``: a run fitted on
    2,700 scenes or more, whose count the share does not change, keeps the key it had before the setting existed.
    ``reading`` is :data:`scenecluster.pixels.READING_REVISION` for a run that lists scenes whose reading has been
    revised (None for JPEG alone): their parts are re-embedded after an upgrade that reads them otherwise, so the
    fit on their old vectors is not kept either, while a run of JPEGs keeps the key it had.
    """
    reduce = cfg.reduce.model_dump(exclude={"neighbors_share"})
    reduce["n_neighbors"] = umap_neighbours(cfg.reduce.n_neighbors, cfg.reduce.neighbors_share, n_fit)
    settings = {
        "run": run_identity(cfg, spec),
        "reduce": reduce,
        "cluster": cfg.cluster.key_settings(),
        "fit_sample": cfg.scale.fit_sample,
        "novelty_quantile": cfg.scale.novelty_quantile,
        "seed": cfg.data.seed,
    }
    if reading is not None:
        settings["reading"] = reading
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _with_data_prior(cfg: ClusterJobConfig) -> ClusterJobConfig:
    """``cfg`` with the mixture's data prior: its fit key (``data_prior_fit_key`` in ``clustering.json``) is what
    self-training's pseudo-labels are keyed on (:func:`scenecluster.self_train.pseudo_label_key`). They always
    refit with the data prior, so a run made before the neighbourhood prior became the default keeps its
    pseudo-labels, and its round's fine-tune, after the upgrade."""
    return cfg.model_copy(update={"cluster": cfg.cluster.with_data_prior()})


def _metrics(embedded, assigned: AssignSummary, fit: dict[str, Any] | None) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "n_images": int(embedded.n_images),
        "n_embedded": int(embedded.n_ok),
        "n_skipped": int(embedded.n_images - embedded.n_ok),
        "n_clusters": assigned.n_clusters,
        "n_novel": assigned.novel,
    }
    if fit is not None:
        metrics.update(n_fit=fit["n_fit"], converged=fit["info"]["converged"], lower_bound=fit["info"]["lower_bound"])
    if assigned.contingency is not None:
        scores = scores_from_contingency(assigned.contingency)
        metrics.update({k: v for k, v in scores.items() if k != "n_clusters"})
    return metrics


def _exports(cfg, out: OutputFolder, embedded, timer: StageTimer) -> None:
    """Single-file copies of the part datasets, for runs small enough to want them."""
    export = cfg.scale.export == "always" or (cfg.scale.export == "auto" and embedded.n_ok <= cfg.scale.export_limit)
    if not export:
        return
    with timer.stage("write") as note:
        export_embeddings(out, embedded, with_labels=cfg.data.labels == "folders")
        export_assignments(out)
        note["summary"] = f"{out.display('embeddings.parquet')} and assignments.parquet"


def _report_stage(out: OutputFolder, metrics: dict[str, Any], timer: StageTimer) -> None:
    """Write report.html from the run folder (as ``scenecluster report`` would), with the metrics so far."""
    with timer.stage("report") as note:
        page_metrics = {
            **metrics,
            "stage_seconds": dict(timer.seconds),
            "scenecluster_version": __version__,
            "finished_at": _now(),
        }
        page = build_report(out, metrics=page_metrics, report_pending=True, echo=timer.echo)
        out.write_text("report.html", page)
        note["summary"] = out.display("report.html")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _run_facts(resources: Resources, started: str) -> dict[str, Any]:
    """Where and when the run ran, for the report's run card (settings are in config.yaml)."""
    import platform

    import torch

    dtype = resources.dtype
    if dtype == "auto":  # each actor resolves it on its own node's CPU; a local run's actors run on this one
        dtype = f"auto ({str(resolve_cpu_dtype(dtype)).removeprefix('torch.')} on the driver's CPU)"
    device: dict[str, Any] = {"device": resources.device, "dtype": dtype}
    if resources.use_gpu and torch.cuda.is_available():
        device["gpu"] = torch.cuda.get_device_name(0)
    device.update(cpus_per_node=resources.cpus_per_node, host=platform.node(), torch=torch.__version__)
    return {"device": device, "started_at": started}


def _finish(out: OutputFolder, metrics: dict[str, Any], timer: StageTimer) -> dict[str, Any]:
    metrics["stage_seconds"] = timer.seconds
    metrics["scenecluster_version"] = __version__
    metrics["finished_at"] = _now()
    out.write_text("metrics.json", json.dumps(metrics, indent=2, default=_plain))
    return metrics


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def relabel_by_size(raw: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..k-1 from the largest to the smallest, so ids are dense and stable to read."""
    ids, counts = np.unique(raw, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    mapping = {old: new for new, old in enumerate(order)}
    return np.array([mapping[c] for c in raw], dtype=np.int32)
