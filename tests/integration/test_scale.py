"""Archive scale on a local Ray: part datasets on S3, a killed assignment actor and a rerun that recomputes only
what is missing, and a saved clustering that assigns held-out scenes and flags a withheld class as novel."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score

from scenecluster.config import AssignJobConfig, load_config
from scenecluster.devices import decide, local_inventory
from scenecluster.fitted import read_clustering_meta
from scenecluster.job import run_assign_job, run_cluster_job
from scenecluster.outputs import OutputFolder
from scenecluster.stages import assign_parts
from tests.conftest import copy_sample

pytestmark = pytest.mark.integration


def _cfg(input_dir, out, model, **extra):
    overrides = {
        "data.input": str(input_dir),
        "output": str(out),
        "data.labels": "folders",
        "embed.model": str(model),
        "embed.image_size": 28,
        "embed.batch_size": 8,
        "embed.chunk_size": 10,
        "reduce.n_neighbors": 10,
        "cluster.n_components": 10,
        **extra,
    }
    return load_config(None, overrides)


def test_parts_are_parquet_datasets_on_s3(ray_cluster, s3_env, tmp_path, tiny_model_dir):
    """With the output in S3, a local model folder (a fine-tune's backbone on the head node) is copied beside the
    results: actors on any node load that copy, and the saved clustering still assigns once the folder is gone."""
    s3_env.create_bucket("runs")
    scenes = copy_sample(tmp_path / "scenes", per_class=8, classes=3)
    backbone = shutil.copytree(tiny_model_dir, tmp_path / "finetune" / "backbone")
    cfg = _cfg(scenes, "s3://runs/run1", backbone, **{"scale.export": "never"})
    lines: list[str] = []
    metrics = run_cluster_job(cfg, echo=lines.append)
    keys = [o["Key"] for o in s3_env.boto3_client().list_objects_v2(Bucket="runs", Prefix="run1/")["Contents"]]
    parts = sorted(k for k in keys if k.startswith("run1/embeddings/part-"))
    assigned = sorted(k for k in keys if k.startswith("run1/assignments/part-"))
    assert len(parts) == 3 and [k.split("/")[-1] for k in parts] == [k.split("/")[-1] for k in assigned]
    assert {"run1/clustering/clustering.json", "run1/clustering/mixture.safetensors", "run1/metrics.json"} <= set(keys)
    assert not any(k.endswith(("embeddings.parquet", "assignments.parquet")) for k in keys)  # export: never
    assert metrics["n_embedded"] == 24 and metrics["n_clusters"] >= 1 and "acc" in metrics
    assert {"run1/model/config.json", "run1/model/model.safetensors"} <= set(keys)
    assert f"[model] {backbone} copied to s3://runs/run1/model" in "\n".join(lines)
    assert read_clustering_meta(OutputFolder("s3://runs/run1"))["feature"]["model"] == "s3://runs/run1/model"

    shutil.rmtree(backbone)  # the head node is gone
    assign_cfg = load_config(
        None,
        {"data.input": str(scenes), "output": "s3://runs/new", "clustering": "s3://runs/run1", "embed.chunk_size": 64},
        model=AssignJobConfig,
    )
    lines.clear()
    assert run_assign_job(assign_cfg, echo=lines.append)["n_embedded"] == 24
    assert not any(line.startswith("[model]") for line in lines)  # a model already in the store is not copied


def _assigner_pids() -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "PartAssigner" in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
            found.append(proc.pid)
    return found


def test_killed_assignment_actor_then_rerun_recomputes_only_missing_parts(ray_cluster, tmp_path, tiny_model_dir):
    scenes = copy_sample(tmp_path / "scenes", per_class=12, classes=5)  # 60 scenes, 6 parts
    out = tmp_path / "out"
    cfg = _cfg(scenes, out, tiny_model_dir)
    parts_dir = out / "assignments"
    killed: list[int] = []

    def kill_when_first_part_lands() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed:
            if parts_dir.is_dir() and any(parts_dir.glob("part-*.parquet")):
                for pid in _assigner_pids():
                    psutil.Process(pid).kill()
                    killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_when_first_part_lands)
    killer.start()
    try:
        first = run_cluster_job(cfg, echo=lambda s: None)
    except Exception:  # the run may fail outright, or Ray may restart the actor and finish
        first = None
    killer.join()
    assert killed, "the assignment actor was never seen, so nothing was killed"
    done_before = {p.name: p.stat().st_mtime_ns for p in parts_dir.glob("part-*.parquet")}
    clustering_before = (out / "clustering" / "clustering.json").stat().st_mtime_ns

    lines: list[str] = []
    second = run_cluster_job(cfg, echo=lines.append)
    assert second["n_embedded"] == 60 and len(list(parts_dir.glob("part-*.parquet"))) == 6
    for name, stamp in done_before.items():
        assert (parts_dir / name).stat().st_mtime_ns == stamp, f"{name} was recomputed"
    assert (out / "clustering" / "clustering.json").stat().st_mtime_ns == clustering_before  # no refit
    assert any(line.startswith("[embed] reused") for line in lines) and any(
        "reused" in s for s in lines if "[fit]" in s
    )
    assert pq.read_table(out / "assignments.parquet").num_rows == 60
    if first is not None:
        assert first["n_clusters"] == second["n_clusters"] and first["acc"] == second["acc"]


def test_saved_clustering_assigns_held_out_scenes_and_flags_a_withheld_class(ray_cluster, tmp_path, sample_dir):
    """``assign`` with a clustering fitted on six of the sample's classes (20 scenes each, real stand-in weights):
    the held-out scenes get the saved run's cluster ids and agree with clustering everything in one shot, and
    scenes of the two classes left out of the fit lie farther from the fitted ones and are flagged novel more
    often than held-out scenes of the fitted classes."""
    classes = sorted(p.name for p in sample_dir.iterdir() if p.is_dir())
    seen, withheld = classes[:6], classes[6:8]
    fit_dir, new_dir = tmp_path / "fit", tmp_path / "new"
    for cls in seen:
        images = sorted((sample_dir / cls).glob("*.jpg"))
        for dest, chosen in ((fit_dir, images[:20]), (new_dir, images[20:])):
            (dest / cls).mkdir(parents=True)
            for img in chosen:
                shutil.copy(img, dest / cls / img.name)
    for cls in withheld:
        shutil.copytree(sample_dir / cls, new_dir / cls)
    feature = {
        "embed.model": "facebook/dinov2-small",
        "embed.image_size": 112,
        "embed.layer": 8,
        "embed.pooling": "cls+mean",
        "embed.views": "rot90",  # the default d4 gives the same margins here in 1.5x the test's time
        "embed.chunk_size": 64,
        "reduce.n_neighbors": 15,
    }
    # 120 fitted scenes hold out only 12 to calibrate on: a 1% threshold would be their largest distance and
    # flag almost nothing, so this run flags the 10% farthest (the 27,000-scene figures are in docs/benchmarks.md)
    fit_settings = {**feature, "scale.novelty_quantile": 0.1}
    fit_cfg = _cfg(fit_dir, tmp_path / "run", "unused", **fit_settings)
    run_cluster_job(fit_cfg, echo=lambda s: None)
    fitted_run = pq.read_table(tmp_path / "run" / "assignments.parquet").to_pandas().set_index("path")
    _assert_fitted_rows_kept(tmp_path / "run", fitted_run, held_out=12)

    assign_cfg = load_config(
        None,
        {
            "data.input": str(new_dir),
            "data.labels": "folders",
            "output": str(tmp_path / "assigned"),
            "clustering": str(tmp_path / "run"),
            "embed.chunk_size": 64,
        },
        model=AssignJobConfig,
    )
    metrics = run_assign_job(assign_cfg, echo=lambda s: None)
    assert metrics["n_embedded"] == 6 * 10 + 2 * 30
    table = pq.read_table(tmp_path / "assigned" / "assignments.parquet").to_pandas()
    fitted_ids = set(pq.read_table(tmp_path / "run" / "assignments.parquet").column("cluster").to_pylist())
    assert set(table["cluster"]) <= fitted_ids  # the saved run's ids, never new ones
    novel_withheld = table[table["label"].isin(withheld)]["novel"].mean()
    novel_seen = table[table["label"].isin(seen)]["novel"].mean()
    assert novel_withheld > novel_seen, (novel_withheld, novel_seen)
    # The flag thresholds the distance to the nearest fitted scene, which is deterministic for given weights:
    # measured 0.070 (withheld) against 0.047 (held-out scenes of the fitted classes), flags 0.37 against 0.25
    # (d4 views: 0.069 against 0.045, 0.38 against 0.27).
    distance = table.groupby(table["label"].isin(withheld))["neighbour_distance"].median()
    assert distance[True] > 1.2 * distance[False], distance.to_dict()

    # Agreement with clustering the seen classes in one shot, on the held-out scenes of those classes: the job's
    # projection and mixture fitted on every seen scene's embedding (the fit run's and the assigned run's, the
    # same feature), in a Ray worker as the job fits; embedding the 200 scenes a third time would double the test.
    import ray

    from scenecluster.embed import read_embeddings
    from scenecluster.fitted import fit_clustering

    _, X_fit, _ = read_embeddings(tmp_path / "run" / "embeddings.parquet")
    new_paths, X_new, new_labels = read_embeddings(tmp_path / "assigned" / "embeddings.parquet")
    held = [i for i, label in enumerate(new_labels) if label in seen]
    reduce = {**fit_cfg.reduce.model_dump(), "backend": "umap-learn"}
    fit = ray.remote(fit_clustering).options(num_cpus=1)
    _, one_shot, _ = ray.get(
        fit.remote(np.concatenate([X_fit, X_new[held]]), feature={}, reduce=reduce, cluster=fit_cfg.cluster)
    )
    assigned = table.set_index("path").loc[[new_paths[i] for i in held], "cluster"]
    ari = adjusted_rand_score(one_shot[len(X_fit) :], assigned)
    print(f"assign vs one-shot ARI {ari:.3f}; novel: withheld {novel_withheld:.2f}, seen {novel_seen:.2f}")
    print(f"median distance to a fitted scene, withheld class or not: {distance.to_dict()}")
    assert ari > 0.3 and np.isfinite(table["log_likelihood"]).all()


def _assert_fitted_rows_kept(out, assigned, held_out: int) -> None:
    """Scenes the fit saw keep its coordinates and cluster (distance 0 to a fitted scene: themselves); the
    ``held_out`` others, kept back to calibrate the novelty flag, were placed by the projection's transform."""
    fit = pq.read_table(out / "clustering" / "fit_sample.parquet").to_pandas().set_index("path")
    assert len(fit) + held_out == len(assigned)
    kept = assigned.loc[fit.index]
    assert (kept["cluster"] == fit["cluster"]).all() and (kept["neighbour_distance"] == 0).all()
    assert np.array_equal(np.stack(kept["coords"]), np.stack(fit["coords"]))
    assert (assigned.drop(fit.index)["neighbour_distance"] > 0).all()


def _actors(kind: str) -> set[str]:
    """Ids of every actor of class ``kind`` this Ray has created, dead ones too (Ray's own actor table: a test may
    not see an actor process that an earlier test's pool spawns late, and may see one that it did not start)."""
    import ray._private.state

    return {a["ActorID"] for a in ray._private.state.actors().values() if kind in a["ActorClassName"]}


def _run_counting_actors(cfg) -> tuple[list[str], int, int]:
    """Run the job; its echoed lines and how many embedding and assignment actors it created."""
    before = _actors("PartEmbedder"), _actors("PartAssigner")
    lines: list[str] = []
    run_cluster_job(cfg, echo=lines.append)
    return lines, len(_actors("PartEmbedder") - before[0]), len(_actors("PartAssigner") - before[1])


def test_a_small_run_is_embedded_and_assigned_in_tasks_as_the_actor_pools_would(ray_cluster, tmp_path, tiny_model_dir):
    """A run of at most ``embed.task_parts`` parts is embedded and assigned by Ray tasks (no actor process), the
    pools write the same rows, and the scenes the fit saw keep exactly the fit's coordinates and cluster."""
    scenes = copy_sample(tmp_path / "scenes", per_class=10, classes=3)  # 30 scenes: 3 parts of 10
    out = tmp_path / "out"
    lines, embedders, assigners = _run_counting_actors(_cfg(scenes, out, tiny_model_dir))
    assert len(list((out / "embeddings").glob("part-*.parquet"))) == 3
    assert len(list((out / "assignments").glob("part-*.parquet"))) == 3
    assert (embedders, assigners) == (0, 0), "a small run started an embedding or assignment actor"
    assert any(line.startswith("[embed] 30 embedded") for line in lines), lines
    by_task = pq.read_table(out / "assignments.parquet").to_pandas().set_index("path").sort_index()

    _assert_fitted_rows_kept(out, by_task, held_out=0)  # under 100 scenes the fit sees them all

    # The tasks tell their progress as the embedding's tasks do (a job: at most once a minute; here every part)
    shutil.rmtree(out / "assignments")
    told: list[str] = []
    resources = decide("cpu", local_inventory())
    folder = OutputFolder(str(out))
    assert assign_parts(folder, folder, resources, 0, True, progress=told.append, progress_every_s=0).n == 30
    assert told == [f"[assign] {n} of 3 parts assigned" for n in (1, 2, 3)]

    shutil.rmtree(out / "assignments")
    lines, embedders, assigners = _run_counting_actors(_cfg(scenes, out, tiny_model_dir, **{"embed.task_parts": 0}))
    assert embedders == 0 and assigners >= 1 and any("reused" in s for s in lines if s.startswith("[fit]"))
    by_pool = pq.read_table(out / "assignments.parquet").to_pandas().set_index("path").sort_index()
    assert by_pool.drop(columns="coords").equals(by_task.drop(columns="coords"))
    assert np.array_equal(np.stack(by_pool["coords"]), np.stack(by_task["coords"]))

    # The same parts embedded by the actor pool, into the same vectors.
    pool = tmp_path / "pool"
    _, embedders, _ = _run_counting_actors(_cfg(scenes, pool, tiny_model_dir, **{"embed.task_parts": 0}))
    assert embedders == 1 and len(list((pool / "embeddings").glob("part-*.parquet"))) == 3
    tables = [pq.read_table(o / "embeddings.parquet").to_pandas().set_index("path").sort_index() for o in (out, pool)]
    assert list(tables[0].index) == list(tables[1].index) and len(tables[0]) == 30
    np.testing.assert_allclose(np.stack(tables[0]["embedding"]), np.stack(tables[1]["embedding"]), atol=1e-5)


def test_a_model_rewritten_in_place_or_other_scenes_are_embedded_and_fitted_again(ray_cluster, tmp_path):
    """The weights under a model's name and the run's scenes key what a rerun may reuse: a fine-tune writes its
    backbone to the same folder every time, and ``--overwrite`` over a run of other scenes must not keep its fit."""
    import torch
    from transformers import Dinov2Model

    from scenecluster.errors import InputError, OutputError
    from scenecluster.models import save_backbone, tiny_dinov2_config

    def save_model(seed: int) -> Path:
        torch.manual_seed(seed)
        return save_backbone(Dinov2Model(tiny_dinov2_config()), tmp_path / "model")

    model = save_model(0)
    first = copy_sample(tmp_path / "first", per_class=8, classes=2)
    other = copy_sample(tmp_path / "other", per_class=8, classes=3)
    run_cluster_job(_cfg(first, tmp_path / "run", model), echo=lambda s: None)

    save_model(1)  # the same folder with other weights
    assign_cfg = load_config(
        None,
        {"data.input": str(other), "output": str(tmp_path / "assigned"), "clustering": str(tmp_path / "run")},
        model=AssignJobConfig,
    )
    with pytest.raises(InputError, match=r"fitted on features of .*model when it held weights sha256:"):
        run_assign_job(assign_cfg, echo=lambda s: None)
    with pytest.raises(OutputError, match=r"differs in: weights"):
        run_cluster_job(_cfg(first, tmp_path / "run", model), echo=lambda s: None)

    lines: list[str] = []
    metrics = run_cluster_job(_cfg(other, tmp_path / "run", model), overwrite=True, echo=lines.append)
    assert any(line.startswith("[embed] 24 embedded") for line in lines), lines
    assert any(line.startswith("[fit] fitted") for line in lines), lines
    assert metrics["n_embedded"] == 24
    for table in ("assignments.parquet", "clustering/report_sample.parquet", "clustering/fit_sample.parquet"):
        paths = pq.read_table(tmp_path / "run" / table, columns=["path"]).column("path").to_pylist()
        assert paths and all(p.startswith(str(other)) for p in paths), table


def test_tasks_run_a_few_at_a_time_in_order_and_a_failure_is_raised_at_once(ray_cluster):
    """``run_tasks_interruptibly``, which runs a small run's parts: results in the items' order, never more than
    ``in_flight`` submitted at once, and the first failure raised without waiting for the tasks still running
    (which it cancels)."""
    import ray

    from scenecluster.stages import run_tasks_interruptibly

    @ray.remote(num_cpus=0)
    def slow_double(x: int) -> int:
        time.sleep(0.05 * max(0, 5 - x))  # the first ones finish last
        if x == 99:
            raise ValueError("part 99 is broken")
        if x == 100:
            time.sleep(60)
        return 2 * x

    submitted: list[int] = []
    most_at_once = 0
    finished: list[int] = []

    def submit(x: int):
        nonlocal most_at_once
        submitted.append(x)
        most_at_once = max(most_at_once, len(submitted) - len(finished))
        return slow_double.remote(x)

    assert run_tasks_interruptibly(submit, [0, 1, 2, 3, 4], in_flight=2, on_done=finished.append) == [0, 2, 4, 6, 8]
    assert finished == [1, 2, 3, 4, 5] and most_at_once == 2

    start = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="part 99 is broken"):
        run_tasks_interruptibly(slow_double.remote, [100, 99], in_flight=2)
    assert time.monotonic() - start < 30  # the failure came first; the minute-long task did not hold it
