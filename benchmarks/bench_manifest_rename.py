"""What the first rerun after a reading revision costs the driver: renaming an archive's listed parts in place.

A run folder's listing is made once; after an upgrade that reads scenes other than JPEG otherwise
(:data:`scenecluster.pixels.READING_REVISION`), :func:`scenecluster.manifest.write_manifest` renames the parts
that hold such scenes instead of listing the archive again. This script lists ``--sizes`` synthetic paths (a
share ``--tiff-share`` of them TIFFs, spread evenly, as in an archive of mixed formats) into parts of
``--chunk-size``, then bumps the revision and times the rename, sampling this process's resident memory every
20 ms. The listing's own time is beside it, for scale (an S3 listing adds a request per 1,000 keys).
One JSON line per size.

    python benchmarks/bench_manifest_rename.py --sizes 1000000 4000000
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import threading
import time

import psutil
from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script

import scenecluster.manifest
import scenecluster.pixels
from scenecluster.manifest import DONE_FILE, write_manifest
from scenecluster.outputs import OutputFolder


class PeakRSS(threading.Thread):
    """This process's highest resident set size while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.proc, self.stop, self.peak = psutil.Process(), threading.Event(), 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)


def timed(call) -> tuple[float, int]:
    """Seconds and peak RSS above the start of ``call()``."""
    base = psutil.Process().memory_info().rss
    watch = PeakRSS()
    watch.start()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    watch.stop.set()
    watch.join()
    return seconds, max(0, watch.peak - base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--tiff-share", type=float, default=0.01)
    args = p.parse_args()
    every = max(1, round(1 / args.tiff_share)) if args.tiff_share > 0 else 0
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-rename-") as tmp:
            out = OutputFolder(tmp)
            paths = (
                f"archive/c{i % 12:02d}/scene-{i:09d}.{'tif' if every and i % every == 0 else 'jpg'}" for i in range(n)
            )

            def listing(paths=paths, out=out) -> None:
                scenecluster.manifest.write_manifest_paths(
                    paths, out, identity={"synthetic": 1}, chunk_size=args.chunk_size
                )

            list_s, list_rss = timed(listing)
            # the finished listing's record, as write_manifest leaves it, made under the current revision
            out.write_text(
                DONE_FILE,
                json.dumps(
                    {
                        "key": {
                            "synthetic": 1,
                            "chunk_size": args.chunk_size,
                            "sample": None,
                            "input": "archive",
                            "reading": scenecluster.pixels.READING_REVISION,
                        },
                        "n_sources": n,
                        "n_parts": -1,
                        "root": "archive",
                        "n_archives": 0,
                        "n_revised": -1,
                    }
                ),
            )
            revision = scenecluster.pixels.READING_REVISION + 1
            scenecluster.pixels.READING_REVISION = scenecluster.manifest.READING_REVISION = revision
            manifests = []

            def rename(out=out, manifests=manifests) -> None:
                manifests.append(write_manifest("archive", out, identity={"synthetic": 1}, chunk_size=args.chunk_size))

            rename_s, rename_rss = timed(rename)
            scenecluster.pixels.READING_REVISION = scenecluster.manifest.READING_REVISION = revision - 1
            row = {
                "scenes": n,
                "parts": manifests[0].n_parts,
                "revised": manifests[0].n_revised,
                "listing_s": round(list_s, 2),
                "rename_s": round(rename_s, 2),
                "listing_peak_rss_mb": round(list_rss / 2**20, 1),
                "rename_peak_rss_mb": round(rename_rss / 2**20, 1),
                "cpu": cpu_model(),
                "date": datetime.date.today().isoformat(),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
