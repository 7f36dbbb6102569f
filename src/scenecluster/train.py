"""Fine-tune a DINOv2 backbone on labelled source scenes with Ray Train, for better clustering features.

The driver (:func:`fit_backbone`) lists and splits the sources, checks them and the model before any worker
starts, and builds its Ray Data pipelines with the clustering job's reader (:func:`scenecluster.ingest.read_scenes`:
image files or ``.tar`` shards, read then decoded in tasks), so a scene that the clustering job can read is one
training can read; rows are labelled by the clustering job's rule (:func:`scenecluster.data.folder_label`). Each
Ray Train worker runs :func:`scenecluster.train_loop.train_loop_per_worker`: one replica of the backbone plus one
linear head per source (the recipe is :mod:`scenecluster.train_recipe`); several sources train jointly, each
batch row carrying its source index.

Classes come from the listing, before anything is read, so tar shards must sit in ``<class>/`` folders, one
class per shard, with their images at the shard's top level (which takes the shard's folder as its label; a
member under a folder that is no class of the listing is skipped and counted). Shards are read once more up
front to count their images for the step budget.

The workers checkpoint the whole training state every epoch. Ray Train V2 reloads the latest checkpoint after a
worker-group restart, and for a new ``TorchTrainer`` with the same ``RunConfig(name, storage_path)``.
``resume=True`` relies on the latter; without it, an existing run folder is refused rather than silently
continued.

The result is the last checkpoint's ``backbone/`` saved as ``OUTPUT/backbone`` (heads dropped), which
``scenecluster cluster --model OUTPUT/backbone`` loads like any other model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from scenecluster.config import FinetuneConfig, dump_config
from scenecluster.data import SceneListing, absolute_location, folder_label, list_scenes, open_filesystem
from scenecluster.devices import Resources
from scenecluster.errors import ConfigError, InputError, OutputError, one_line
from scenecluster.features import store_access
from scenecluster.ingest import READ_CPUS, attach_labels, count_scenes, read_scenes
from scenecluster.models import ResolvedBackbone, load_backbone, resolve_backbone, save_backbone
from scenecluster.outputs import atomic_write_text, check_writable
from scenecluster.pixels import PixelSpec
from scenecluster.train_loop import BACKBONE_DIR, STATE_FILE, LoopConfig, train_loop_per_worker

__all__ = ["StepPlan", "fit_backbone", "plan_steps", "train_loop_per_worker"]

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # what Ray Train V2 writes in a run folder
# in OUTPUT: the model the run started from and its weights' fingerprint, so that a rerun can tell a start-model
# folder rewritten in place (config.yaml holds only its name)
START_MODEL_FILE = "start_model.json"


def class_names(listing: SceneListing) -> list[str]:
    """The sorted class names of a ``<class>/<image>`` source, checked.

    Raises
    ------
    InputError
        When images lie directly in the root, when there are fewer than two classes, or when a class
        folder holds no image files (a likely typo or a failed copy, which would otherwise only shrink
        the head silently).
    """
    root = listing.root.rstrip("/")
    loose = [p for p in listing.paths if p.rsplit("/", 1)[0].rstrip("/") == root]
    if loose:
        raise InputError(
            f"source {listing.uri!r} has images directly in it ({loose[0]!r}); fine-tuning needs "
            "<class>/<image> folders (or <class>/<shard>.tar)"
        )
    classes = sorted({folder_label(p) for p in listing.paths})
    try:
        infos = listing.filesystem.get_file_info(pafs.FileSelector(root, recursive=False))
    except OSError:
        infos = []
    empty = sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and not i.base_name.startswith(".") and i.base_name not in classes
    )
    if empty:
        raise InputError(f"source {listing.uri!r}: class folder {empty[0]!r} holds no images; remove it or add images")
    if len(classes) < 2:
        raise InputError(
            f"source {listing.uri!r} has {len(classes)} class folder ({', '.join(classes)}); "
            "fine-tuning a classifier needs at least two"
        )
    return classes


def stratified_split(paths: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split paths per class folder: ``round(n * val_fraction)`` of each class (>= 1 if n >= 2) to val.

    Seeded, so a resumed run sees the same split. Returns ``(train, val)``, train shuffled.
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        by_class[folder_label(p)].append(p)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n_val = 0 if val_fraction == 0 or len(items) < 2 else max(1, round(len(items) * val_fraction))
        val += items[:n_val]
        train += items[n_val:]
    rng.shuffle(train)
    return train, sorted(val)


def _dataset(
    listing: SceneListing,
    paths: list[str],
    classes: list[str],
    source: int,
    image_size: int,
    batch_size: int,
    pixels: PixelSpec | None = None,
    labels: dict[str, str] | None = None,
):
    """The clustering job's reader (:func:`scenecluster.ingest.read_scenes`: files or tar shards), plus labels
    (by folder, or from ``labels`` by path for a pseudo-labelled target)."""
    ds = read_scenes(paths, listing.filesystem, image_size=image_size, batch_size=batch_size, pixels=pixels)
    kwargs = {"classes": classes, "source": source, "labels": labels}
    return ds.map_batches(attach_labels, fn_kwargs=kwargs, num_cpus=READ_CPUS)


def _count_rows(listing: SceneListing, splits: tuple[list[str], list[str]]) -> tuple[int, int]:
    """Rows ``(train, val)`` the reader yields: one per image file; a tar shard's members, counted by reading it."""
    counts = count_scenes(listing.paths, listing.filesystem)
    return sum(counts[p] for p in splits[0]), sum(counts[p] for p in splits[1])


