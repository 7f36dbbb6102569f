"""Peak memory of the embedding stage against the number of scenes: it must not grow with N.

Writes N synthetic JPEG scenes (small, random, in class folders), embeds them through the real Ray Data
pipeline with a tiny random DINOv2 (the model's size is not what is measured), and samples the resident
memory of the driver and of every Ray worker process every 0.2 s. Prints one JSON line per N.

    python benchmarks/bench_memory.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import psutil
from _tiny_model import tiny_model  # benchmarks/ is on sys.path when run as a script
from PIL import Image


def write_scenes(root: Path, n: int, size: int = 32, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, size=(classes, size, size, 3), dtype=np.uint8)
    for i in range(n):
        c = i % classes
        noise = rng.integers(-20, 20, size=(size, size, 3))
        img = np.clip(base[c].astype(int) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"class{c}" / f"{i:07d}.jpg", quality=85)


class PeakSampler(threading.Thread):
    """Samples the RSS of this process (the driver) and of the Ray worker processes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.driver_peak = 0
        self.worker_peak = 0
        self.workers_total_peak = 0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            total = 0
            for proc in psutil.process_iter(["cmdline"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if cmd.startswith("ray::") or "default_worker.py" in cmd:
                    try:
                        rss = proc.memory_info().rss
                    except psutil.Error:
                        continue
                    total += rss
                    self.worker_peak = max(self.worker_peak, rss)
            self.workers_total_peak = max(self.workers_total_peak, total)
            time.sleep(0.2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=4096)
    args = p.parse_args()

    import ray

    from scenecluster.config import EmbedConfig
    from scenecluster.data import list_scenes
    from scenecluster.devices import decide, local_inventory
    from scenecluster.embed import embed_images
    from scenecluster.features import resolve_feature_spec
    from scenecluster.outputs import OutputFolder

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model(Path(tmp) / "tiny")
        for n in args.sizes:
            scenes = Path(tmp) / f"scenes{n}"
            t0 = time.perf_counter()
            write_scenes(scenes, n)
            listing = list_scenes(str(scenes))
            sampler = PeakSampler()
            sampler.start()
            start = time.perf_counter()
            result = embed_images(
                listing,
                OutputFolder(str(Path(tmp) / f"out{n}")),
                resolve_feature_spec(str(model_dir), image_size=28),
                resources=decide("cpu", local_inventory()),
                settings=EmbedConfig(image_size=28, batch_size=args.batch_size, chunk_size=args.chunk_size),
            )
            seconds = time.perf_counter() - start
            sampler.stop.set()
            sampler.join()
            print(
                json.dumps(
                    {
                        "date": date.today().isoformat(),
                        "cores": os.cpu_count(),
                        "scenes": n,
                        "embedded": result.n_images - result.n_skipped,
                        "write_s": round(start - t0, 1),
                        "embed_s": round(seconds, 1),
                        "scenes_per_s": round(n / seconds, 1),
                        "driver_peak_mib": round(sampler.driver_peak / 2**20),
                        "worker_peak_mib": round(sampler.worker_peak / 2**20),
                        "workers_total_peak_mib": round(sampler.workers_total_peak / 2**20),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
