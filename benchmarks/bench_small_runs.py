"""What a small clustering run costs per stage, its assignment in one Ray task against an actor pool.

A run of one part (up to 64 loose scenes, or one ``.tar`` shard; any run of at most ``embed.task_parts`` parts)
is assigned by a Ray task in a worker the fit already started (``scale.assign_actors: 0``, the default);
``scale.assign_actors: 1`` forces the actor pool, the obvious alternative, which starts a fresh actor process.
Each mode gets its own run folder and runs
the clustering job once per seed, as ``scenecluster benchmark`` does: the first seed embeds, the later ones
reuse the embeddings and refit. One JSON line per run, then one per mode: its assignment seconds per run, and
the wall seconds of a later seed (the first embeds and, in the first mode, also starts Ray's workers) against
the pool's.

Then, with ``--embed-runs N``, the embedding and assignment of a small run: the same scenes, cut into
``--parts`` parts, into a new run folder N times on the same Ray (as a benchmark's backbones, or a notebook's
runs, do), by Ray tasks (a run of at most ``embed.task_parts`` parts) and by the actor pools
(``embed.task_parts: 0``), the modes taking turns. One JSON line per run, then one per mode: its embedding,
assignment and wall seconds per run after the first, and their ratio to the pools'.

    python benchmarks/bench_small_runs.py --per-class 3 --seeds 0 1 2 --embed-runs 4 --parts 3
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

from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script
from _tiny_model import tiny_model

from scenecluster.cli import sample_data_dir
from scenecluster.config import load_config
from scenecluster.job import run_cluster_job

MODES = {"task": 0, "pool": 1}  # scale.assign_actors


def scenes(dest: Path, per_class: int) -> Path:
    """The first ``per_class`` scenes of each class of the shipped sample."""
    for cdir in sorted(p for p in sample_data_dir().iterdir() if p.is_dir()):
        (dest / cdir.name).mkdir(parents=True)
        for img in sorted(cdir.iterdir())[:per_class]:
            shutil.copy2(img, dest / cdir.name / img.name)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=3, help="scenes per class of the 10-class sample")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=None, help="backbone (default: a tiny random DINOv2, 28 px)")
    parser.add_argument("--projection", default="umap", choices=["umap", "pca"])
    parser.add_argument("--embed-runs", type=int, default=0, help="runs of new embeddings per embedding mode")
    parser.add_argument("--parts", type=int, default=3, help="parts the embedding runs' scenes are cut into")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = scenes(root / "scenes", args.per_class)
        model = args.model or str(tiny_model(root / "tiny"))
        totals: dict[str, dict[str, float]] = {}
        for mode, actors in MODES.items():
            for seed in args.seeds:
                settings = {
                    **run_settings(data, model, args),
                    "output": str(root / mode),
                    "data.seed": seed,
                    "reduce.random_state": seed,
                    "cluster.random_state": seed,
                    "scale.assign_actors": actors,
                }
                start = time.perf_counter()
                metrics = run_cluster_job(load_config(None, settings), echo=lambda s: None)
                wall = time.perf_counter() - start
                stages = {k: round(v, 2) for k, v in metrics["stage_seconds"].items()}
                row = {"mode": mode, "seed": seed, "n": metrics["n_embedded"], "wall_s": round(wall, 2), **stages}
                print(json.dumps(row), flush=True)
                total = totals.setdefault(mode, {"assign": 0.0, "later_wall_s": 0.0})
                total["assign"] += row["assign"]
                if seed != args.seeds[0]:  # the first seed embeds and, in the first mode, warms Ray's workers
                    total["later_wall_s"] += row["wall_s"]
        for mode, total in totals.items():
            later = max(1, len(args.seeds) - 1)
            summary = {
                "mode": mode,
                "assign_s_per_run": round(total["assign"] / len(args.seeds), 2),
                "later_seed_wall_s": round(total["later_wall_s"] / later, 2),
                "later_seed_wall_vs_pool": round(total["later_wall_s"] / totals["pool"]["later_wall_s"], 3),
            }
            summary.update(cpu=cpu_model(), cores=os.cpu_count(), date=date.today().isoformat())
            print(json.dumps(summary), flush=True)
        if args.embed_runs:
            embed_modes(root, data, model, args)


def run_settings(data: Path, model: str, args) -> dict:
    """The settings every run here shares."""
    settings = {
        "data.input": str(data),
        "data.labels": "folders",
        "embed.model": model,
        "reduce.method": args.projection,
        "resources.device": "cpu",
    }
    if args.model is None:
        settings["embed.image_size"] = 28
    return settings


def embed_modes(root: Path, data: Path, model: str, args) -> None:
    """The same scenes, cut into ``args.parts`` parts, embedded and assigned in a new run folder
    ``args.embed_runs`` times per mode, the modes taking turns: by Ray tasks (a run of at most ``embed.task_parts``
    parts, the default) against by the actor pools (``embed.task_parts: 0``, the only way before)."""
    n = sum(1 for p in data.rglob("*") if p.is_file())
    chunk = -(-n // args.parts)
    modes = {"task": {"embed.chunk_size": chunk}, "pool": {"embed.chunk_size": chunk, "embed.task_parts": 0}}
    totals: dict[str, dict[str, float]] = {mode: {"embed": 0.0, "assign": 0.0, "wall_s": 0.0} for mode in modes}
    for run in range(args.embed_runs):
        for mode, mode_settings in modes.items():
            settings = {**run_settings(data, model, args), "output": str(root / f"embed-{mode}-{run}"), **mode_settings}
            start = time.perf_counter()
            metrics = run_cluster_job(load_config(None, settings), echo=lambda s: None)
            wall = time.perf_counter() - start
            embed = round(metrics["stage_seconds"]["embed"], 2)
            assign = round(metrics["stage_seconds"]["assign"], 2)
            row = {"embed_mode": mode, "run": run, "n": metrics["n_embedded"], "wall_s": round(wall, 2), "embed": embed}
            row["assign"] = assign
            print(json.dumps(row), flush=True)
            if run:  # the first run of all starts Ray's workers
                totals[mode]["embed"] += embed
                totals[mode]["assign"] += assign
                totals[mode]["wall_s"] += wall
    later = max(1, args.embed_runs - 1)
    for mode, total in totals.items():
        summary = {
            "embed_mode": mode,
            "embed_s_per_later_run": round(total["embed"] / later, 2),
            "assign_s_per_later_run": round(total["assign"] / later, 2),
            "wall_s_per_later_run": round(total["wall_s"] / later, 2),
            "embed_vs_pool": round(total["embed"] / max(totals["pool"]["embed"], 1e-9), 3),
            "wall_vs_pool": round(total["wall_s"] / max(totals["pool"]["wall_s"], 1e-9), 3),
        }
        summary.update(cpu=cpu_model(), cores=os.cpu_count(), date=date.today().isoformat())
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