def _union(datasets: list):
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def run_storage(cfg: FinetuneConfig) -> str:
    """Where ``cfg``'s Ray Train run lives: ``storage_path``, by default the ``output`` folder; absolute when local
    (:func:`scenecluster.data.absolute_location`)."""
    return absolute_location(cfg.storage_path or cfg.output)


def run_exists(cfg: FinetuneConfig) -> bool:
    """Whether ``cfg``'s Ray Train run (``name`` under :func:`run_storage`) has a checkpoint."""
    return _run_exists(run_storage(cfg), cfg.name, cfg.data.endpoint_url)


def discard_run(cfg: FinetuneConfig) -> None:
    """Delete ``cfg``'s Ray Train run folder and the backbone and metrics exported from it, so the next fit starts
    from scratch (Ray Train would otherwise continue the run of the same name)."""
    import shutil

    out = Path(cfg.output).expanduser().resolve()
    fs, root = open_filesystem(run_storage(cfg), endpoint_url=cfg.data.endpoint_url)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(f"{root}/{cfg.name}")
    shutil.rmtree(out / BACKBONE_DIR, ignore_errors=True)
    (out / "metrics.json").unlink(missing_ok=True)


def _run_exists(storage_path: str, name: str, endpoint_url: str | None) -> bool:
    """Whether the run has a checkpoint snapshot. A store that does not answer raises: taken for "no run", it made
    ``--resume`` start from scratch, and a fresh run could claim a folder that holds one."""
    fs, root = open_filesystem(storage_path, endpoint_url=endpoint_url)
    try:
        return fs.get_file_info(f"{root}/{name}/{SNAPSHOT_FILE}").type == pafs.FileType.File
    except OSError as exc:
        raise OutputError(f"cannot read the fine-tuning run {storage_path}/{name}: {one_line(exc)}") from None


@dataclass(frozen=True)
class _Inputs:
    """The checked sources and model: one listing and one sorted class list per head.

    The labelled sources come first, then the pseudo-labelled targets, whose ``labels`` map each scene path to
    its class (None for a source, labelled by its folders).
    """

    listings: list[SceneListing]
    classes: list[list[str]]
    backbone: ResolvedBackbone
    labels: list[dict[str, str] | None]


@dataclass(frozen=True)
class StepPlan:
    """The step budget, fixed by the driver so that every worker runs the same number of micro-batches.

    ``n_train``/``n_val`` count the rows the reader yields (a tar shard's members, unreadable files included).
    """

    n_train: int
    n_val: int
    micro_per_epoch: int
    total_steps: int


