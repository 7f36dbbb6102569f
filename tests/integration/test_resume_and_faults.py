"""Resumable embedding, tar shards and faults, on a local Ray with a tiny random model and real images."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from scenecluster.config import AssignJobConfig, EmbedConfig, load_config
from scenecluster.data import list_scenes
from scenecluster.devices import decide, local_inventory
from scenecluster.embed import embed_images, plan_chunks
from scenecluster.features import resolve_feature_spec
from scenecluster.job import run_assign_job, run_cluster_job
from scenecluster.outputs import OutputFolder
from tests.conftest import copy_sample, tiny_job_config

pytestmark = pytest.mark.integration


def _write_shards(root: Path, dest: Path, per_shard: int) -> list[Path]:
    """WebDataset-style shards of ``<class>/<image>`` members, in sorted order."""
    files = sorted(root.glob("*/*.jpg"))
    dest.mkdir(parents=True)
    shards = []
    for n, start in enumerate(range(0, len(files), per_shard)):
        shard = dest / f"shard-{n:04d}.tar"
        with tarfile.open(shard, "w") as tar:
            for f in files[start : start + per_shard]:
                tar.add(f, arcname=f"{f.parent.name}/{f.name}")
        shards.append(shard)
    return shards


def test_tar_shards_with_a_truncated_member_and_a_damaged_shard(ray_cluster, tmp_path, tiny_model_dir, monkeypatch):
    loose = copy_sample(tmp_path / "loose", per_class=4, classes=3)
    shards = _write_shards(loose, tmp_path / "shards", per_shard=5)
    # a truncated JPEG inside a good shard
    good = next(loose.glob("*/*.jpg")).read_bytes()
    with tarfile.open(shards[0], "a") as tar:
        info = tarfile.TarInfo("Forest/cut.jpg")
        info.size = len(good) // 3
        tar.addfile(info, io.BytesIO(good[: len(good) // 3]))
    # a shard cut short in the middle of a member
    whole = shards[1].read_bytes()
    shards[1].write_bytes(whole[: len(whole) // 2])
    cfg = tiny_job_config(tmp_path / "shards", tmp_path / "out", tiny_model_dir, {"data.labels": "folders"})
    metrics = run_cluster_job(cfg, echo=lambda s: None)
    skipped = (tmp_path / "out" / "skipped.jsonl").read_text()
    assert "cut.jpg" in skipped
    assert "archive damaged" in skipped and "shard-0001.tar" in skipped
    table = pq.read_table(tmp_path / "out" / "embeddings.parquet")
    paths = table.column("path").to_pylist()
    assert all(".tar/" in p for p in paths)
    assert set(table.column("label").to_pylist()) <= {"AnnualCrop", "Forest", "HerbaceousVegetation"}
    # every member of the intact shards is embedded; the damaged one contributes what precedes the damage
    assert metrics["n_embedded"] >= 12 - 5
    assert metrics["n_skipped"] == 2

    # The report shows the members: each read back by the byte range its embedding recorded, not the whole shard
    # (a compressed shard or an older run's would be said on the job's report line instead).
    members = pq.read_table(tmp_path / "out" / "members").to_pandas()
    assert set(members["path"]) == set(paths) | {f"{shards[0]}/Forest/cut.jpg"}
    cut_member = good[: len(good) // 3]
    for path, offset, size in members.itertuples(index=False):
        shard, member = path.split(".tar/")
        expected = cut_member if member == "Forest/cut.jpg" else (loose / member).read_bytes()
        assert Path(f"{shard}.tar").read_bytes()[offset : offset + size] == expected, path
    page = (tmp_path / "out" / "report.html").read_text()
    assert "unreadable" not in page and page.count("data:image/webp;base64,") >= len(paths)

    # A rerun that finds every part written takes the finished pass's counts and embeds nothing (no actor pool,
    # no task: a refit with another seed, what a benchmark's next seed does); the skipped scenes are still listed.
    import scenecluster.embed
    import scenecluster.scale

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the embedding pass ran again over parts that were all written")

    monkeypatch.setattr(scenecluster.embed, "part_dataset", no_second_pass)
    monkeypatch.setattr(scenecluster.scale, "embed_named_parts", no_second_pass)
    lines: list[str] = []
    again = run_cluster_job(
        cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"random_state": 1})}), echo=lines.append
    )
    assert any(line.startswith(f"[embed] reused {metrics['n_embedded']} embeddings") for line in lines), lines
    assert any(line.startswith("[fit] fitted") for line in lines), lines
    # the rerun says it goes on over the first run's listing, so scenes added since are not silently left out
    assert any(line.startswith("[list]") and "as listed by the run before" in line for line in lines), lines
    assert (again["n_embedded"], again["n_skipped"]) == (metrics["n_embedded"], 2)
    assert (tmp_path / "out" / "skipped.jsonl").read_text() == skipped


def _embed(listing, out, model, chunk_size=10):
    spec = resolve_feature_spec(str(model), image_size=28)
    settings = EmbedConfig(image_size=28, batch_size=5, chunk_size=chunk_size)
    return embed_images(listing, out, spec, resources=decide("cpu", local_inventory()), settings=settings)


def test_rerun_recomputes_only_missing_parts(ray_cluster, tmp_path, tiny_model_dir):
    scenes = copy_sample(tmp_path / "scenes", per_class=5, classes=6)
    listing = list_scenes(str(scenes))
    out = OutputFolder(str(tmp_path / "out"))
    first = _embed(listing, out, tiny_model_dir)
    parts = sorted((tmp_path / "out" / "embeddings").iterdir())
    assert first.chunks_computed == len(parts) == 3 and first.n_images == 30
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()
    second = _embed(listing, out, tiny_model_dir)
    assert (second.chunks_reused, second.chunks_computed) == (2, 1)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "embeddings").iterdir()}
    assert after[parts[0].name] == stamps[parts[0].name] and after[parts[2].name] == stamps[parts[2].name]
    assert pq.read_table(tmp_path / "out" / "embeddings.parquet").num_rows == 30
    # other feature settings are other parts: nothing is reused across models or layers
    assert plan_chunks(listing.paths, 10, {"layer": 1})[0].key != plan_chunks(listing.paths, 10, {"layer": 2})[0].key


def test_a_rerun_after_the_reading_of_tiffs_changed_reembeds_their_parts_and_refits(
    ray_cluster, tmp_path, tiny_model_dir, monkeypatch
):
    """An output folder made before an upgrade that reads TIFFs otherwise (masks, alpha, colour roles): the rerun
    must not cluster the TIFFs' old vectors beside new ones. Their part is embedded again and the clustering refitted;
    the parts of JPEGs alone are kept, since their reading never changed."""
    from PIL import Image

    import scenecluster.job
    import scenecluster.manifest
    import scenecluster.pixels

    scenes = copy_sample(tmp_path / "scenes", per_class=4, classes=3)  # 12 JPEGs: three parts of 4
    tiffs = scenes / "Tiles"  # listed last: a fourth part
    tiffs.mkdir()
    for n, jpeg in enumerate(sorted(scenes.glob("Forest/*.jpg"))):
        Image.open(jpeg).rotate(90).save(tiffs / f"tile-{n}.tif", compression="tiff_deflate")
    cfg = tiny_job_config(scenes, tmp_path / "out", tiny_model_dir, {"embed.chunk_size": 4})
    first = run_cluster_job(cfg, echo=lambda s: None)
    parts = tmp_path / "out" / "embeddings"
    stamps = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    assert first["n_embedded"] == 16 and len(stamps) == 4

    # the folder's listing is made once: a scene added since stays out (it is for ``assign``)
    shutil.copy(next(scenes.glob("Forest/*.jpg")), scenes / "Forest" / "added.jpg")
    bumped = scenecluster.pixels.READING_REVISION + 1
    for module in (scenecluster.pixels, scenecluster.manifest, scenecluster.job):
        monkeypatch.setattr(module, "READING_REVISION", bumped)
    # before the rerun, ``assign`` of TIFFs with the clustering the earlier reading fitted says so
    assign = {"data.input": str(tiffs), "output": str(tmp_path / "assigned"), "clustering": str(tmp_path / "out")}
    told: list[str] = []
    assigned = run_assign_job(load_config(None, assign, model=AssignJobConfig), echo=told.append)
    assert assigned["n_embedded"] == 4
    assert any(line.startswith("[assign] warning: the clustering in") and "4 of the scenes" in line for line in told)
    lines: list[str] = []
    again = run_cluster_job(cfg, echo=lines.append)
    assert any(line.startswith("[embed] 16 embedded") and "3 of 4 parts reused" in line for line in lines), lines
    assert any(line.startswith("[fit] fitted") for line in lines), lines
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    kept = set(stamps) & set(after)
    assert len(after) == 4 and len(kept) == 3  # the TIFFs' old part is gone, not counted beside its new one
    assert all(after[name] == stamps[name] for name in kept)
    assert again["n_embedded"] == 16
    assert pq.read_table(tmp_path / "out" / "assignments.parquet").num_rows == 16
    saved = json.loads((tmp_path / "out" / "clustering" / "clustering.json").read_text())
    assert saved["reading"] == bumped  # the refit records the reading it fitted


def _pids_whose_command(matches) -> list[int]:
    """Processes other than this one whose command line ``matches`` (Ray titles a worker ``ray::<what it runs>``)."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if matches(cmd) and proc.pid != os.getpid():
            pids.append(proc.pid)
    return pids


