"""Fine-tune a DINOv2 backbone on labelled source scenes with Ray Train, for better clustering features.

The driver (:func:`fit_backbone`) lists and splits the sources, checks them and the model before any worker
starts, and builds its Ray Data pipelines with the clustering job's reader (:func:`scenecluster.ingest.read_scenes`:
image files or ``.tar`` shards, read then decoded in tasks), so a scene that the clustering job can read is one
training can read; rows are labelled by the clustering job's rule (:func:`scenecluster.data.folder_label`). Each
Ray Train worker (:func:`train_loop_per_worker`) holds one replica of the backbone plus one linear head per
source; several sources train jointly, each batch row carrying its source index.

Classes come from the listing, before anything is read, so tar shards must sit in ``<class>/`` folders, one
class per shard, with their images at the shard's top level (which takes the shard's folder as its label; a
member under a folder that is no class of the listing is skipped and counted). Shards are read once more up
front to count their images for the step budget.

Checkpoints hold the whole training state, and no pickles: the backbone as a transformers folder ``backbone/``
(:func:`scenecluster.models.save_backbone`), and the heads, optimizer, scheduler, epoch, step and metric
history in ``state.pt`` as tensors and plain data, read back with ``torch.load(..., weights_only=True)``. Ray
Train V2 (Ray >= 2.50) reloads the latest one in two cases: a worker-group restart under
``FailureConfig(max_failures)``, and a new ``TorchTrainer`` with the same ``RunConfig(name, storage_path)``,
whose checkpoint manager finds the run's ``checkpoint_manager_snapshot.json`` there. ``resume=True`` relies
on the latter; without it, an existing run folder is refused rather than silently continued.

The result is the last checkpoint's ``backbone/`` saved as ``OUTPUT/backbone`` (heads dropped), which
``scenecluster cluster --model OUTPUT/backbone`` loads like any other model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from pydantic import SecretStr
from torch import nn

from scenecluster.augment import augment_batch, to_tensor
from scenecluster.config import FinetuneConfig, dump_config
from scenecluster.data import SceneListing, absolute_location, folder_label, list_scenes, open_filesystem
from scenecluster.devices import Resources
from scenecluster.errors import ConfigError, InputError, OutputError, one_line
from scenecluster.features import revealed_keys, store_access
from scenecluster.ingest import READ_CPUS, attach_labels, count_scenes, read_scenes
from scenecluster.models import (
    ResolvedBackbone,
    load_backbone,
    normalize,
    pool_tokens,
    pooled_width,
    resolve_backbone,
    save_backbone,
)
from scenecluster.outputs import atomic_write_text, check_writable
from scenecluster.pixels import PixelSpec

__all__ = [
    "LoopConfig",
    "SceneClassifier",
    "StepPlan",
    "TrainState",
    "fit_backbone",
    "plan_steps",
    "train_loop_per_worker",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # in a checkpoint: heads, optimizer, scheduler, counters (tensors and plain data only)
BACKBONE_DIR = "backbone"  # in a checkpoint and in OUTPUT: the backbone as a transformers folder
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # what Ray Train V2 writes in a run folder
# in OUTPUT: the model the run started from and its weights' fingerprint, so that a rerun can tell a start-model
# folder rewritten in place (config.yaml holds only its name)
START_MODEL_FILE = "start_model.json"


# ------------------------------------------------------------------------------------------------- model
class SceneClassifier(nn.Module):
    """A DINOv2 backbone shared by one linear head per source.

    ``forward`` returns every head's logits for every row (heads are tiny), so all parameters take part
    in each step and DDP needs no ``find_unused_parameters``; the loss picks each row's own head.
    """

    def __init__(self, backbone: nn.Module, n_classes: list[int], pooling: str = "cls") -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        width = pooled_width(backbone.config.hidden_size, pooling)
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in n_classes)
        for head in self.heads:
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = pool_tokens(self.backbone(pixel_values=pixel_values).last_hidden_state, self.pooling)
        return tuple(head(feats) for head in self.heads)


def freeze_layers(model: SceneClassifier, n_blocks: int) -> None:
    """Freeze the patch embedding (with CLS and position tokens) and the first ``n_blocks`` blocks.

    Early blocks hold generic low-level filters that a small source set would only disturb. The mask
    token is always frozen: it is used only in masked pre-training, and DDP refuses parameters without
    gradients.
    """
    emb = model.backbone.embeddings
    if getattr(emb, "mask_token", None) is not None:
        emb.mask_token.requires_grad_(False)
    if n_blocks > 0:
        emb.requires_grad_(False)
        for layer in model.backbone.encoder.layer[:n_blocks]:
            layer.requires_grad_(False)


def _layer_id(name: str, n_layers: int) -> int:
    """0 for the embeddings, i + 1 for block i, n_layers + 1 for the final norm and the heads."""
    if name.startswith("backbone.embeddings."):
        return 0
    if name.startswith("backbone.encoder.layer."):
        return int(name.split(".")[3]) + 1
    return n_layers + 1


def param_groups(model: SceneClassifier, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise LR decay (BEiT/DINOv2 fine-tuning recipe).

    Block ``i`` of ``L`` gets ``lr * layer_decay ** (L - i)``, so the later, more task-specific blocks and the
    heads move most. Biases, norms and the embedding tokens get no weight decay, since shrinking them
    towards zero has no regularising meaning.
    """
    n_layers = model.backbone.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = _layer_id(name, n_layers)
        no_decay = p.ndim == 1 or name.endswith(("cls_token", "position_embeddings", "register_tokens"))
        key = (lid, no_decay)
        if key not in groups:
            scale = layer_decay ** (n_layers + 1 - lid)
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up from 0 to 1 over ``warmup_steps``, then cosine decay to 0 at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ------------------------------------------------------------------------------------------------ worker
def _all_reduce(values: list[float]) -> list[float]:
    """Sum ``values`` across workers (gloo or NCCL); identity on a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def _loss(
    logits: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    sources: torch.Tensor,
    weight: torch.Tensor,
    smoothing: float,
) -> torch.Tensor:
    """Sum over rows of the cross-entropy of each row's own source head, rows weighted (0 = dropped)."""
    total = logits[0].new_zeros(())
    for s, head_logits in enumerate(logits):
        mask = sources == s
        ce = F.cross_entropy(head_logits[mask].float(), labels[mask], label_smoothing=smoothing, reduction="none")
        total = total + (ce * weight[mask]).sum()
    return total


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs, fixed once by :func:`fit_backbone` (``train_loop_config`` is its ``asdict``).

    ``classes`` holds one class list per source (one head each); ``micro_per_epoch`` and ``total_steps`` are the
    driver's step budget (:class:`StepPlan`), the same on every worker so that DDP's collectives stay in step;
    ``n_val`` says whether there is a validation split.
    """

    model: str
    pooling: str
    classes: list[list[str]]
    mean: list[float]
    std: list[float]
    seed: int
    freeze_blocks: int
    lr: float
    weight_decay: float
    layer_decay: float
    warmup_steps: int
    label_smoothing: float
    batch_size: int
    grad_accum: int
    epochs: int
    micro_per_epoch: int
    total_steps: int
    n_val: int
    torch_threads: int | None = None
    endpoint_url: str | None = None  # the store of an s3:// start model
    # The driver's explicit S3 keys for an s3:// start model: `ray job submit` leaves the user's AWS variables in
    # the driver, so workers on other nodes would have none (the embedding actors' FeatureSpec carries them too).
    # SecretStr (scenecluster.features.store_access): Ray Train records the loop config in its run state.
    credentials: dict[str, SecretStr] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Worker:
    """This worker's place in the group and where it computes."""

    rank: int
    world: int
    device: torch.device

    @property
    def use_amp(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """bf16 autocast on GPUs; a no-op on the CPU."""
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.use_amp)