def _check_inputs(cfg: FinetuneConfig) -> _Inputs:
    """List the sources and check their classes, and check the model and ``freeze_blocks`` against it.

    Only the model's config is read (:func:`scenecluster.models.resolve_backbone`), not its weights.
    """
    from scenecluster.self_train import read_pseudo_labels

    listings = [
        list_scenes(s, endpoint_url=cfg.data.endpoint_url, sample=cfg.data.sample, seed=cfg.data.seed)
        for s in cfg.sources
    ]
    classes = [class_names(lst) for lst in listings]
    pseudo = [read_pseudo_labels(f, endpoint_url=cfg.data.endpoint_url) for f in cfg.pseudo_labels]
    backbone = resolve_backbone(cfg.feature.model, endpoint_url=cfg.data.endpoint_url)  # here, not in workers
    if cfg.freeze_blocks > backbone.num_hidden_layers:
        raise ConfigError(
            f"setting freeze_blocks: {cfg.freeze_blocks} exceeds the model's {backbone.num_hidden_layers} blocks"
        )
    return _Inputs(
        listings=listings + [p.listing for p in pseudo],
        classes=classes + [p.classes for p in pseudo],
        backbone=backbone,
        labels=[None] * len(listings) + [p.labels for p in pseudo],
    )


def _splits(cfg: FinetuneConfig, inputs: _Inputs) -> list[tuple[list[str], list[str]]]:
    """``(train, val)`` paths per head: a stratified split of each source; every pseudo-labelled scene trains
    (held-out accuracy on pseudo-labels would measure agreement with the clustering, not quality)."""
    return [
        stratified_split(lst.paths, cfg.val_fraction, cfg.data.seed + i) if labels is None else (lst.paths, [])
        for i, (lst, labels) in enumerate(zip(inputs.listings, inputs.labels, strict=True))
    ]


def _rows(inputs: _Inputs, splits: list[tuple[list[str], list[str]]]) -> list[tuple[int, int]]:
    """Rows ``(train, val)`` per head that the reader yields (a pseudo-labelled target: its labelled scenes)."""
    return [
        _count_rows(lst, split) if labels is None else (len(labels), 0)
        for lst, split, labels in zip(inputs.listings, splits, inputs.labels, strict=True)
    ]


def _claim_output(cfg: FinetuneConfig, echo, inputs: _Inputs) -> tuple[Path, str]:
    """Check the output folder and the run's storage, create the folder and write ``config.yaml`` there, and
    ``start_model.json`` (the start model's :attr:`~scenecluster.models.ResolvedBackbone.weights`) when the run
    starts afresh; a resumed run keeps the one it started from.

    Returns ``(output folder, storage path)``. A finished or interrupted run of the same name is refused
    unless ``cfg.resume``.
    """
    out = Path(cfg.output).expanduser().resolve()
    check_writable(str(out))  # a file, /proc/x, a read-only mount: one line now
    storage = run_storage(cfg)
    exists = _run_exists(storage, cfg.name, cfg.data.endpoint_url)
    if exists and not cfg.resume:
        raise OutputError(
            f"{storage}/{cfg.name} holds a previous fine-tuning run; pass --resume to continue it, "
            "or choose another --output (or name)"
        )
    if cfg.resume and not exists:
        echo(f"[finetune] nothing to resume at {storage}/{cfg.name}; starting from scratch")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    if not exists or not (out / START_MODEL_FILE).is_file():
        start = {"model": cfg.feature.model, "weights": inputs.backbone.weights}
        atomic_write_text(out / START_MODEL_FILE, json.dumps(start, indent=2) + "\n")
    return out, storage


