"""Both transfer directions on one GPU: fine-tune at 224 px on each source, embed the other set, save features.

The CPU machines here fine-tune at 112 px for about an hour (two epochs of nwpu12); issue 10 asks for the same
recipe with a longer fine-tune at 224 px on a GPU, in both directions (nwpu12 -> EuroSAT and EuroSAT -> nwpu12).
A bare GPU box has no Ray and no network, so one process stands for one Ray Train worker and one embedding actor,
and uses the same pieces they do: :class:`scenecluster.train_recipe.SceneClassifier`, ``freeze_layers``,
``param_groups``, ``warmup_cosine``, ``augment_batch`` on the device, ``stratified_split``,
:func:`scenecluster.gpudecode.decode_images` and :class:`scenecluster.embed.Embedder` with its test-time views.
Every image of both sets is decoded once onto the GPU; nothing is read twice.

Projection and clustering are left to the CPU machine (``bench_options.py --features``), so that the GPU's
minutes go to the work only it does fast. Features are written as float16 ``.npy`` files, one per
(target, backbone, views), in the order of their importance, so that a run cut short still returns the first.

    python benchmarks/gpu_transfer.py --data DIR --backbone DIR --out DIR [--device cuda]
    # DIR holds eurosat/<class>/<image> and nwpu12/<class>/<image>; BACKBONE a transformers DINOv2 folder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scenecluster.augment import augment_batch
from scenecluster.data import IMAGE_SUFFIXES, folder_label
from scenecluster.embed import Embedder
from scenecluster.features import resolve_feature_spec
from scenecluster.gpudecode import decode_images
from scenecluster.models import load_backbone, normalize, save_backbone
from scenecluster.train import stratified_split
from scenecluster.train_recipe import (
    SceneClassifier,
    classification_loss,
    freeze_layers,
    param_groups,
    warmup_cosine,
)

SETS = ("nwpu12", "eurosat")


def log(**fields) -> None:
    print(json.dumps(fields, default=str), flush=True)


def list_set(folder: Path, limit: int | None) -> list[str]:
    """Sorted ``<class>/<image>`` paths; at most ``limit`` per class (for dry runs)."""
    paths: list[str] = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(str(f) for f in cls.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files[:limit] if limit else files
    return paths


def decode_all(paths: list[str], image_size: int, device: torch.device) -> torch.Tensor:
    """Every image as ``uint8 (n, S, S, 3)`` on ``device`` (nvJPEG on a GPU); an unreadable one stops the run."""
    out = torch.empty((len(paths), image_size, image_size, 3), dtype=torch.uint8, device=device)
    for start in range(0, len(paths), 512):
        chunk = paths[start : start + 512]
        blobs = [Path(p).read_bytes() for p in chunk]
        images, errors = decode_images(blobs, np.array([""] * len(chunk), dtype=object), image_size, device=device)
        if any(errors):
            bad = next(i for i, e in enumerate(errors) if e)
            raise SystemExit(f"{chunk[bad]}: {errors[bad]}")
        out[start : start + len(chunk)] = images
    return out


def fine_tune(
    backbone: str,
    images: torch.Tensor,
    paths: list[str],
    args: argparse.Namespace,
    epochs: int,
    save_to: Path,
    device: torch.device,
    pseudo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    use_source: bool = True,
) -> dict:
    """The Ray Train worker's recipe in one process: frozen early blocks, layer decay, warm-up + cosine, bf16.

    ``pseudo`` = (target images, target rows, their pseudo-labels) adds a second head trained on the target's
    pseudo-labels beside the source's (self-training): batches draw from both sets' rows alike, each row's loss
    on its own head, as :class:`SceneClassifier` does for several sources. Held-out accuracy is the source's.
    ``use_source=False`` trains on the pseudo-labels alone (no held-out accuracy then).
    """
    classes = sorted({folder_label(p) for p in paths})
    index = {p: i for i, p in enumerate(paths)}
    labels_all = torch.tensor([classes.index(folder_label(p)) for p in paths], device=device)
    train, val = stratified_split(paths, args.val_fraction, args.seed)
    train_idx = torch.tensor([index[p] for p in train], device=device)
    val_idx = torch.tensor([index[p] for p in val], device=device)
    # One task per head: (its images, its training rows, labels indexed by row).
    tasks = [(images, train_idx, labels_all)] if use_source else []
    if pseudo is not None:
        target_images, rows, target_labels = pseudo
        full = torch.zeros(len(target_images), dtype=torch.long, device=device)
        full[rows] = target_labels
        tasks.append((target_images, rows, full))
    n_classes = [len(classes)] * use_source + ([int(pseudo[2].max()) + 1] if pseudo is not None else [])
    task_of = torch.cat([torch.full((len(t[1]),), k, device=device) for k, t in enumerate(tasks)])
    row_of = torch.cat([t[1] for t in tasks])
    spec = resolve_feature_spec(backbone, image_size=args.image_size)
    torch.manual_seed(args.seed)
    model = SceneClassifier(load_backbone(backbone, torch_dtype=torch.float32), n_classes).to(device)
    freeze_layers(model, args.freeze_blocks)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.weight_decay, args.layer_decay), fused=fused)
    steps_per_epoch = len(row_of) // args.batch_size
    total = steps_per_epoch * epochs
    warmup = max(1, round(0.1 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total))
    gen = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(row_of), generator=gen).to(device)
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            sel = order[step * args.batch_size : (step + 1) * args.batch_size]
            groups = [(k, row_of[sel[task_of[sel] == k]]) for k in range(len(tasks))]
            groups = [(k, rows) for k, rows in groups if len(rows)]
            x = torch.cat([augment_batch(tasks[k][0][rows], gen, mean=spec.mean, std=spec.std) for k, rows in groups])
            labels = torch.cat([tasks[k][2][rows] for k, rows in groups])
            heads = torch.cat([torch.full((len(rows),), k, device=device) for k, rows in groups])
            with autocast:
                logits = model(x)
            # The worker's loss: each row's cross-entropy on its own head (classification_loss), batch mean.
            loss = classification_loss(
                logits, labels, heads, torch.ones(len(x), device=device), args.label_smoothing
            ) / len(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += float(loss.detach())
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(loss_sum / max(1, steps_per_epoch), 4),
                "val_acc": round(evaluate(model, images, val_idx, labels_all, spec, autocast), 4)
                if use_source
                else None,
            }
        )
        log(
            stage="finetune",
            source=Path(paths[0]).parent.parent.name,
            heads=n_classes,
            **history[-1],
            seconds=round(time.perf_counter() - start, 1),
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    save_backbone(model.backbone, save_to)
    return {
        "classes": len(classes),
        "heads": n_classes,
        "train": len(train),
        "pseudo_rows": 0 if pseudo is None else len(pseudo[1]),
        "val": len(val),
        "epochs": epochs,
        "steps": total,
        "batch_size": args.batch_size,
        "seconds": round(seconds, 1),
        "img_s": round(total * args.batch_size / seconds),
        "history": history,
    }


@torch.no_grad()
def evaluate(model, images, idx, labels, spec, autocast) -> float:
    """Held-out accuracy of the source head on the un-augmented scenes."""
    model.eval()
    correct = 0
    for start in range(0, len(idx), 256):
        batch = idx[start : start + 256]
        x = normalize(images[batch].permute(0, 3, 1, 2), spec.mean, spec.std)
        with autocast:
            correct += int((model(x)[0].argmax(1) == labels[batch]).sum())
    return correct / max(1, len(idx))


def embed(
    backbone: str, images: torch.Tensor, args: argparse.Namespace, views: str, device
) -> tuple[np.ndarray, float]:
    spec = resolve_feature_spec(
        backbone, layer=args.layer, pooling=args.pooling, image_size=args.image_size, views=views
    )
    embedder = Embedder(spec, device=device.type)
    start = time.perf_counter()
    feats = np.concatenate(
        [embedder.embed(images[i : i + args.embed_batch]) for i in range(0, len(images), args.embed_batch)]
    )
    return feats, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--backbone", required=True, help="the untuned DINOv2 folder (or Hub id)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--limit", type=int, default=None, help="images per class (dry runs)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", default="nwpu12=10,eurosat=4", help="fine-tuning epochs per source")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--freeze-blocks", type=int, default=4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", type=int, default=8)
    p.add_argument("--pooling", default="cls+mean")
    p.add_argument("--embed-batch", type=int, default=256)
    p.add_argument(
        "--pseudo-dir",
        type=Path,
        help="self-training: pseudo-<target>.json files (benchmarks/pseudo_labels.py); each direction then "
        "fine-tunes on its source and the target's pseudo-labels together, and only the target is embedded",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    epochs = {k: int(v) for k, v in (kv.split("=") for kv in args.epochs.split(","))}
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict = {
        "args": vars(args),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "sets": {},
        "runs": [],
    }

    def save_meta() -> None:
        (args.out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))

    paths, images = {}, {}
    for name in SETS:
        start = time.perf_counter()
        paths[name] = list_set(args.data / name, args.limit)
        images[name] = decode_all(paths[name], args.image_size, device)
        seconds = time.perf_counter() - start
        meta["sets"][name] = {
            "paths": [str(Path(q).relative_to(args.data / name)) for q in paths[name]],
            "read_decode_s": round(seconds, 1),
        }
        log(stage="decode", set=name, images=len(paths[name]), img_s=round(len(paths[name]) / seconds))
    save_meta()

    def run(target: str, backbone: str, tag: str, views: str) -> None:
        feats, seconds = embed(backbone, images[target], args, views, device)
        name = f"{target}__{tag}__{views}.npy"
        np.save(args.out / name, feats.astype(np.float16))
        row = {
            "file": name,
            "target": target,
            "backbone": tag,
            "views": views,
            "embed_s": round(seconds, 1),
            "img_s": round(len(feats) / seconds),
        }
        meta["runs"].append(row)
        save_meta()
        log(stage="embed", **row)

    def pseudo_for(target: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kept = json.loads((args.pseudo_dir / f"pseudo-{target}.json").read_text())["labels"]
        rel = [f"{target}/{q}" for q in meta["sets"][target]["paths"]]
        rows = [i for i, q in enumerate(rel) if q in kept]
        log(stage="pseudo", target=target, rows=len(rows), classes=len(set(kept.values())))
        labels = torch.tensor([kept[rel[i]] for i in rows], device=device)
        return images[target], torch.tensor(rows, device=device), labels

    # Most important first: each direction's tuned features, then the untuned references.
    for source, target in (("nwpu12", "eurosat"), ("eurosat", "nwpu12")):
        tag = f"{'selftrain' if args.pseudo_dir else 'tuned'}-{source}"
        pseudo = pseudo_for(target) if args.pseudo_dir else None
        tuned = args.out.parent / tag
        meta[f"finetune_{source}"] = fine_tune(
            args.backbone, images[source], paths[source], args, epochs[source], tuned, device, pseudo
        )
        save_meta()
        for views in ("one", "d4"):
            run(target, str(tuned), tag, views)
    if args.pseudo_dir:  # the pseudo-labels alone, without the source's labels: one view each
        for source, target in (("nwpu12", "eurosat"), ("eurosat", "nwpu12")):
            tuned = args.out.parent / f"pseudoonly-{target}"
            meta[f"finetune_pseudoonly_{target}"] = fine_tune(
                args.backbone,
                images[source],
                paths[source],
                args,
                epochs[source],
                tuned,
                device,
                pseudo_for(target),
                use_source=False,
            )
            save_meta()
            run(target, str(tuned), f"pseudoonly-{target}", "one")
    if not args.pseudo_dir:
        for target, views in (("eurosat", "d4"), ("nwpu12", "d4"), ("nwpu12", "one"), ("eurosat", "one")):
            run(target, args.backbone, "untuned", views)
    log(stage="done", seconds=round(time.perf_counter() - T0, 1))


T0 = time.perf_counter()
if __name__ == "__main__":
    sys.exit(main())
