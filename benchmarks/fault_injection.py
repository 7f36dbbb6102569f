"""Fault injection at archive scale (issue 13): 20,000 scenes, 1% corrupt files, an embedding actor killed and
the driver killed once each, then a rerun; its outputs must equal those of an undisturbed run.

Usage::

    python benchmarks/fault_injection.py --data ../shared/data/eurosat --work /tmp/fault-injection

Builds ``WORK/in`` (per class folder: links to real EuroSAT scenes plus truncated copies, 1% of the total), runs
``scenecluster cluster`` undisturbed into ``WORK/a``, then into ``WORK/b`` killing one embedding actor once the
first parts are written and the driver (with the local Ray it started) a few parts later, reruns ``WORK/b`` to
completion, and compares embeddings, assignments, skipped scenes and counts. Prints JSON lines, the last one the
verdict. Uses the tests' tiny random DINOv2 at 28 px to keep the CPU cost down: what is measured is what the
faults lose, which does not depend on the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
from _tiny_model import tiny_model  # benchmarks/ is on sys.path when run as a script


def build_input(data: Path, dest: Path, n_scenes: int, corrupt_share: float) -> dict[str, int]:
    """Per class: links to real scenes, and truncated copies named ``zz_corrupt_*.jpg`` (1% of all)."""
    classes = sorted(p for p in data.iterdir() if p.is_dir())
    per_class = n_scenes // len(classes)
    corrupt = round(per_class * corrupt_share)
    for cdir in classes:
        out = dest / cdir.name
        out.mkdir(parents=True, exist_ok=True)
        images = sorted(cdir.iterdir())
        for img in images[: per_class - corrupt]:
            link = out / img.name
            if not link.exists():
                link.symlink_to(img.resolve())
        for i, img in enumerate(images[-corrupt:]):
            data_bytes = img.read_bytes()
            (out / f"zz_corrupt_{i:03d}.jpg").write_bytes(data_bytes[: len(data_bytes) // 3])
    return {"scenes": per_class * len(classes), "corrupt": corrupt * len(classes)}


def command(inp: Path, out: Path, model: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "scenecluster.cli",
        "cluster",
        str(inp),
        "-o",
        str(out),
        "--model",
        str(model),
        "--image-size",
        "28",
    ]


def run(cmd: list[str], log: Path) -> dict:
    start = time.monotonic()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    return {"exit": code, "seconds": round(time.monotonic() - start, 1)}


def _parts(out: Path) -> int:
    return len(list((out / "embeddings").glob("part-*.parquet"))) if (out / "embeddings").is_dir() else 0


def _actor_pids(driver: int) -> list[int]:
    """Embedding actors of this run only: processes under its driver (its local Ray), never anyone else's."""
    pids = []
    for proc in psutil.Process(driver).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "PartEmbedder" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
    return pids


def disturbed_run(cmd: list[str], out: Path, log: Path, kill_actor_at: int, kill_driver_at: int) -> dict:
    """Run, kill one embedding actor once ``kill_actor_at`` parts exist, then the driver and every process it
    started (its local Ray) once ``kill_driver_at`` parts exist."""
    faults: dict = {"actor_killed": None, "driver_killed": None}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            parts = _parts(out)
            actors = _actor_pids(proc.pid) if faults["actor_killed"] is None and parts >= kill_actor_at else []
            if actors:
                pid = actors[0]
                psutil.Process(pid).kill()
                faults["actor_killed"] = {"pid": pid, "parts_done": parts}
            if faults["actor_killed"] and parts >= kill_driver_at:
                family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
                for pid in family:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                faults["driver_killed"] = {"processes": len(family), "parts_done": parts}
                break
            time.sleep(0.2)
        proc.wait()
    faults["exit"] = proc.returncode
    return faults


def compare(a: Path, b: Path) -> dict:
    """Every output that carries results, compared exactly."""
    ea, eb = pq.read_table(a / "embeddings.parquet"), pq.read_table(b / "embeddings.parquet")
    aa, ab = pq.read_table(a / "assignments.parquet"), pq.read_table(b / "assignments.parquet")
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    keys = ("n_images", "n_embedded", "n_skipped", "n_clusters", "n_novel")
    vectors = [np.stack(t.column("embedding").to_numpy(False)) for t in (ea, eb)]
    columns = ("path", "cluster", "probability", "novel")
    return {
        "embeddings_equal": ea.column("path").equals(eb.column("path")) and np.array_equal(*vectors),
        "assignments_equal": all(aa.column(c).equals(ab.column(c)) for c in columns),
        "skipped_equal": (a / "skipped.jsonl").read_text() == (b / "skipped.jsonl").read_text(),
        "metrics_equal": all(ma[k] == mb[k] for k in keys),
        "metrics": {k: ma[k] for k in keys},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--scenes", type=int, default=20000)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    built = build_input(args.data, args.work / "in", args.scenes, 0.01)
    print(json.dumps({"input": built}), flush=True)
    model = tiny_model(args.work / "tiny-dinov2")
    cmd_a, cmd_b = command(args.work / "in", args.work / "a", model), command(args.work / "in", args.work / "b", model)
    print(json.dumps({"undisturbed": run(cmd_a, args.work / "a.log")}), flush=True)
    faults = disturbed_run(cmd_b, args.work / "b", args.work / "b1.log", kill_actor_at=3, kill_driver_at=12)
    print(json.dumps({"faults": faults, "parts_after_kill": _parts(args.work / "b")}), flush=True)
    print(json.dumps({"rerun": run(cmd_b, args.work / "b2.log")}), flush=True)
    print(json.dumps({"verdict": compare(args.work / "a", args.work / "b")}), flush=True)


if __name__ == "__main__":
    main()