def plan_steps(cfg: FinetuneConfig, n_train: int, n_val: int) -> StepPlan:
    """Micro-batches per epoch per worker (whole accumulation groups) and the total optimizer steps.

    Raises
    ------
    ConfigError
        When the training rows over the workers do not fill one optimizer step.
    """
    micro_per_epoch = n_train // cfg.workers // cfg.batch_size
    micro_per_epoch -= micro_per_epoch % cfg.grad_accum
    if micro_per_epoch == 0:
        raise ConfigError(
            f"setting batch_size: {n_train} training images over {cfg.workers} workers do not fill "
            f"one step of {cfg.batch_size} x {cfg.grad_accum} images; lower batch_size or grad_accum"
        )
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    total_steps = min(cfg.max_steps or 10**12, cfg.epochs * steps_per_epoch)
    return StepPlan(n_train=n_train, n_val=n_val, micro_per_epoch=micro_per_epoch, total_steps=total_steps)


def _datasets(cfg: FinetuneConfig, inputs: _Inputs, splits: list[tuple[list[str], list[str]]]) -> dict[str, Any]:
    """``{"train"[, "val"]}``: each the union over sources of the reader's rows, labelled per source."""
    parts: dict[str, list] = {"train": [], "val": []}
    heads = zip(inputs.listings, inputs.classes, splits, inputs.labels, strict=True)
    for i, (listing, classes, split, labels) in enumerate(heads):
        for name, paths in zip(("train", "val"), split, strict=True):
            if paths:
                parts[name].append(
                    _dataset(
                        listing,
                        paths,
                        classes,
                        i,
                        cfg.feature.image_size,
                        cfg.batch_size,
                        cfg.feature.pixel_spec(),
                        labels,
                    )
                )
    return {name: _union(found) for name, found in parts.items() if found}


# What ``cache_decoded="auto"`` may fill of the cluster's object store: the rest stays for Ray Data's own blocks,
# Ray Train's checkpoints and the job's other objects.
CACHE_STORE_SHARE = 0.25


def decoded_bytes(n_images: int, image_size: int) -> int:
    """Bytes of ``n_images`` decoded scenes as the reader yields them (uint8 RGB at ``image_size`` squared)."""
    return n_images * image_size * image_size * 3


def should_cache(mode: str, n_bytes: int, store_bytes: float, epochs: int) -> bool:
    """Whether to materialise the decoded datasets before training (``FinetuneConfig.cache_decoded``).

    Ray Data otherwise reads and decodes every image again in every epoch; on a small CPU node that decode takes
    most of the cores the train workers need (docs/benchmarks.md). Labelled sources are usually small (thousands to
    tens of thousands of scenes), so holding them decoded is the pattern Ray's docs recommend for a dataset reused
    across epochs; ``auto`` does it only when there is a second epoch to gain and the images fill at most
    :data:`CACHE_STORE_SHARE` of the object store.
    """
    if mode == "always":
        return True
    if mode == "never":
        return False
    return epochs > 1 and n_bytes <= CACHE_STORE_SHARE * store_bytes


def _cache_datasets(datasets: dict[str, Any], cfg: FinetuneConfig, plan: StepPlan, echo) -> dict[str, Any]:
    """``datasets``, materialised in the object store when :func:`should_cache` says so (one decode pass here)."""
    import ray

    n_bytes = decoded_bytes(plan.n_train + plan.n_val, cfg.feature.image_size)
    store = float(ray.cluster_resources().get("object_store_memory", 0.0))
    if not should_cache(cfg.cache_decoded, n_bytes, store, cfg.epochs):
        return datasets
    echo(
        f"[finetune] decoding {plan.n_train + plan.n_val} images once into the object store "
        f"({n_bytes / 2**20:.0f} MiB of {store / 2**20:.0f} MiB; --cache-decoded never to stream every epoch)"
    )
    return {name: ds.materialize() for name, ds in datasets.items()}


def _cpus_per_worker(cfg: FinetuneConfig, resources: Resources) -> float:
    if resources.use_gpu:
        return cfg.cpus_per_worker or 1.0
    # leave half a CPU for Ray Data's decode tasks, or ingest starves (see environment notes)
    return cfg.cpus_per_worker or max(0.25, (resources.cpus_per_node - 0.5) / cfg.workers)


