"""The Ray Train worker of a fine-tune: :func:`train_loop_per_worker` and the state it checkpoints.

:func:`scenecluster.train.fit_backbone` fixes everything a worker needs in one :class:`LoopConfig` and hands it
to ``TorchTrainer`` as ``train_loop_config``. Each worker holds one replica of the model
(:class:`scenecluster.train_recipe.SceneClassifier`), trains on its shard of the driver's Ray Data pipeline,
validates, and reports each epoch with a checkpoint, following Ray's own ``TorchTrainer`` examples.

Checkpoints hold the whole training state, and no pickles: the backbone as a transformers folder ``backbone/``
(:func:`scenecluster.models.save_backbone`), and the heads, optimizer, scheduler, epoch, step and metric
history in ``state.pt`` as tensors and plain data, read back with ``torch.load(..., weights_only=True)``. Ray
Train V2 (Ray >= 2.50) reloads the latest one in two cases: a worker-group restart under
``FailureConfig(max_failures)``, and a new ``TorchTrainer`` with the same ``RunConfig(name, storage_path)``,
whose checkpoint manager finds the run's ``checkpoint_manager_snapshot.json`` there.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import SecretStr
from torch import nn

from scenecluster.augment import augment_batch, to_tensor
from scenecluster.features import revealed_keys
from scenecluster.models import load_backbone, normalize, save_backbone
from scenecluster.train_recipe import SceneClassifier, classification_loss, freeze_layers, param_groups, warmup_cosine

__all__ = ["BACKBONE_DIR", "STATE_FILE", "LoopConfig", "TrainState", "epoch_line", "train_loop_per_worker"]

STATE_FILE = "state.pt"  # in a checkpoint: heads, optimizer, scheduler, counters (tensors and plain data only)
BACKBONE_DIR = "backbone"  # in a checkpoint and in OUTPUT: the backbone as a transformers folder


def _all_reduce(values: list[float]) -> list[float]:
    """Sum ``values`` across workers (gloo or NCCL); identity on a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs, fixed once by :func:`scenecluster.train.fit_backbone` (``train_loop_config`` is
    its ``asdict``).

    ``classes`` holds one class list per source (one head each); ``micro_per_epoch`` and ``total_steps`` are the
    driver's step budget (:class:`scenecluster.train.StepPlan`), the same on every worker so that DDP's
    collectives stay in step; ``n_val`` says whether there is a validation split.
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
    cpu_dtype: str = "float32"  # resources.cpu_dtype: bf16 autocast on CPU workers where it resolves to bfloat16
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
    cpu_bf16: bool = False  # resources.cpu_dtype resolved on this worker's CPU

    @property
    def use_amp(self) -> bool:
        return self.device.type == "cuda" or self.cpu_bf16

    def autocast(self):
        """bf16 autocast on GPUs, and on CPUs that compute bf16 in hardware (1.5x float32 for a ViT-S/14 step on a
        Zen 4 core, docs/benchmarks.md); else a no-op. The weights and the optimiser stay float32."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)


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


def _this_worker(cpu_dtype: str = "float32") -> _Worker:
    import ray.train
    import ray.train.torch

    from scenecluster.devices import resolve_cpu_dtype

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    cpu_bf16 = device.type == "cpu" and resolve_cpu_dtype(cpu_dtype) == torch.bfloat16
    return _Worker(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device, cpu_bf16=cpu_bf16)


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
        loss = classification_loss(logits, labels, sources, weight.to(worker.device), cfg.label_smoothing)
        loss = loss / (max(1, len(x)) * cfg.grad_accum)
        loss.backward()
    if last:
        torch.nn.utils.clip_grad_norm_(state.core.parameters(), 1.0)
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
    return float(loss.detach()) * cfg.grad_accum * float(weight.sum()), float(weight.sum())


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


def epoch_line(metrics: dict[str, Any], cfg: LoopConfig, *, seconds_per_step: float) -> str:
    """The line rank 0 prints after each epoch, for whoever watches a fine-tune of an hour (Ray Train's own line
    per report is each rank's whole metrics dict), with the time left at the epoch's pace, validation included."""
    accuracy = metrics["val_accuracy"]
    skipped = metrics["skipped_train"] + metrics["skipped_val"]
    left_s = (cfg.total_steps - metrics["step"]) * seconds_per_step
    left = f"about {left_s / 60:.0f} min" if left_s >= 90 else f"about {left_s:.0f} s"
    return (
        f"[finetune] epoch {metrics['epoch']}/{cfg.epochs}, step {metrics['step']}/{cfg.total_steps}: train loss "
        f"{metrics['train_loss']:.3f}, val accuracy {'n/a' if accuracy is None else f'{accuracy:.3f}'}, "
        f"{metrics['images_per_s']:.1f} images/s{f', {skipped} unreadable images skipped' if skipped else ''}"
        f"{f', {left} to go' if metrics['step'] < cfg.total_steps else ''}"
    )


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

    ``config`` is :class:`LoopConfig` as a dict, built by :func:`scenecluster.train.fit_backbone`. The steps follow
    Ray's ``TorchTrainer`` examples: build the model, optimizer and schedule; restore from
    ``ray.train.get_checkpoint()`` (a restart, or a resumed run); then per epoch one training pass, one validation
    pass, and a report with a checkpoint.
    """
    import ray.train

    cfg = LoopConfig(**config)
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    worker = _this_worker(cfg.cpu_dtype)
    state = _build_state(cfg)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        _restore(state, checkpoint, cfg)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.n_val else None
    while state.epoch < cfg.epochs and state.step < cfg.total_steps:
        started, steps_before = time.perf_counter(), state.step
        sums = _EpochSums(n_sources=len(cfg.classes))
        _train_epoch(state, train_shard, cfg, worker, sums)
        if val_shard is not None:
            _validate(state, val_shard, cfg, worker, sums)
        state.epoch += 1
        metrics = _epoch_metrics(state, sums, worker.world)
        state.history.append(metrics)
        if worker.rank == 0:
            per_step = (time.perf_counter() - started) / max(state.step - steps_before, 1)
            # To the process's own stdout, which Ray forwards to the driver: Ray Train patches print() in its
            # workers to log each line and, where sys.stdout is wrapped (as in a Ray worker), to print it too: twice.
            print(epoch_line(metrics, cfg, seconds_per_step=per_step), file=sys.__stdout__, flush=True)
        _report(state, metrics, cfg, worker)
