"""Scenes read per second by ``scenecluster.pixels.read_pixels``, this tree against an earlier commit, same files.

Reading runs in the job's decode tasks, one core each, beside the model. A change to how scenes are read (a mask
looked up, a fill computed) shows here as the rate per core of each kind of file. Both versions run in one
process, interleaved, best of ``--repeats``, so the machine's load falls on both alike.

    python benchmarks/bench_read_rate.py --before 597b160 \\
        --files 'edge=/tmp/ortho-eurosat/*/edge_*.tif' 'whole=/tmp/ortho-eurosat/*/[!e]*.tif' \\
        'jpeg=../shared/data/eurosat/*/*.jpg'
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import scenecluster.pixels as current


def load_pixels_at(revision: str, folder: Path):
    """``scenecluster/pixels.py`` (and ``geotiff.py`` where it exists) as they were at ``revision``, imported under
    other names so that both versions live in one process."""
    for name in ("geotiff", "pixels"):
        shown = subprocess.run(
            ["git", "show", f"{revision}:src/scenecluster/{name}.py"], capture_output=True, text=True, check=False
        )
        if shown.returncode == 0:
            (folder / f"{name}.py").write_text(shown.stdout.replace("scenecluster.geotiff", "geotiff_before"))
    sys.modules.pop("geotiff_before", None)
    if (folder / "geotiff.py").exists():
        _import(folder / "geotiff.py", "geotiff_before")
    return _import(folder / "pixels.py", "pixels_before")


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def rate(module, blobs: list[bytes], repeats: int) -> float:
    spec = module.PixelSpec()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for data in blobs:
            module.read_pixels(data, spec)
        best = min(best, time.perf_counter() - start)
    return len(blobs) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare with (e.g. 597b160)")
    parser.add_argument("--files", nargs="+", required=True, metavar="KIND=GLOB", help="files of each kind")
    parser.add_argument("--max-files", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        before = load_pixels_at(args.before, Path(folder))
        for kind, pattern in (item.split("=", 1) for item in args.files):
            blobs = [Path(f).read_bytes() for f in sorted(glob.glob(pattern))[: args.max_files]]
            rates = {"before": 0.0, "now": 0.0}
            for _ in range(2):  # interleaved: a passing load on the machine falls on both
                rates["before"] = max(rates["before"], rate(before, blobs, args.repeats))
                rates["now"] = max(rates["now"], rate(current, blobs, args.repeats))
            print(
                json.dumps(
                    {
                        "kind": kind,
                        "files": len(blobs),
                        "before_per_s": round(rates["before"]),
                        "now_per_s": round(rates["now"]),
                        "ratio": round(rates["now"] / rates["before"], 2),
                    }
                )
            )


if __name__ == "__main__":
    main()