def _loop_config(cfg: FinetuneConfig, inputs: _Inputs, plan: StepPlan, resources: Resources) -> LoopConfig:
    return LoopConfig(
        model=inputs.backbone.source,
        pooling=cfg.feature.pooling,
        classes=inputs.classes,
        mean=list(inputs.backbone.mean),
        std=list(inputs.backbone.std),
        seed=cfg.data.seed,
        freeze_blocks=cfg.freeze_blocks,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        warmup_steps=cfg.warmup_steps,
        label_smoothing=cfg.label_smoothing,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        epochs=cfg.epochs,
        micro_per_epoch=plan.micro_per_epoch,
        total_steps=plan.total_steps,
        n_val=plan.n_val,
        torch_threads=resources.torch_threads,
        cpu_dtype=cfg.resources.cpu_dtype,
        **store_access(inputs.backbone.source, cfg.data.endpoint_url),
    )


def _storage(cfg: FinetuneConfig, storage: str) -> tuple[pafs.FileSystem | None, str]:
    """Ray Train's ``(storage_filesystem, storage_path)``. An ``s3://`` storage path gets the filesystem every other
    read and write of the run uses (:func:`scenecluster.data.open_filesystem`: the driver's endpoint and explicit
    keys, pickled with it to Ray Train's controller and workers). Left to Ray, the controller (an actor) would build
    its own from its environment, which lacks them when only the driver holds them (Ray Tune resolves it in the
    driver, so its trials need nothing)."""
    if storage.startswith("s3://"):
        return open_filesystem(storage, endpoint_url=cfg.data.endpoint_url)
    return None, storage