@dataclass
class TrainState:
    """The model being trained and everything a checkpoint carries from one epoch (or one attempt) to the next.

    ``model`` is what :func:`ray.train.torch.prepare_model` returned (DDP-wrapped with several workers), ``core``
    the :class:`SceneClassifier` inside it. ``resumes`` lists ``{"epoch", "step"}`` of every restart or resume.
    """

    model: nn.Module
    core: SceneClassifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[dict[str, int]] = field(default_factory=list)


@dataclass
class _EpochSums:
    """One worker's sums over an epoch (training and validation), added over the group by :func:`_epoch_metrics`."""

    n_sources: int
    loss_sum: float = 0.0
    n_images: float = 0.0
    skipped_train: float = 0.0
    skipped_val: float = 0.0
    seconds: float = 0.0
    correct: list[float] = field(default_factory=list)
    seen: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.correct = self.correct or [0.0] * self.n_sources
        self.seen = self.seen or [0.0] * self.n_sources


def _this_worker() -> _Worker:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return _Worker(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=ray.train.torch.get_device())


def _build_state(cfg: LoopConfig) -> TrainState:
    """Build the model (backbone + one head per source, early blocks frozen), AdamW and the LR schedule."""
    import ray.train.torch

    torch.manual_seed(cfg.seed)  # same head init on every rank (DDP also broadcasts rank 0's)
    backbone = load_backbone(cfg.model, endpoint_url=cfg.endpoint_url, credentials=revealed_keys(cfg.credentials))
    model = SceneClassifier(backbone, [len(c) for c in cfg.classes], cfg.pooling)
    freeze_layers(model, cfg.freeze_blocks)
    model = ray.train.torch.prepare_model(model)
    core: SceneClassifier = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(param_groups(core, cfg.lr, cfg.weight_decay, cfg.layer_decay), betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.total_steps))
    return TrainState(model=model, core=core, optimizer=optimizer, scheduler=scheduler)