def _embedder_actor_pids() -> list[int]:
    return _pids_whose_command(lambda cmd: "Embedder" in cmd)


def test_killed_actor_then_rerun_resumes_without_recomputing(ray_cluster, tmp_path, tiny_model_dir):
    scenes = copy_sample(tmp_path / "scenes", per_class=30, classes=10)  # 300 real images
    listing = list_scenes(str(scenes))
    out = OutputFolder(str(tmp_path / "out"))
    parts_dir = tmp_path / "out" / "embeddings"
    killed: list[int] = []

    def kill_when_first_part_lands() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if parts_dir.is_dir() and any(parts_dir.glob("part-*.parquet")):
                for pid in _embedder_actor_pids():
                    psutil.Process(pid).kill()
                    killed.append(pid)
                if killed:
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_first_part_lands)
    killer.start()
    try:
        first = _embed(listing, out, tiny_model_dir, chunk_size=20)
        first_error = None
    except Exception as exc:  # the run may fail outright, or Ray may restart the actor and finish
        first, first_error = None, exc
    killer.join()
    assert killed, "the embedding actor was never seen, so nothing was killed"
    done_before = {p.name: p.stat().st_mtime_ns for p in parts_dir.glob("part-*.parquet")}
    assert done_before

    second = _embed(listing, out, tiny_model_dir, chunk_size=20)
    assert second.n_images == 300 and second.n_skipped == 0
    assert second.chunks_reused >= len(done_before)
    for name, stamp in done_before.items():
        assert (parts_dir / name).stat().st_mtime_ns == stamp, f"{name} was recomputed"
    assert pq.read_table(tmp_path / "out" / "embeddings.parquet").num_rows == 300
    if first is not None:  # Ray restarted the actor and retried: the first run was already complete
        assert first.n_images == 300 and first_error is None