def _trainer(cfg: FinetuneConfig, train_loop, loop_config: LoopConfig, datasets, resources: Resources, storage: str):
    """The ``TorchTrainer``: ``cfg.workers`` workers, a named run under ``storage``, restarts from checkpoints."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_fs, storage = _storage(cfg, storage)
    return TorchTrainer(
        train_loop,
        train_loop_config=asdict(loop_config),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": _cpus_per_worker(cfg, resources)},
        ),
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
    )


def _finished_run(cfg: FinetuneConfig, storage: str, plan: StepPlan):
    """The stored run's ``ray.train.Result`` when its last checkpoint already ends the training ``plan`` sets
    (the loop would run no step), else None.

    A run stopped between its final checkpoint and the export would otherwise start a worker group (on an
    autoscaling cluster: launch GPU nodes) and decode its sources into the object store, only for the restored
    workers to stop at once. ``Result.from_path`` is Ray Train's public reader of a run folder.
    """
    import ray.train

    fs, path = _storage(cfg, storage)
    try:
        result = ray.train.Result.from_path(f"{path.rstrip('/')}/{cfg.name}", storage_filesystem=fs)
    except Exception as exc:  # only a shortcut: no snapshot yet, or one this Ray cannot read, trains as before
        log.debug("no finished run read at %s/%s: %s", storage, cfg.name, one_line(exc))
        return None
    if result.checkpoint is None or not result.metrics:
        return None
    # the metrics reported with that checkpoint (read from the run's snapshot; the checkpoint is not downloaded)
    done = result.metrics.get("epoch", 0) >= cfg.epochs or result.metrics.get("step", 0) >= plan.total_steps
    return result if done else None


def _export(
    result, cfg: FinetuneConfig, out: Path, storage: str, inputs: _Inputs, plan: StepPlan, start: float
) -> dict[str, Any]:
    """Save the last checkpoint's backbone as ``OUTPUT/backbone`` and write ``OUTPUT/metrics.json``; return those."""
    if result.checkpoint is None:
        raise OutputError(f"fine-tuning {cfg.name!r} finished without a checkpoint under {storage}")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        # Loaded and saved again (not copied) so that OUTPUT/backbone is replaced atomically, as save_backbone does.
        target = save_backbone(load_backbone(Path(folder) / BACKBONE_DIR), out / BACKBONE_DIR)
    last = state["history"][-1] if state["history"] else {}
    metrics = {
        "run": cfg.name,
        "storage_path": storage,  # as given (s3://bucket/prefix or an absolute folder)
        "checkpoint": result.checkpoint.path,  # as Ray Train names it: bucket/key in a store
        "backbone": str(target),
        "sources": cfg.sources,
        "pseudo_labels": cfg.pseudo_labels,
        "classes": inputs.classes,
        "n_train": plan.n_train,
        "n_val": plan.n_val,
        "workers": cfg.workers,
        "image_size": cfg.feature.image_size,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "total_steps": plan.total_steps,
        "step": state["step"],
        "epoch": state["epoch"],
        "resumes": state["resumes"],
        "val_accuracy": last.get("val_accuracy"),
        "skipped_train": last.get("skipped_train", 0),
        "skipped_val": last.get("skipped_val", 0),
        "seconds": round(time.perf_counter() - start, 1),
        "history": state["history"],
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def fit_backbone(cfg: FinetuneConfig, *, echo=print, train_loop=train_loop_per_worker) -> Path:
    """Fine-tune ``cfg.feature.model`` on ``cfg.sources`` with Ray Train and save the backbone; return its folder.

    Everything that can be checked without workers is checked first (sources, classes, model, output), so
    a bad setting fails in seconds with a one-line error.

    Parameters
    ----------
    cfg : FinetuneConfig
        Validated settings.
    echo : callable
        Where progress lines go (``print`` for the CLI).
    train_loop : callable, default :func:`train_loop_per_worker`
        The function each Ray Train worker runs, given the :class:`LoopConfig` as a dict. This is the seam the
        tests use: they pass a wrapper of :func:`train_loop_per_worker` (one that injects a worker failure, for
        instance) instead of a test-only setting in the loop. Production runs keep the default.

    Returns
    -------
    pathlib.Path
        ``OUTPUT/backbone``: ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``.
        ``OUTPUT/metrics.json`` holds the per-epoch history.

    Raises
    ------
    InputError, ConfigError, OutputError, scenecluster.models.ModelLoadError
        Before any worker starts.
    ray.train.TrainingFailedError
        When training fails more often than ``cfg.max_failures`` allows; rerun with ``resume=True``.
    """
    from scenecluster.devices import decide
    from scenecluster.raycluster import ensure_ray

    inputs = _check_inputs(cfg)
    out, storage = _claim_output(cfg, echo, inputs)
    inventory = ensure_ray(cfg.resources)
    resources = decide(cfg.resources.device, inventory, actors=cfg.workers, torch_threads=cfg.resources.torch_threads)
    splits = _splits(cfg, inputs)
    rows = _rows(inputs, splits)
    plan = plan_steps(cfg, n_train=sum(t for t, _ in rows), n_val=sum(v for _, v in rows))
    finished = _finished_run(cfg, storage, plan) if cfg.resume else None
    if finished is not None:
        reached = finished.metrics
        echo(
            f"[finetune] {storage}/{cfg.name} had reached step {reached['step']} of {plan.total_steps}, epoch "
            f"{reached['epoch']} of {cfg.epochs}, before its export; exporting its last checkpoint without workers"
        )
        result, start = finished, time.perf_counter()
    else:
        loop_config = _loop_config(cfg, inputs, plan, resources)
        datasets = _cache_datasets(_datasets(cfg, inputs, splits), cfg, plan, echo)
        trainer = _trainer(cfg, train_loop, loop_config, datasets, resources, storage)
        n_pseudo = len(cfg.pseudo_labels)
        echo(
            f"[finetune] {plan.n_train} train / {plan.n_val} val images from {len(cfg.sources)} source(s)"
            f"{f' and {n_pseudo} pseudo-labelled target(s)' if n_pseudo else ''}, "
            f"{cfg.workers} worker(s) x {_cpus_per_worker(cfg, resources):g} CPU"
            f"{' + GPU' if resources.use_gpu else ''}, {plan.total_steps} steps"
        )
        start = time.perf_counter()
        result = trainer.fit()
    metrics = _export(result, cfg, out, storage, inputs, plan, start)
    acc = metrics["val_accuracy"]
    echo(
        f"[finetune] step {metrics['step']}/{plan.total_steps}, epoch {metrics['epoch']}, val accuracy "
        f"{'n/a' if acc is None else f'{acc:.3f}'}; backbone: {metrics['backbone']}"
    )
    return Path(metrics["backbone"])
