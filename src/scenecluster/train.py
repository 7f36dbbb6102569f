"""Fine-tune a DINOv2 backbone on labelled source scenes with Ray Train, for better clustering features.

The driver (:func:`fit_backbone`) lists and splits the sources, checks them and the model before any worker
starts, and builds its Ray Data pipelines with the clustering job's reader (:func:`scenecluster.ingest.read_scenes`:
image files or ``.tar`` shards, read then decoded in tasks), so a scene that the clustering job can read is one
training can read, and labels them with the clustering job's rule (:func:`scenecluster.data.folder_label`).
Classes come from the listing, before anything is read, so tar shards must sit in ``<class>/`` folders (one
class per shard; a member stored at the shard's top level takes the shard's folder); a shard is read once more
up front to count its images for the step budget. Each Ray Train worker
(:func:`train_loop_per_worker`) holds one replica of the backbone plus one linear head per source; several
sources train jointly, each batch row carrying its source index.

Checkpoints hold the whole training state (model, heads, optimizer, scheduler, epoch, step and the metric
history). Ray Train V2 (Ray >= 2.50) reloads the latest one in two cases: a worker-group restart under
``FailureConfig(max_failures)``, and a new ``TorchTrainer`` with the same ``RunConfig(name, storage_path)``,
whose checkpoint manager finds the run's ``checkpoint_manager_snapshot.json`` there. ``resume=True`` relies
on the latter; without it, an existing run folder is refused rather than silently continued.

The result is a transformers folder ``OUTPUT/backbone`` (heads dropped), which
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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from torch import nn

from scenecluster.augment import augment_batch, normalize, to_tensor
from scenecluster.config import FinetuneConfig, dump_config
from scenecluster.data import SceneListing, folder_label, list_scenes, open_filesystem
from scenecluster.errors import ConfigError, InputError, OutputError
from scenecluster.ingest import READ_CPUS, count_scenes, read_scenes
from scenecluster.models import load_backbone, pool_tokens, pooled_width, save_backbone
from scenecluster.outputs import atomic_write_text

__all__ = ["SceneClassifier", "fit_backbone", "train_loop_per_worker"]

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # what Ray Train V2 writes in a run folder


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
def _attach_labels(batch: dict[str, np.ndarray], *, classes: list[str], source: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: add ``label`` (index into ``classes``) and ``source`` (the source's index).

    The label name is :func:`scenecluster.data.folder_label` of the row's path, the rule the embedding stage
    labels with. A row whose name is not among ``classes`` (a shard member stored under a folder that is no class
    folder of the listing) becomes an error row, dropped from the loss and counted like an unreadable file.
    """
    index = {c: i for i, c in enumerate(classes)}
    names = [folder_label(str(p)) for p in batch["path"]]
    errors = np.array(batch["error"], dtype=object)
    for i, name in enumerate(names):
        if name not in index and not errors[i]:
            errors[i] = f"label {name!r} is not a class folder of its source"
    labels = np.array([index.get(name, 0) for name in names], dtype=np.int64)
    return {**batch, "error": errors, "label": labels, "source": np.full(len(labels), source, dtype=np.int64)}


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: train the shared backbone and per-source heads, validate and checkpoint each epoch.

    ``config`` is built by :func:`fit_backbone` (the validated :class:`FinetuneConfig` fields plus the class
    lists, the step budget and the thread count). The loop runs exactly ``micro_per_epoch`` micro-batches
    per epoch on every worker (shards are split equally and the last partial batch dropped), so DDP's
    collectives stay in step. Decode failures are dropped from the loss and counted. A checkpoint from
    ``ray.train.get_checkpoint()`` (a restart, or a resumed run) restores model, optimizer, scheduler,
    epoch, step and history; training continues at the next epoch.
    """
    import ray.train
    import ray.train.torch

    if config.get("torch_threads"):
        torch.set_num_threads(int(config["torch_threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda"
    seed = int(config["seed"])

    torch.manual_seed(seed)  # same head init on every rank (DDP also broadcasts rank 0's)
    model = SceneClassifier(load_backbone(config["model"]), [len(c) for c in config["classes"]], config["pooling"])
    freeze_layers(model, int(config["freeze_blocks"]))
    model = ray.train.torch.prepare_model(model)
    core: SceneClassifier = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(
        param_groups(core, config["lr"], config["weight_decay"], config["layer_decay"]), betas=(0.9, 0.999)
    )
    total_steps = int(config["total_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(int(config["warmup_steps"]), total_steps))

    epoch, step, history, resumes = 0, 0, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, step, history = state["epoch"], state["step"], state["history"]
        resumes = [*state["resumes"], {"epoch": epoch, "step": step}]
        # A new budget (more epochs or max_steps on --resume) stretches the cosine to the new end.
        scheduler.lr_lambdas = [warmup_cosine(int(config["warmup_steps"]), total_steps)] * len(optimizer.param_groups)
    start_step = step

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["n_val"] else None
    bs, accum, smoothing = (
        int(config["batch_size"]),
        int(config["grad_accum"]),
        float(config["label_smoothing"]),
    )
    micro_per_epoch = int(config["micro_per_epoch"])
    n_sources = len(config["classes"])

    while epoch < int(config["epochs"]) and step < total_steps:
        model.train()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
        loss_sum = n_images = n_skipped = 0.0
        start = time.perf_counter()
        batches = train_shard.iter_batches(
            batch_size=bs,
            batch_format="numpy",
            drop_last=False,
            local_shuffle_buffer_size=4 * bs,
            local_shuffle_seed=seed + epoch * 1_009 + rank,
        )
        for micro, batch in enumerate(batches):
            if step >= total_steps:
                break
            ok = np.array([not e for e in batch["error"]], dtype=bool)
            n_skipped += float((~ok).sum())
            if micro >= micro_per_epoch:
                # The short last batch is not trained on (every worker must take the same number of
                # steps for DDP), but its unreadable images are still counted: each is counted once.
                continue
            weight = torch.ones(int(ok.sum()))
            if not ok.any():  # keep DDP in step: one dummy row with zero weight
                ok[0], weight = True, torch.zeros(1)
            # Augment on the worker's device: on a GPU the CPU path ran at 18% of the model's step rate.
            images = torch.as_tensor(batch["image"][ok]).to(device, non_blocking=True)
            x = augment_batch(images, gen, mean=config["mean"], std=config["std"])
            labels = torch.as_tensor(batch["label"][ok]).to(device)
            sources = torch.as_tensor(batch["source"][ok]).to(device)
            last_micro = (micro + 1) % accum == 0
            sync = model.no_sync() if (hasattr(model, "no_sync") and not last_micro) else contextlib.nullcontext()
            with sync, torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
                loss = _loss(logits, labels, sources, weight.to(device), smoothing) / (max(1, len(x)) * accum)
                loss.backward()
            loss_sum += float(loss) * accum * float(weight.sum())
            n_images += float(weight.sum())
            if last_micro:
                torch.nn.utils.clip_grad_norm_(core.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
        seconds = time.perf_counter() - start

        correct, seen, val_skipped = [0.0] * n_sources, [0.0] * n_sources, 0.0
        if val_shard is not None:
            model.eval()
            with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                for batch in val_shard.iter_batches(batch_size=2 * bs, batch_format="numpy"):
                    ok = np.array([not e for e in batch["error"]], dtype=bool)
                    val_skipped += float((~ok).sum())
                    if not ok.any():
                        continue
                    x = normalize(to_tensor(batch["image"][ok]), config["mean"], config["std"]).to(device)
                    logits = core(x)
                    for s in range(n_sources):
                        mask = batch["source"][ok] == s
                        if mask.any():
                            pred = logits[s][torch.as_tensor(mask, device=device)].argmax(1).cpu().numpy()
                            correct[s] += float((pred == batch["label"][ok][mask]).sum())
                            seen[s] += float(mask.sum())
        totals = _all_reduce([loss_sum, n_images, n_skipped, val_skipped, *correct, *seen, seconds])
        loss_sum, n_images, n_skipped, val_skipped = totals[:4]
        correct, seen = totals[4 : 4 + n_sources], totals[4 + n_sources : 4 + 2 * n_sources]
        slowest = totals[-1] / world  # mean worker time; images/s is for the whole group
        epoch += 1
        metrics = {
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum / max(n_images, 1.0),
            "val_accuracy": sum(correct) / sum(seen) if sum(seen) else None,
            "val_accuracy_per_source": [c / t if t else None for c, t in zip(correct, seen, strict=True)],
            "images_per_s": n_images / max(slowest, 1e-9),
            "train_images": int(n_images),
            "skipped_train": int(n_skipped),
            "skipped_val": int(val_skipped),
            "lr": scheduler.get_last_lr()[-1],
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory(prefix="scenecluster-ckpt-") as folder:
            ckpt = None
            if rank == 0:
                torch.save(
                    {
                        "model": core.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "history": history,
                        "resumes": resumes,
                        "classes": config["classes"],
                    },
                    Path(folder) / STATE_FILE,
                )
                ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({**metrics, "resumes": len(resumes)}, checkpoint=ckpt)
        fail_after = config.get("fail_after_step")
        if rank == 0 and fail_after and start_step < fail_after <= step:
            raise RuntimeError(f"fail_after_step={fail_after}: injected failure at step {step} (test only)")


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
    listing: SceneListing, paths: list[str], classes: list[str], source: int, image_size: int, batch_size: int
):
    """The clustering job's reader (:func:`scenecluster.ingest.read_scenes`: files or tar shards), plus labels."""
    ds = read_scenes(paths, listing.filesystem, image_size=image_size, batch_size=batch_size)
    return ds.map_batches(_attach_labels, fn_kwargs={"classes": classes, "source": source}, num_cpus=READ_CPUS)


