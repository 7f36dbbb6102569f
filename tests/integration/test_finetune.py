"""Fine-tuning on Ray Train: two CPU workers, a checkpoint, an injected failure and recovery, a resumed run,
and a backbone that the clustering job's Embedder loads; plus the errors raised before any worker starts.

Uses the tiny random DINOv2 (``tiny_model_dir``) at 28 px so each training run takes seconds; the Ray
start-up and the worker group dominate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from scenecluster.config import FinetuneConfig, load_config
from scenecluster.errors import InputError, OutputError
from scenecluster.models import ModelLoadError
from scenecluster.train import fit_backbone, train_loop_per_worker
from tests.conftest import copy_sample

pytestmark = pytest.mark.integration


def _cfg(tmp_path, sources, model, **overrides) -> FinetuneConfig:
    settings = {
        "sources": [str(s) for s in sources],
        "output": str(tmp_path / "out"),
        "feature.model": str(model),
        "feature.image_size": 28,
        "batch_size": 4,
        "epochs": 2,
        "workers": 2,
        "resources.device": "cpu",
        "lr": 1e-3,
        "warmup_steps": 1,
        "val_fraction": 0.2,
        "resources.torch_threads": 1,
        **overrides,
    }
    return load_config(None, settings, model=FinetuneConfig)


def _fail_once_after_step_4(config: dict) -> None:
    """The worker function with an injected fault, passed as ``fit_backbone(train_loop=...)``.

    Rank 0 raises once, right after reporting the first checkpoint at or beyond step 4 of a run that has not been
    restarted yet (``resumes == 0``), so the restarted worker group must resume from that checkpoint.
    """
    import ray.train

    report = ray.train.report

    def report_then_fail(metrics, checkpoint=None, **kwargs):
        report(metrics, checkpoint=checkpoint, **kwargs)
        if ray.train.get_context().get_world_rank() == 0 and metrics["resumes"] == 0 and metrics["step"] >= 4:
            raise RuntimeError(f"injected failure after the checkpoint at step {metrics['step']} (test only)")

    ray.train.report = report_then_fail  # this worker process only; train_loop_per_worker looks it up per call
    try:
        train_loop_per_worker(config)
    finally:
        ray.train.report = report


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two labelled sources (a shared backbone, two heads); the second has one corrupt image."""
    root = tmp_path_factory.mktemp("sources")
    a = copy_sample(root / "a", per_class=10, classes=3)
    b = copy_sample(root / "b", per_class=7, classes=2)
    cls = sorted(p for p in b.iterdir() if p.is_dir())[0]
    good = next(cls.glob("*.jpg")).read_bytes()
    (cls / "zz_truncated.jpg").write_bytes(good[: len(good) // 3])
    return a, b


def test_two_workers_recover_from_failure_then_resume(ray_cluster, tmp_path, sources, tiny_model_dir):
    # a: 3x10 images, 2 per class held out -> 24 train; b: 7 + 7 (+1 corrupt) images, 2 + 1 held out ->
    # 12 train. 36 train images split equally (Ray Train's equal split would drop a row of an odd total)
    # -> 18 per worker -> 4 micro-batches of 4 (+ a short one, counted not trained) -> 8 steps in 2 epochs.
    cfg = _cfg(tmp_path, sources, tiny_model_dir, max_failures=1)
    # pytest imports this file as a top-level module that Ray's workers cannot import: ship the wrapper by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    lines: list[str] = []
    try:
        backbone = fit_backbone(cfg, train_loop=_fail_once_after_step_4, echo=lines.append)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    # Two epochs of a few KiB: decoded once into the object store (cache_decoded "auto"), and the restarted worker
    # group trains from those blocks too.
    assert any("decoding 45 images once into the object store" in line for line in lines), lines
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["total_steps"] == 8
    assert metrics["step"] == 8 and metrics["epoch"] == 2
    # Rank 0 raised after the epoch-1 checkpoint (step 4); the restarted group resumed from it, not step 0.
    assert metrics["resumes"] == [{"epoch": 1, "step": 4}]
    assert [h["step"] for h in metrics["history"]] == [4, 8]
    assert all(0.0 <= h["val_accuracy"] <= 1.0 for h in metrics["history"])
    assert all(np.isfinite(h["train_loss"]) and h["images_per_s"] > 0 for h in metrics["history"])
    assert len(metrics["classes"]) == 2 and len(metrics["classes"][0]) == 3
    # The corrupt file is dropped and counted in each epoch (wherever it fell), never fatal.
    assert metrics["skipped_train"] + metrics["skipped_val"] == 1
    assert {p.name for p in backbone.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }

    # A rerun without resume is refused; with resume it continues the same run from its last checkpoint.
    with pytest.raises(OutputError, match="--resume"):
        fit_backbone(cfg)
    fit_backbone(_cfg(tmp_path, sources, tiny_model_dir, epochs=3, resume=True))
    resumed = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert resumed["resumes"] == [{"epoch": 1, "step": 4}, {"epoch": 2, "step": 8}]
    assert resumed["step"] == 12 and resumed["epoch"] == 3
    assert [h["step"] for h in resumed["history"]] == [4, 8, 12]

    # The clustering job's Embedder loads the fine-tuned folder as it is.
    from scenecluster.embed import Embedder

    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    emb = Embedder.for_model(str(backbone), device="cpu").embed(images)
    assert emb.shape == (3, 32) and np.isfinite(emb).all()


def test_checkpoints_in_s3_hold_the_backbone_that_later_jobs_load(
    ray_cluster, s3_server, tmp_path, sources, tiny_model_dir, monkeypatch
):
    """The route that ``finetune -o s3://...``'s refusal points to, where a fine-tune's local output would be lost
    with the machine (a KubeRay head pod): ``storage_path: s3://...`` on a store named by ``data.endpoint_url`` alone.
    Each checkpoint there holds ``backbone/``, which ``--model s3://<checkpoint>/backbone`` loads: the same weights
    as the exported folder."""
    from scenecluster.models import resolve_backbone

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("SCENECLUSTER_CACHE", str(tmp_path / "cache"))
    s3_server.create_bucket("ckpt")
    endpoint = s3_server.endpoint_url
    settings = {"workers": 1, "epochs": 1, "storage_path": "s3://ckpt/runs", "data.endpoint_url": endpoint}
    exported = fit_backbone(_cfg(tmp_path, [sources[0]], tiny_model_dir, **settings), echo=lambda line: None)

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    checkpoint = metrics["checkpoint"]  # bucket/key, as Ray Train's storage filesystem names it
    assert checkpoint.startswith("ckpt/runs/finetune/checkpoint_"), checkpoint
    in_store = resolve_backbone(f"s3://{checkpoint}/backbone", endpoint_url=endpoint)
    assert in_store.weights == resolve_backbone(exported).weights
    assert not (tmp_path / "out" / "finetune").exists()  # no checkpoint was written beside the export


def test_a_start_model_and_checkpoints_in_s3_reach_workers_that_hold_no_store_settings(
    ray_cluster, s3_server, tmp_path, sources, tiny_model_dir, monkeypatch
):
    """On a real cluster the store settings a user exported (``AWS_ENDPOINT_URL`` and keys) may be in the driver's
    environment only, so the Ray Train workers must fetch an ``s3://`` start model, and Ray Train must write the
    checkpoints to an ``s3://`` storage path, with the driver's settings, as the embedding actors do. Here the local
    Ray was started before the variables were set, so its workers do not have them either."""
    import ray

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SCENECLUSTER_CACHE", str(tmp_path / "cache"))

    @ray.remote(num_cpus=0)
    def worker_store_settings() -> list[str]:
        import os

        return sorted(k for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if k in os.environ)

    assert ray.get(worker_store_settings.remote()) == []  # the premise: only the driver holds them
    s3_server.create_bucket("start")
    s3_server.upload_folder(tiny_model_dir, "start", "models/tiny")
    settings = {"workers": 1, "epochs": 1, "storage_path": "s3://start/runs"}
    exported = fit_backbone(_cfg(tmp_path, [sources[0]], "s3://start/models/tiny", **settings), echo=lambda line: None)
    assert (exported / "model.safetensors").is_file()
    record = json.loads((tmp_path / "out" / "start_model.json").read_text())
    assert record["model"] == "s3://start/models/tiny"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["checkpoint"].startswith("start/runs/finetune/checkpoint_"), metrics["checkpoint"]
    assert metrics["storage_path"] == "s3://start/runs"
    secret = s3_server.env()["AWS_SECRET_ACCESS_KEY"].encode()
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert written == []  # the keys travel to the workers, never into the run's files


def test_tar_shards_in_class_folders_train_like_loose_files(ray_cluster, tmp_path, tiny_model_dir):
    # Two classes, each two shards of 4 images stored at the shard's top level (labelled by the shard's folder);
    # half the shards of each class held out -> 8 train / 8 val rows, counted before training -> 2 steps.
    loose = copy_sample(tmp_path / "loose", per_class=8, classes=2)
    src = tmp_path / "shards"
    for cls in sorted(p for p in loose.iterdir() if p.is_dir()):
        images = sorted(cls.glob("*.jpg"))
        (src / cls.name).mkdir(parents=True)
        for n, chunk in enumerate((images[:4], images[4:])):
            with tarfile.open(src / cls.name / f"shard-{n}.tar", "w") as tar:
                for image in chunk:
                    tar.add(image, arcname=image.name)
    fit_backbone(_cfg(tmp_path, [src], tiny_model_dir, workers=1, epochs=1, val_fraction=0.5))

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["classes"] == [sorted(p.name for p in loose.iterdir() if p.is_dir())]
    assert metrics["n_train"] == 8 and metrics["n_val"] == 8
    assert metrics["total_steps"] == 2 and metrics["step"] == 2
    assert metrics["skipped_train"] == 0 and metrics["skipped_val"] == 0
    assert 0.0 <= metrics["val_accuracy"] <= 1.0


def test_one_class_source_fails_before_workers(tmp_path, tiny_model_dir):
    src = copy_sample(tmp_path / "one", per_class=3, classes=1)
    with pytest.raises(InputError, match="at least two"):
        fit_backbone(_cfg(tmp_path, [src], tiny_model_dir))
    assert not (tmp_path / "out").exists()


def test_empty_class_folder_fails_before_workers(tmp_path, tiny_model_dir):
    src = copy_sample(tmp_path / "src", per_class=3, classes=2)
    (src / "empty_class").mkdir()
    with pytest.raises(InputError, match="empty_class"):
        fit_backbone(_cfg(tmp_path, [src], tiny_model_dir))


def test_unknown_model_fails_before_workers(tmp_path, sources):
    with pytest.raises(ModelLoadError, match="no-such-model"):
        fit_backbone(_cfg(tmp_path, [sources[0]], tmp_path / "no-such-model"))
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_a_fine_tune_on_its_own_local_ray_prints_its_epochs_and_no_warning_of_the_dashboard_it_runs_without(
    tmp_path, sources, tiny_model_dir
):
    # `scenecluster finetune` without a cluster starts a private Ray, without the dashboard; Ray Train's
    # PlacementGroupCleaner asked the dashboard's State API every second and warned at each failure, some 13 lines a
    # minute through a CPU fine-tune. Its own process, as a user runs it: the test session's Ray is not private.
    out = tmp_path / "out"
    args = [sources[0], "-o", out, "--model", tiny_model_dir, "--image-size", 28, "--batch-size", 4, "--epochs", 2]
    args += ["--workers", 2, "--device", "cpu", "--torch-threads", 1, "--num-cpus", 2]
    run = subprocess.run(
        [sys.executable, "-m", "scenecluster.cli", "finetune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed[-3000:]
    assert (out / "backbone" / "model.safetensors").exists()
    # rank 0's lines, once each (Ray Train's print() in a worker printed each line twice)
    assert printed.count("[finetune] epoch 1/2, step") == 1 and printed.count("[finetune] epoch 2/2, step") == 1
    assert "Failed to query Ray Train Controller" not in printed
    assert "requires_grad=True to a scalar" not in printed  # the loss is read as a number once detached


def test_pipeline_command_then_its_reruns_reuse_continue_or_refuse(
    ray_cluster, tmp_path, sources, tiny_model_dir, capsys
):
    """``scenecluster pipeline`` fine-tunes, then clusters the target with the new backbone. Run again, it resumes
    stage by stage: the finished fine-tune is reused (not trained again), one whose export was lost continues
    from its checkpoint, and one made with other settings is refused, naming the setting, unless ``--overwrite``."""
    import yaml

    from scenecluster.cli import main

    target = copy_sample(tmp_path / "target", per_class=6, classes=4)
    out = tmp_path / "pipe"
    # fmt: off
    command = ["pipeline", sources[0], "-t", target, "-o", out, "--labels", "folders", "--model", tiny_model_dir,
               "--image-size", "28", "--epochs", "1", "--workers", "1", "--batch-size", "4", "--device", "cpu",
               "--torch-threads", "1"]
    # fmt: on
    assert main([str(a) for a in command]) == 0
    printed = capsys.readouterr().out
    assert "finetune: step" in printed and "cluster:" in printed and "acc" in printed
    # the default self-training round needs clusters of 100 fitted scenes (2 x min_size 50); 24 skip it
    assert "round 1 skipped" in printed and not (out / "finetune-round1").exists()
    assert f"report: {out / 'cluster' / 'report.html'}" in printed
    backbone_weights = out / "finetune" / "backbone" / "model.safetensors"
    assert backbone_weights.is_file()
    used = yaml.safe_load((out / "cluster" / "config.yaml").read_text())
    assert used["embed"]["model"] == str(out / "finetune" / "backbone")
    first = json.loads((out / "cluster" / "metrics.json").read_text())
    assert first["n_embedded"] == 24 and "nmi" in first
    tuned = json.loads((out / "finetune" / "metrics.json").read_text())
    trained_at = backbone_weights.stat().st_mtime_ns

    assert main([str(a) for a in command]) == 0
    printed = capsys.readouterr().out
    assert "[finetune] reused the finished fine-tune" in printed and "[embed] reused" in printed, printed
    assert backbone_weights.stat().st_mtime_ns == trained_at
    assert json.loads((out / "cluster" / "metrics.json").read_text())["n_clusters"] == first["n_clusters"]

    # An interrupted run: the checkpoint is there, the export is not. The rerun continues it, not from scratch.
    (out / "finetune" / "metrics.json").unlink()
    shutil.rmtree(out / "finetune" / "backbone")
    assert main([str(a) for a in command]) == 0
    printed = capsys.readouterr().out
    assert "[finetune] continuing the interrupted fine-tune" in printed
    # The run had reached its last step: its last checkpoint is exported without a worker group (which would
    # have decoded the source and, on an autoscaling cluster, launched GPU nodes only to stop at once).
    reached = f"had reached step {tuned['step']} of {tuned['total_steps']}, epoch {tuned['epoch']} of 1, before"
    assert reached in printed, printed
    assert "train / " not in printed, printed
    continued = json.loads((out / "finetune" / "metrics.json").read_text())
    # no step ran again and no new checkpoint was made; the export was written again from the same one
    assert continued["step"] == tuned["step"] and continued["checkpoint"] == tuned["checkpoint"]
    assert backbone_weights.is_file()

    changed = [*command, "--lr", "5e-4", "--max-failures", "2"]  # max_failures: how it runs, not what
    assert main([str(a) for a in changed]) == 2
    error = capsys.readouterr().err
    assert "other settings (lr)" in error and "--overwrite" in error, error
    assert main([str(a) for a in [*changed, "--overwrite"]]) == 0
    retrained = json.loads((out / "finetune" / "metrics.json").read_text())
    assert retrained["resumes"] == [] and backbone_weights.stat().st_mtime_ns != trained_at
    # the retrained backbone is in the same folder with other weights: the target is embedded and fitted again,
    # not given the old weights' embeddings and clusters
    printed = capsys.readouterr().out
    assert "[embed] 24 embedded" in printed and "[fit] fitted" in printed, printed
    assert yaml.safe_load((out / "cluster" / "run.json").read_text())["weights"].startswith("sha256:")


def _pipeline_settings(tmp_path, sources, tiny_model_dir, target, **overrides) -> dict:
    """A pipeline of one quick fine-tune on the first source (tiny model, 28 px, one epoch) and a clustering of
    ``target``, both under ``tmp_path``."""
    return {
        "finetune.sources": [str(sources[0])],
        "finetune.output": str(tmp_path / "finetune"),
        "finetune.feature.model": str(tiny_model_dir),
        "finetune.feature.image_size": 28,
        "finetune.epochs": 1,
        "finetune.batch_size": 4,
        "finetune.resources.device": "cpu",
        "finetune.resources.torch_threads": 1,
        "cluster.data.input": str(target),
        "cluster.output": str(tmp_path / "cluster"),
        **overrides,
    }


def test_pipeline_self_trains_on_the_targets_pseudo_labels(ray_cluster, tmp_path, sources, tiny_model_dir):
    import pyarrow.parquet as pq
    import yaml

    from scenecluster.config import PipelineConfig
    from scenecluster.pipeline import run_pipeline

    target = copy_sample(tmp_path / "target", per_class=10, classes=4)
    settings = _pipeline_settings(
        tmp_path, sources, tiny_model_dir, target, **{"cluster.data.labels": "folders", "self_train.min_size": 2}
    )
    result = run_pipeline(load_config(None, settings, model=PipelineConfig))
    (round1,) = result["self_train"]
    (pseudo_file,) = (tmp_path / "finetune-round1").glob("pseudo_labels-*.parquet")
    pseudo = pq.read_table(pseudo_file)
    assert pseudo.num_rows == round1["pseudo_labels"]["kept"] > 0
    assert all(p.startswith(str(target)) for p in pseudo.column("path").to_pylist())
    assert 0 <= round1["pseudo_labels"]["purity_score_only"] <= 1  # recorded from the folders, chosen by nothing

    tuned = json.loads((tmp_path / "finetune-round1" / "metrics.json").read_text())
    assert tuned["pseudo_labels"] == [str(pseudo_file)]
    assert tuned["classes"][0] == ["AnnualCrop", "Forest", "HerbaceousVegetation"]  # the source's head ...
    assert tuned["classes"][1] == sorted(set(pseudo.column("label").to_pylist()))  # ... beside the target's
    assert tuned["n_train"] == 27 + pseudo.num_rows  # 90% of the source's 30, and every pseudo-labelled scene
    used = yaml.safe_load((tmp_path / "cluster-round1" / "config.yaml").read_text())
    assert used["embed"]["model"] == str(tmp_path / "finetune-round1" / "backbone")
    assert result["cluster_output"] == str(tmp_path / "cluster-round1")
    assert result["cluster"]["n_embedded"] == 40
    assert -1 <= round1["agreement_with_previous"] <= 1
    assert json.loads((tmp_path / "finetune-round1" / "round.json").read_text()) == round1

    # A rerun reuses the round's pseudo-labels as they are, and so the fine-tune trained on them.
    made_at = pseudo_file.stat().st_mtime_ns
    lines: list[str] = []
    again = run_pipeline(load_config(None, settings, model=PipelineConfig), echo=lines.append)
    assert again["self_train"][0]["pseudo_labels"] == {**round1["pseudo_labels"], "reused": True}
    assert pseudo_file.stat().st_mtime_ns == made_at
    assert sum("[finetune] reused the finished fine-tune" in line for line in lines) == 2, lines
    # Another self-training setting makes other pseudo-labels: the fine-tune trained on the old ones is refused,
    # naming them, instead of being reused for the new ones.
    keep_more = load_config(None, {**settings, "self_train.keep": 0.9}, model=PipelineConfig)
    with pytest.raises(OutputError, match=r"finetune-round1 holds a fine-tune with other settings \(pseudo_labels\)"):
        run_pipeline(keep_more, echo=lambda line: None)
    (replaced,) = (tmp_path / "finetune-round1").glob("pseudo_labels-*.parquet")
    assert replaced != pseudo_file and pq.read_table(replaced).num_rows > pseudo.num_rows
