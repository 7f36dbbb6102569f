"""Time one fine-tuning step (augment + forward + backward + AdamW step) of a DINOv2 backbone on this machine.

Prints one JSON line per configuration with the machine, sizes and images/s, so figures from different
machines can be compared. One process stands for one Ray Train worker; ``--threads`` sets its torch threads
(two workers on two cores would each get one thread).

    python benchmarks/bench_finetune.py --model facebook/dinov2-small --image-size 112 --batch-size 32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import numpy as np
import torch
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script

from scenecluster.augment import augment_batch
from scenecluster.models import load_backbone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="facebook/dinov2-small")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1])
    p.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up step")
    p.add_argument("--freeze-blocks", type=int, default=0)
    args = p.parse_args()

    backbone = load_backbone(args.model)
    head = torch.nn.Linear(backbone.config.hidden_size, 12)
    for i, layer in enumerate(backbone.encoder.layer):
        if i < args.freeze_blocks:
            layer.requires_grad_(False)
    if args.freeze_blocks:
        backbone.embeddings.requires_grad_(False)
    params = [p for p in [*backbone.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    backbone.train()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8)
    labels = torch.as_tensor(rng.integers(0, 12, args.batch_size))
    gen = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)

        def step() -> None:
            x = augment_batch(images, gen)
            logits = head(backbone(pixel_values=x).last_hidden_state[:, 0])
            loss = torch.nn.functional.cross_entropy(logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "cpu": cpu_model(),
                    "cores": os.cpu_count(),
                    "torch": torch.__version__,
                    "threads": threads,
                    "model": args.model,
                    "image_size": args.image_size,
                    "batch_size": args.batch_size,
                    "freeze_blocks": args.freeze_blocks,
                    "steps": args.steps,
                    "images_per_s": round(args.batch_size * args.steps / seconds, 2),
                    "step_s": round(seconds / args.steps, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