def _count_rows(listing: SceneListing, splits: tuple[list[str], list[str]]) -> tuple[int, int]:
    """Rows ``(train, val)`` the reader yields: one per image file; a tar shard's members, counted by reading it."""
    counts = count_scenes(listing.paths, listing.filesystem)
    return sum(counts[p] for p in splits[0]), sum(counts[p] for p in splits[1])


def _union(datasets: list):
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _run_exists(storage_path: str, name: str, endpoint_url: str | None) -> bool:
    fs, root = open_filesystem(storage_path, endpoint_url=endpoint_url)
    try:
        return fs.get_file_info(f"{root}/{name}/{SNAPSHOT_FILE}").type == pafs.FileType.File
    except OSError:
        return False


def fit_backbone(cfg: FinetuneConfig, *, echo=print) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.sources`` with Ray Train and save the backbone; return its folder.

    Everything that can be checked without workers is checked first (sources, classes, model, output), so
    a bad setting fails in seconds with a one-line error.

    Parameters
    ----------
    cfg : FinetuneConfig
        Validated settings.
    echo : callable
        Where progress lines go (``print`` for the CLI).

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
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from scenecluster.devices import decide
    from scenecluster.models import image_normalization
    from scenecluster.raycluster import ensure_ray

    listings = [
        list_scenes(s, endpoint_url=cfg.data.endpoint_url, sample=cfg.data.sample, seed=cfg.data.seed)
        for s in cfg.sources
    ]
    classes = [class_names(lst) for lst in listings]
    backbone = load_backbone(cfg.feature.model)  # ModelLoadError here, not in every worker
    n_layers = backbone.config.num_hidden_layers
    if cfg.freeze_blocks > n_layers:
        raise ConfigError(f"setting freeze_blocks: {cfg.freeze_blocks} exceeds the model's {n_layers} blocks")
    del backbone
    mean, std = image_normalization(cfg.feature.model)

    out = Path(cfg.output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} is a file, not a folder")
    storage = cfg.storage_path or str(out)
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

    resources = decide(
        cfg.resources.device,
        ensure_ray(cfg.resources),
        actors=cfg.workers,
        torch_threads=cfg.resources.torch_threads,
    )
    splits = [stratified_split(lst.paths, cfg.val_fraction, cfg.data.seed + i) for i, lst in enumerate(listings)]
    rows = [_count_rows(lst, split) for lst, split in zip(listings, splits, strict=True)]
    n_train, n_val = sum(t for t, _ in rows), sum(v for _, v in rows)
    micro_per_epoch = n_train // cfg.workers // cfg.batch_size
    micro_per_epoch -= micro_per_epoch % cfg.grad_accum
    if micro_per_epoch == 0:
        raise ConfigError(
            f"setting batch_size: {n_train} training images over {cfg.workers} workers do not fill "
            f"one step of {cfg.batch_size} x {cfg.grad_accum} images; lower batch_size or grad_accum"
        )
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    total_steps = min(cfg.max_steps or 10**12, cfg.epochs * steps_per_epoch)

    if resources.use_gpu:
        cpus_per_worker = cfg.cpus_per_worker or 1.0
    else:  # leave half a CPU for Ray Data's decode tasks, or ingest starves (see environment notes)
        cpus_per_worker = cfg.cpus_per_worker or max(0.25, (resources.cpus_per_node - 0.5) / cfg.workers)
    threads = resources.torch_threads

    train_ds = _union(
        [
            _dataset(lst, t, c, i, cfg.feature.image_size, cfg.batch_size)
            for i, (lst, (t, _), c) in enumerate(zip(listings, splits, classes, strict=True))
        ]
    )
    datasets = {"train": train_ds}
    if n_val:
        datasets["val"] = _union(
            [
                _dataset(lst, v, c, i, cfg.feature.image_size, cfg.batch_size)
                for i, (lst, (_, v), c) in enumerate(zip(listings, splits, classes, strict=True))
                if v
            ]
        )
    loop_config = {
        **cfg.model_dump(exclude={"data", "feature", "resources"}),
        "model": cfg.feature.model,
        "pooling": cfg.feature.pooling,
        "seed": cfg.data.seed,
        "classes": classes,
        "mean": list(mean),
        "std": list(std),
        "n_val": n_val,
        "micro_per_epoch": micro_per_epoch,
        "total_steps": total_steps,
        "torch_threads": threads,
    }
    storage_fs = None
    if storage.startswith("s3://") and cfg.data.endpoint_url:
        storage_fs, storage = open_filesystem(storage, endpoint_url=cfg.data.endpoint_url)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=resources.use_gpu, resources_per_worker={"CPU": cpus_per_worker}
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
    echo(
        f"[finetune] {n_train} train / {n_val} val images from {len(listings)} source(s), {cfg.workers} "
        f"worker(s) x {cpus_per_worker:g} CPU{' + GPU' if resources.use_gpu else ''}, {total_steps} steps"
    )
    start = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise OutputError(f"fine-tuning {cfg.name!r} finished without a checkpoint under {storage}")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    backbone = load_backbone(cfg.feature.model)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)})
    target = save_backbone(backbone, out / "backbone")

    last = state["history"][-1] if state["history"] else {}
    metrics = {
        "run": cfg.name,
        "storage_path": str(storage),
        "checkpoint": result.checkpoint.path,
        "backbone": str(target),
        "sources": cfg.sources,
        "classes": classes,
        "n_train": n_train,
        "n_val": n_val,
        "workers": cfg.workers,
        "image_size": cfg.feature.image_size,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "total_steps": total_steps,
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
    acc = metrics["val_accuracy"]
    echo(
        f"[finetune] step {state['step']}/{total_steps}, epoch {state['epoch']}, val accuracy "
        f"{'n/a' if acc is None else f'{acc:.3f}'}; backbone: {target}"
    )
    return target
