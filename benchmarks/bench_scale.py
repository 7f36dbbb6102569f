"""Driver memory against archive size, and what Ray's assignment pass costs against assigning in one process.

Synthetic parts stand in for an embedded archive (the embedding stage's driver side is the same loop over
part counts, measured here with the assignment stage): ``--sizes`` scenes in parts of ``--chunk-size``, each
a row of random ``--dims``-d vectors around 12 centres. For each size the script

1. streams a listing of that many synthetic paths into a manifest (:func:`write_manifest_paths`),
2. writes the embeddings parts, fits the clustering on a ``--fit-sample`` (PCA + DP-GMM, or UMAP) and saves it,
3. runs the Ray assignment pass (:func:`scenecluster.stages.assign_parts`) and, on the same parts, the same
   ``FittedClustering.assign`` in this process,

sampling this process's resident memory (the driver's) every 20 ms and the assignment actors' every
200 ms. One JSON line per size: peak driver RSS above its start, the actors' peak RSS, both rates and
their ratio.

    python benchmarks/bench_scale.py --sizes 100000 2000000 --dims 32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script

from scenecluster.config import ClusterConfig
from scenecluster.devices import decide, local_inventory
from scenecluster.fitted import fit_clustering, save_clustering
from scenecluster.manifest import write_manifest_paths
from scenecluster.outputs import OutputFolder
from scenecluster.scale import matrix, ok_rows, sample_embeddings
from scenecluster.stages import assign_parts


class PeakRSS(threading.Thread):
    """Highest resident set size of this process while running, and of the assignment actors' processes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.proc, self.stop, self.peak, self.worker_peak = psutil.Process(), threading.Event(), 0, 0
        self.most_actors = 0

    def run(self) -> None:
        tick = 0
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            if tick % 10 == 0:  # scanning every process is slower: every 200 ms
                rss, actors = _assign_actors()
                self.worker_peak, self.most_actors = max(self.worker_peak, rss), max(self.most_actors, actors)
            tick += 1
            time.sleep(0.02)


def _assign_actors() -> tuple[int, int]:
    """The largest RSS among Ray's assignment actor processes (``ray::MapWorker(MapBatches(PartAssigner))``),
    and how many there are."""
    peak = count = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "PartAssigner" in cmdline and proc.info["memory_info"] is not None:
            peak, count = max(peak, proc.info["memory_info"].rss), count + 1
    return peak, count


def write_manifest(out: OutputFolder, n: int, dims: int, chunk: int) -> None:
    """The driver's listing step: ``n`` synthetic paths streamed into a manifest."""
    paths = (f"archive/c{i % 12:02d}/scene-{i:09d}.jpg" for i in range(n))
    write_manifest_paths(paths, out, identity={"synthetic": dims}, chunk_size=chunk)


def write_parts(out: OutputFolder, dims: int, seed: int) -> list[tuple[str, int]]:
    """Synthetic embeddings parts under the manifest's names (what the embedding workers would write)."""
    centres = np.random.default_rng(seed).normal(scale=4.0, size=(12, dims)).astype(np.float32)
    parts = []
    manifest = pa.concat_tables(out.read_table(f"manifest/{f}") for f in out.list("manifest") if f.endswith(".parquet"))
    rng = np.random.default_rng(seed + 1)
    for name, sources in zip(manifest.column("name").to_pylist(), manifest.column("sources").to_pylist(), strict=True):
        labels = np.array([int(s.split("/")[1][1:]) for s in sources])
        X = centres[labels] + rng.normal(size=(len(sources), dims)).astype(np.float32)
        flat = pa.array(X.reshape(-1))
        table = pa.table(
            {
                "path": sources,
                "label": [f"c{k:02d}" for k in labels],
                "error": [""] * len(sources),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, dims),
            }
        )
        out.write_table(f"embeddings/{name}.parquet", table)
        parts.append((name, len(sources)))
    return parts


def in_process_rate(out: OutputFolder, fitted, parts: list[tuple[str, int]]) -> float:
    start = time.perf_counter()
    n = 0
    for name, _ in parts:
        X = matrix(ok_rows(out.read_table(f"embeddings/{name}.parquet")))
        fitted.assign(X)
        n += len(X)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 2_000_000])
    p.add_argument("--dims", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--fit-sample", type=int, default=5000)
    p.add_argument("--projection", default="pca", choices=["pca", "umap"])
    p.add_argument("--actors", type=int, default=0, help="assignment actors; 0: the job's growing pool")
    args = p.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    resources = decide("cpu", local_inventory())
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            out = OutputFolder(tmp)
            base = psutil.Process().memory_info().rss
            listing = PeakRSS()
            listing.start()
            write_manifest(out, n, args.dims, args.chunk_size)
            listing.stop.set()
            listing.join()
            parts = write_parts(out, args.dims, seed=0)
            sample = sample_embeddings(out, parts, args.fit_sample, seed=0)  # the fit task's work, not the driver's
            reduce = {"method": args.projection, "n_components": 5, "backend": "umap-learn"}
            fitted, _, _ = fit_clustering(
                matrix(sample), feature={}, reduce=reduce, cluster=ClusterConfig(n_components=30)
            )
            save_clustering(fitted, out)
            del sample
            base_assign = psutil.Process().memory_info().rss
            sampler = PeakRSS()
            sampler.start()
            start = time.perf_counter()
            summary = assign_parts(out, out, resources, args.actors, with_labels=True)
            ray_rate = summary.n / (time.perf_counter() - start)
            sampler.stop.set()
            sampler.join()
            local_rate = in_process_rate(out, fitted, parts)
            print(
                json.dumps(
                    {
                        "date": datetime.date.today().isoformat(),
                        "cpu": cpu_model(),
                        "cores": os.cpu_count(),
                        "n": n,
                        "dims": args.dims,
                        "chunk_size": args.chunk_size,
                        "projection": args.projection,
                        "fit_sample": args.fit_sample,
                        "assign_actors": args.actors,
                        "assign_actors_seen": sampler.most_actors,
                        "n_clusters": summary.n_clusters,
                        "driver_listing_peak_over_start_mib": round((listing.peak - base) / 2**20, 1),
                        "driver_assign_peak_over_start_mib": round((sampler.peak - base_assign) / 2**20, 1),
                        "assign_actor_peak_rss_mib": round(sampler.worker_peak / 2**20, 1),
                        "ray_assign_rows_per_s": round(ray_rate),
                        "in_process_rows_per_s": round(local_rate),
                        "ratio_ray_over_in_process": round(ray_rate / local_rate, 3),
                    }
                ),
                flush=True,
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
