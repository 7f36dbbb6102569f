"""Embedding throughput: the model's own forward rate vs the whole Ray Data pipeline, same batch and size.

The pipeline (read bytes -> PIL decode in tasks -> Embedder actor) should run close to the bare forward
rate when decoding overlaps with compute and threads are not oversubscribed. Prints one JSON line per
measurement and a final line with the ratio, for each ``--cpu-dtypes`` entry (``resources.cpu_dtype``), and how far
each dtype's features of real scenes are from float32's (cosine).

    python benchmarks/bench_embed.py --images ../shared/data/eurosat --n 640 --image-size 112
    python benchmarks/bench_embed.py --image-size 224 --layer 0 --pooling cls+mean --cpu-dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date

import numpy as np
import torch
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script


def forward_rate(
    model: str,
    image_size: int,
    batch_size: int,
    threads: int,
    layer: int,
    pooling: str,
    repeats: int,
    dtype: str = "float32",
) -> float:
    """Images/s of Embedder.embed on already-decoded images (no I/O, no decode)."""
    from scenecluster.embed import Embedder

    emb = Embedder.for_model(model, layer=layer, pooling=pooling, device="cpu", torch_threads=threads, dtype=dtype)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(batch_size, image_size, image_size, 3), dtype=np.uint8)
    emb.embed(images)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        emb.embed(images)
    return repeats * batch_size / (time.perf_counter() - start)


def pipeline_rate(
    listing,
    model: str,
    image_size: int,
    batch_size: int,
    threads: int,
    layer: int,
    pooling: str,
    dtype: str = "float32",
) -> dict:
    """Steady-state images/s of the job's own Ray Data pipeline.

    Timed from the batch that completes the first quarter of the images to the last batch, so neither
    actor start-up nor batches that finished before the driver asked for the first one inflate the rate.
    """
    from scenecluster.config import EmbedConfig
    from scenecluster.devices import decide, local_inventory
    from scenecluster.embed import build_embedding_dataset
    from scenecluster.features import resolve_feature_spec

    spec = resolve_feature_spec(model, layer=layer, pooling=pooling, image_size=image_size)
    resources = decide("cpu", local_inventory(), torch_threads=threads, cpu_dtype=dtype)
    settings = EmbedConfig(model=model, layer=layer, pooling=pooling, image_size=image_size, batch_size=batch_size)
    ds = build_embedding_dataset(listing.paths, listing.filesystem, spec, resources=resources, settings=settings)
    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    total = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        total += len(batch["path"])
        arrivals.append((time.perf_counter(), total))
    end = time.perf_counter()
    t0, n0 = next((t, n) for t, n in arrivals if n >= total // 4)
    return {"images": total, "wall_s": end - start, "steady_rate": (total - n0) / max(end - t0, 1e-9)}


def feature_cosines(listing, model: str, image_size: int, layer: int, pooling: str, dtype: str, n: int = 64):
    """Cosine between ``dtype``'s and float32's features of the first ``n`` listed scenes: (mean, min)."""
    from scenecluster.data import decode_image
    from scenecluster.embed import Embedder

    images = np.stack(
        [decode_image(listing.filesystem.open_input_file(p).read(), image_size) for p in listing.paths[:n]]
    )
    a, b = (
        Embedder.for_model(model, layer=layer, pooling=pooling, image_size=image_size, device="cpu", dtype=d).embed(
            images
        )
        for d in ("float32", dtype)
    )
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cosine.mean()), float(cosine.min())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=None, help="folder of images (default: the package's EuroSAT sample)")
    p.add_argument("--n", type=int, default=640, help="images to embed through the pipeline")
    p.add_argument("--model", default="facebook/dinov2-small")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--layer", type=int, default=-1)
    p.add_argument("--pooling", default="cls")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--cpu-dtypes", nargs="+", default=["float32"], help="resources.cpu_dtype values to measure")
    args = p.parse_args()

    import ray

    from scenecluster.cli import sample_data_dir
    from scenecluster.data import list_scenes

    listing = list_scenes(args.images or str(sample_data_dir()), sample=args.n, seed=0)
    common = dict(
        model=args.model,
        image_size=args.image_size,
        batch_size=args.batch_size,
        threads=args.threads,
        layer=args.layer,
        pooling=args.pooling,
    )
    head = {
        "date": date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cpu",
        **{k: v for k, v in common.items() if k != "model"},
    }
    from scenecluster.devices import cpu_computes_bf16

    head["native_bf16"] = cpu_computes_bf16()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    for dtype in args.cpu_dtypes:
        line = {**head, "cpu_dtype": dtype}
        fwd = forward_rate(**common, repeats=args.repeats, dtype=dtype)
        print(json.dumps({**line, "what": "model forward only", "images_per_s": round(fwd, 2)}), flush=True)
        pipe = pipeline_rate(listing, **common, dtype=dtype)
        print(
            json.dumps(
                {
                    **line,
                    "what": "ray data pipeline (read+decode+embed)",
                    "images": pipe["images"],
                    "wall_s": round(pipe["wall_s"], 1),
                    "images_per_s": round(pipe["steady_rate"], 2),
                }
            ),
            flush=True,
        )
        print(json.dumps({**line, "what": "ratio pipeline/forward", "ratio": round(pipe["steady_rate"] / fwd, 3)}))
        if dtype != "float32":
            mean, low = feature_cosines(listing, args.model, args.image_size, args.layer, args.pooling, dtype)
            print(
                json.dumps(
                    {**line, "what": "cosine to float32's features", "mean": round(mean, 6), "min": round(low, 6)}
                )
            )


if __name__ == "__main__":
    main()
