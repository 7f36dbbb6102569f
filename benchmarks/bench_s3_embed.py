"""End-to-end throughput from S3 to embeddings, and where the time goes (I/O, decode, model).

Starts a real S3 server (SeaweedFS on loopback), uploads N EuroSAT scenes as loose objects and as tar
shards, then (1) times each stage alone on one core over the same images -- S3 reads, PIL decode + resize,
the model's forward -- to give the share of each, and (2) runs the job's own Ray Data pipeline from S3 and
reports its steady-state scenes/s. Prints JSON lines.

    python benchmarks/bench_s3_embed.py --images ../shared/data/eurosat --n 640 --image-size 112
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script


def stage_costs(listing, model: str, image_size: int, batch_size: int, threads: int, layer: int, pooling: str):
    """Seconds per image of each stage run alone, in this process."""
    from scenecluster.data import decode_batch, read_batch
    from scenecluster.embed import Embedder

    sources = np.array(listing.paths, dtype=object)
    t0 = time.perf_counter()
    read = read_batch({"source": sources}, filesystem=listing.filesystem)
    t1 = time.perf_counter()
    decoded = decode_batch(read, image_size=image_size)
    t2 = time.perf_counter()
    emb = Embedder.for_model(model, layer=layer, pooling=pooling, device="cpu", torch_threads=threads)
    emb.embed(decoded["image"][:batch_size])  # warm-up
    t3 = time.perf_counter()
    for i in range(0, len(decoded["image"]), batch_size):
        emb.embed(decoded["image"][i : i + batch_size])
    t4 = time.perf_counter()
    n = len(read["path"])
    return {
        "images": n,
        "io_s_per_image": (t1 - t0) / n,
        "decode_s_per_image": (t2 - t1) / n,
        "model_s_per_image": (t4 - t3) / n,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="a <class>/<image> folder to sample from")
    p.add_argument("--n", type=int, default=640)
    p.add_argument("--model", default="facebook/dinov2-small")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--layer", type=int, default=8)
    p.add_argument("--pooling", default="cls+mean")
    p.add_argument("--shard-size", type=int, default=64, help="images per tar shard")
    args = p.parse_args()

    import ray

    from scenecluster.config import EmbedConfig
    from scenecluster.data import list_scenes
    from scenecluster.devices import decide, local_inventory
    from scenecluster.embed import embed_images
    from scenecluster.features import resolve_feature_spec
    from scenecluster.outputs import OutputFolder
    from scenecluster.testing.s3server import SeaweedS3

    sample = list_scenes(args.images, sample=args.n, seed=0)
    head = {
        "date": date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cpu",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "n": args.n,
    }
    with tempfile.TemporaryDirectory() as tmp, SeaweedS3() as s3:
        local = Path(tmp) / "scenes"
        for path in sample.paths:
            dest = local / Path(path).parent.name / Path(path).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        s3.create_bucket("bench")
        s3.upload_folder(local, "bench", "loose")
        s3.upload_tar_shards(local, "bench", "shards", args.shard_size)
        os.environ.update(s3.env())
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            logging_level="WARNING",
            runtime_env={"env_vars": s3.env()},
        )
        for layout in ("loose", "shards"):
            listing = list_scenes(f"s3://bench/{layout}/")
            if layout == "loose":
                costs = stage_costs(
                    listing, args.model, args.image_size, args.batch_size, args.threads, args.layer, args.pooling
                )
                total = costs["io_s_per_image"] + costs["decode_s_per_image"] + costs["model_s_per_image"]
                print(
                    json.dumps(
                        {
                            **head,
                            "what": "stage costs, one process, loose objects",
                            **{k: round(v, 6) if isinstance(v, float) else v for k, v in costs.items()},
                            "share_io": round(costs["io_s_per_image"] / total, 3),
                            "share_decode": round(costs["decode_s_per_image"] / total, 3),
                            "share_model": round(costs["model_s_per_image"] / total, 3),
                        }
                    ),
                    flush=True,
                )
            start = time.perf_counter()
            spec = resolve_feature_spec(args.model, layer=args.layer, pooling=args.pooling, image_size=args.image_size)
            result = embed_images(
                listing,
                OutputFolder(str(Path(tmp) / f"out-{layout}")),
                spec,
                resources=decide("cpu", local_inventory(), torch_threads=args.threads),
                settings=EmbedConfig(image_size=args.image_size, batch_size=args.batch_size),
            )
            wall = time.perf_counter() - start
            print(
                json.dumps(
                    {
                        **head,
                        "what": f"S3 -> embeddings.parquet, {layout}, whole job stage",
                        "images": result.n_images,
                        "skipped": result.n_skipped,
                        "wall_s": round(wall, 1),
                        "scenes_per_s": round(result.n_images / wall, 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
