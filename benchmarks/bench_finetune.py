"""Time one fine-tuning step (augment + forward + backward + AdamW step) of a DINOv2 backbone on this machine.

Prints one JSON line per configuration with the machine, sizes and images/s, so figures from different
machines can be compared. One process stands for one Ray Train worker; ``--threads`` sets its torch threads
(two workers on two cores would each get one thread).

    python benchmarks/bench_finetune.py --model facebook/dinov2-small --image-size 112 --batch-size 32
    python benchmarks/bench_finetune.py --image-size 112 --batch-size 32 --freeze-blocks 4 --cpu-dtypes float32 bfloat16

``--cpu-dtypes`` measures the step as the worker runs it under each ``resources.cpu_dtype`` (bfloat16: autocast,
float32 weights and optimiser), taking turns so that neither gets a warmer machine.
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
    p.add_argument("--cpu-dtypes", nargs="+", default=["float32"], help="resources.cpu_dtype values, in turn")
    p.add_argument("--rounds", type=int, default=1, help="times each dtype is timed, taking turns")
    args = p.parse_args()
    from scenecluster.devices import resolve_cpu_dtype

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
    for threads, _, cpu_dtype in ((t, r, d) for t in args.threads for r in range(args.rounds) for d in args.cpu_dtypes):
        torch.set_num_threads(threads)
        amp = resolve_cpu_dtype(cpu_dtype) == torch.bfloat16

        def step(amp: bool = amp) -> None:
            x = augment_batch(images, gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # as the worker's autocast()
                logits = head(backbone(pixel_values=x).last_hidden_state[:, 0])
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
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
                    "cpu_dtype": cpu_dtype,
                    "autocast_bf16": amp,
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