def _task_worker_pids(function: str) -> list[int]:
    """Ray workers running ``function`` as a task now (a busy worker is titled ``ray::<function>``)."""
    return _pids_whose_command(lambda cmd: cmd.startswith(f"ray::{function}"))


def test_a_killed_embedding_task_is_retried_and_a_rerun_keeps_the_finished_parts(ray_cluster, tmp_path, tiny_model_dir):
    """A small run's parts are embedded by Ray tasks (``embed.task_parts``), not actors: a task whose worker dies
    is retried by Ray, the part it was writing is written once whole, and the parts finished before are kept."""
    scenes = copy_sample(tmp_path / "scenes", per_class=12, classes=10)  # 120 scenes: 4 parts of 30
    listing = list_scenes(str(scenes))
    out = OutputFolder(str(tmp_path / "out"))
    parts_dir = tmp_path / "out" / "embeddings"
    killed: list[int] = []

    def kill_a_running_task_after_the_first_part() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if parts_dir.is_dir() and any(parts_dir.glob("part-*.parquet")):
                for pid in _task_worker_pids("embed_named_parts"):
                    psutil.Process(pid).kill()
                    killed.append(pid)
            time.sleep(0.01)

    spec = resolve_feature_spec(str(tiny_model_dir), image_size=112)  # slow enough for a task to be caught
    settings = EmbedConfig(image_size=112, batch_size=5, chunk_size=30)
    assert settings.task_parts >= 4
    resources = decide("cpu", local_inventory())
    killer = threading.Thread(target=kill_a_running_task_after_the_first_part)
    killer.start()
    try:
        first = embed_images(listing, out, spec, resources=resources, settings=settings)
    except Exception:  # Ray may give up on the task; the rerun below must then finish it
        first = None
    killer.join()
    assert killed, "no embedding task was seen running, so nothing was killed"
    if first is not None:  # Ray retried the killed task: the run finished whole
        assert first.n_images == 120 and not first.skipped
    done_before = {p.name: p.stat().st_mtime_ns for p in parts_dir.glob("part-*.parquet")}

    second = embed_images(listing, out, spec, resources=resources, settings=settings)
    assert second.n_images == 120 and not second.skipped
    for name, stamp in done_before.items():
        assert (parts_dir / name).stat().st_mtime_ns == stamp, f"{name} was recomputed"
    assert len(list(parts_dir.glob("part-*.parquet"))) == 4
    assert pq.read_table(tmp_path / "out" / "embeddings.parquet").num_rows == 120