def _training_state(state: TrainState, cfg: LoopConfig) -> dict[str, Any]:
    """Everything a checkpoint holds besides the backbone: the heads, optimizer, scheduler, counters and history.

    Only tensors, numbers, strings, lists and dicts, so that ``torch.load(..., weights_only=True)`` reads it: a
    checkpoint is data, never code to unpickle. The backbone goes beside it as a transformers folder.
    """
    return {
        "heads": state.core.heads.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "history": state.history,
        "resumes": state.resumes,
        "classes": cfg.classes,
    }


def _restore(state: TrainState, checkpoint, cfg: LoopConfig) -> None:
    """Continue from ``checkpoint`` (a worker-group restart, or a resumed run): weights, optimizer, scheduler,
    epoch, step and history; training goes on at the next epoch.

    The backbone comes from the checkpoint's ``backbone/`` transformers folder, the rest from ``state.pt``
    (:func:`_training_state`), read with ``weights_only=True``.
    """
    with checkpoint.as_directory() as folder:
        saved = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        backbone = load_backbone(Path(folder) / BACKBONE_DIR)
    state.core.backbone.load_state_dict(backbone.state_dict())
    state.core.heads.load_state_dict(saved["heads"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.epoch, state.step, state.history = saved["epoch"], saved["step"], saved["history"]
    state.resumes = [*saved["resumes"], {"epoch": state.epoch, "step": state.step}]
    # A new budget (more epochs or max_steps on --resume) stretches the cosine to the new end.
    lr_lambda = warmup_cosine(cfg.warmup_steps, cfg.total_steps)
    state.scheduler.lr_lambdas = [lr_lambda] * len(state.optimizer.param_groups)


def _readable(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Mask of the rows that were read and decoded (no ``error``)."""
    return np.array([not e for e in batch["error"]], dtype=bool)


def _train_micro_batch(
    state: TrainState,
    batch: dict[str, np.ndarray],
    ok: np.ndarray,
    gen: torch.Generator,
    *,
    last: bool,
    cfg: LoopConfig,
    worker: _Worker,
) -> tuple[float, float]:
    """Forward and backward one micro-batch (an optimizer step when ``last`` of its accumulation group).

    Returns the summed loss of its readable rows and their number. A batch with none keeps DDP in step with
    one dummy row of zero weight.
    """
    weight = torch.ones(int(ok.sum()))
    if not ok.any():
        ok[0], weight = True, torch.zeros(1)
    # Augment on the worker's device: on a GPU the CPU path ran at 18% of the model's step rate.
    images = torch.as_tensor(batch["image"][ok]).to(worker.device, non_blocking=True)
    x = augment_batch(images, gen, mean=cfg.mean, std=cfg.std)
    labels = torch.as_tensor(batch["label"][ok]).to(worker.device)
    sources = torch.as_tensor(batch["source"][ok]).to(worker.device)
    sync = state.model.no_sync() if hasattr(state.model, "no_sync") and not last else contextlib.nullcontext()
    with sync, worker.autocast():
        logits = state.model(x)
        loss = _loss(logits, labels, sources, weight.to(worker.device), cfg.label_smoothing)
        loss = loss / (max(1, len(x)) * cfg.grad_accum)
        loss.backward()
    if last:
        torch.nn.utils.clip_grad_norm_(state.core.parameters(), 1.0)
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
    return float(loss) * cfg.grad_accum * float(weight.sum()), float(weight.sum())


def _train_epoch(state: TrainState, shard, cfg: LoopConfig, worker: _Worker, sums: _EpochSums) -> None:
    """One pass over this worker's shard, into ``sums``.

    Exactly ``micro_per_epoch`` micro-batches train on every worker (shards are split equally and the last
    partial batch is dropped), so DDP's collectives stay in step; unreadable rows are dropped from the loss and
    counted.
    """
    state.model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.epoch * 1_009 + worker.rank)
    start = time.perf_counter()
    batches = shard.iter_batches(
        batch_size=cfg.batch_size,
        batch_format="numpy",
        drop_last=False,
        local_shuffle_buffer_size=4 * cfg.batch_size,
        local_shuffle_seed=cfg.seed + state.epoch * 1_009 + worker.rank,
    )
    for micro, batch in enumerate(batches):
        if state.step >= cfg.total_steps:
            break
        ok = _readable(batch)
        sums.skipped_train += float((~ok).sum())
        if micro >= cfg.micro_per_epoch:
            # The short last batch is not trained on (every worker must take the same number of
            # steps for DDP), but its unreadable images are still counted: each is counted once.
            continue
        last = (micro + 1) % cfg.grad_accum == 0
        loss, n_images = _train_micro_batch(state, batch, ok, gen, last=last, cfg=cfg, worker=worker)
        sums.loss_sum += loss
        sums.n_images += n_images
    sums.seconds = time.perf_counter() - start


def _validate(state: TrainState, shard, cfg: LoopConfig, worker: _Worker, sums: _EpochSums) -> None:
    """Count correct predictions per source on this worker's validation shard (no augmentation), into ``sums``."""
    state.model.eval()
    with torch.no_grad(), worker.autocast():
        for batch in shard.iter_batches(batch_size=2 * cfg.batch_size, batch_format="numpy"):
            ok = _readable(batch)
            sums.skipped_val += float((~ok).sum())
            if not ok.any():
                continue
            x = normalize(to_tensor(batch["image"][ok]), cfg.mean, cfg.std).to(worker.device)
            logits = state.core(x)
            for s in range(sums.n_sources):
                mask = batch["source"][ok] == s
                if mask.any():
                    pred = logits[s][torch.as_tensor(mask, device=worker.device)].argmax(1).cpu().numpy()
                    sums.correct[s] += float((pred == batch["label"][ok][mask]).sum())
                    sums.seen[s] += float(mask.sum())


def _epoch_metrics(state: TrainState, sums: _EpochSums, world: int) -> dict[str, Any]:
    """The group's metrics of the epoch just finished: every worker's sums added (an all-reduce)."""
    n = sums.n_sources
    totals = _all_reduce(
        [sums.loss_sum, sums.n_images, sums.skipped_train, sums.skipped_val, sums.seconds, *sums.correct, *sums.seen]
    )
    loss_sum, n_images, skipped_train, skipped_val, seconds = totals[:5]
    correct, seen = totals[5 : 5 + n], totals[5 + n : 5 + 2 * n]
    slowest = seconds / world  # mean worker time; images/s is for the whole group
    return {
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": loss_sum / max(n_images, 1.0),
        "val_accuracy": sum(correct) / sum(seen) if sum(seen) else None,
        "val_accuracy_per_source": [c / t if t else None for c, t in zip(correct, seen, strict=True)],
        "images_per_s": n_images / max(slowest, 1e-9),
        "train_images": int(n_images),
        "skipped_train": int(skipped_train),
        "skipped_val": int(skipped_val),
        "lr": state.scheduler.get_last_lr()[-1],
    }


def _report(state: TrainState, metrics: dict[str, Any], cfg: LoopConfig, worker: _Worker) -> None:
    """Every rank reports the epoch's metrics; rank 0 attaches the checkpoint of the whole training state.

    The checkpoint holds ``backbone/`` (:func:`scenecluster.models.save_backbone`, what the driver exports) and
    ``state.pt`` (:func:`_training_state`).
    """
    import ray.train

    with tempfile.TemporaryDirectory(prefix="scenecluster-ckpt-") as folder:
        checkpoint = None
        if worker.rank == 0:
            save_backbone(state.core.backbone, Path(folder) / BACKBONE_DIR)
            torch.save(_training_state(state, cfg), Path(folder) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({**metrics, "resumes": len(state.resumes)}, checkpoint=checkpoint)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: train the shared backbone and per-source heads, validate and checkpoint each epoch.

    ``config`` is :class:`LoopConfig` as a dict, built by :func:`fit_backbone`. The steps follow Ray's
    ``TorchTrainer`` examples: build the model, optimizer and schedule; restore from ``ray.train.get_checkpoint()``
    (a restart, or a resumed run); then per epoch one training pass, one validation pass, and a report with a
    checkpoint.
    """
    import ray.train

    cfg = LoopConfig(**config)
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    worker = _this_worker()
    state = _build_state(cfg)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        _restore(state, checkpoint, cfg)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.n_val else None
    while state.epoch < cfg.epochs and state.step < cfg.total_steps:
        sums = _EpochSums(n_sources=len(cfg.classes))
        _train_epoch(state, train_shard, cfg, worker, sums)
        if val_shard is not None:
            _validate(state, val_shard, cfg, worker, sums)
        state.epoch += 1
        metrics = _epoch_metrics(state, sums, worker.world)
        state.history.append(metrics)
        _report(state, metrics, cfg, worker)


# ------------------------------------------------------------------------------------------------ driver
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
        **store_access(inputs.backbone.source, cfg.data.endpoint_url),
    )


def _storage(cfg: FinetuneConfig, storage: str) -> tuple[pafs.FileSystem | None, str]:
    """Ray Train's ``(storage_filesystem, storage_path)``: an S3 store at ``cfg.data.endpoint_url`` needs its own."""
    if storage.startswith("s3://") and cfg.data.endpoint_url:
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
    storage = _storage(cfg, storage)[1]
    if result.checkpoint is None:
        raise OutputError(f"fine-tuning {cfg.name!r} finished without a checkpoint under {storage}")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        # Loaded and saved again (not copied) so that OUTPUT/backbone is replaced atomically, as save_backbone does.
        target = save_backbone(load_backbone(Path(folder) / BACKBONE_DIR), out / BACKBONE_DIR)
    last = state["history"][-1] if state["history"] else {}
    metrics = {
        "run": cfg.name,
        "storage_path": str(storage),
        "checkpoint": result.checkpoint.path,
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
