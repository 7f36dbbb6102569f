"""The Ray-free pieces of fine-tuning: labels, the step budget, the worker's settings and the checkpoint."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from scenecluster.config import FinetuneConfig, load_config
from scenecluster.errors import ConfigError
from scenecluster.ingest import attach_labels
from scenecluster.models import load_backbone, save_backbone
from scenecluster.train import decoded_bytes, plan_steps, should_cache
from scenecluster.train_loop import (
    BACKBONE_DIR,
    STATE_FILE,
    LoopConfig,
    TrainState,
    _restore,
    _training_state,
    epoch_line,
)
from scenecluster.train_recipe import SceneClassifier, param_groups, warmup_cosine


def _cfg(**overrides) -> FinetuneConfig:
    return load_config(None, {"sources": ["/s"], "output": "/o", **overrides}, model=FinetuneConfig)


def test_labels_come_from_the_row_path_and_unknown_ones_become_error_rows():
    batch = {
        "path": np.array(["/s/Forest/a.jpg", "/s/River/x.tar/b.jpg", "/s/x.tar/Lake/c.jpg", "/s/River/d.jpg"], object),
        "error": np.array(["", "", "", "decode failed"], dtype=object),
        "image": np.zeros((4, 2, 2, 3), dtype=np.uint8),
        "source": np.array(["/s/Forest/a.jpg", "/s/River/x.tar", "/s/x.tar", "/s/River/d.jpg"], dtype=object),
    }
    out = attach_labels(batch, classes=["Forest", "River"], source=1)
    assert out["label"][:2].tolist() == [0, 1] and out["label"][3] == 1
    assert out["error"].tolist()[:2] == ["", ""] and out["error"][3] == "decode failed"
    assert "'Lake' is not a class folder" in out["error"][2]
    assert out["source"].tolist() == [1, 1, 1, 1]


def test_step_plan_counts_whole_accumulation_groups_and_caps_at_max_steps():
    plan = plan_steps(_cfg(workers=2, batch_size=4, grad_accum=3, epochs=2), n_train=100, n_val=7)
    # 100 rows / 2 workers / 4 -> 12 micro-batches -> 4 steps per epoch
    assert (plan.micro_per_epoch, plan.total_steps, plan.n_val) == (12, 8, 7)
    assert plan_steps(_cfg(workers=2, batch_size=4, epochs=2, max_steps=5), n_train=100, n_val=0).total_steps == 5
    with pytest.raises(ConfigError, match="batch_size"):
        plan_steps(_cfg(workers=2, batch_size=32), n_train=40, n_val=0)


def _loop_config(**overrides) -> LoopConfig:
    settings = dict(
        model="m", pooling="cls", classes=[["a", "b", "c"], ["d", "e"]], mean=[0.5] * 3, std=[0.2] * 3, seed=0,
        freeze_blocks=0, lr=1e-3, weight_decay=0.05, layer_decay=0.9, warmup_steps=1, label_smoothing=0.1,
        batch_size=4, grad_accum=1, epochs=1, micro_per_epoch=2, total_steps=10, n_val=0,
    )  # fmt: skip
    return LoopConfig(**{**settings, **overrides})


def test_decoded_images_are_cached_only_when_a_later_epoch_gains_and_they_fit_a_quarter_of_the_store():
    n_bytes = decoded_bytes(8_400, 112)  # nwpu12 at 112 px
    assert n_bytes == 8_400 * 112 * 112 * 3
    store = 4 * n_bytes
    assert should_cache("auto", n_bytes, store, epochs=2)
    assert not should_cache("auto", n_bytes, store - 1, epochs=2)  # more than a quarter of the store
    assert not should_cache("auto", n_bytes, store, epochs=1)  # nothing to reuse
    assert should_cache("always", n_bytes, 0, epochs=1) and not should_cache("never", 1, store, epochs=10)


def test_loop_config_travels_as_a_plain_dict():
    cfg = _loop_config()
    assert LoopConfig(**asdict(cfg)) == cfg


def test_the_epoch_line_gives_the_scores_and_the_time_left_at_the_epochs_pace():
    cfg = _loop_config(epochs=6, total_steps=1237)
    metrics = {"epoch": 1, "step": 236, "train_loss": 1.1763, "val_accuracy": 0.9107, "images_per_s": 42.11}
    line = epoch_line({**metrics, "skipped_train": 0, "skipped_val": 0}, cfg, seconds_per_step=0.8)
    assert line == (
        "[finetune] epoch 1/6, step 236/1237: train loss 1.176, val accuracy 0.911, 42.1 images/s, about 13 min to go"
    )
    last = {**metrics, "epoch": 6, "step": 1237, "val_accuracy": None, "skipped_train": 2, "skipped_val": 1}
    assert epoch_line(last, cfg, seconds_per_step=0.8).endswith("val accuracy n/a, 42.1 images/s, 3 unreadable "
                                                                "images skipped")  # fmt: skip
    assert epoch_line({**last, "step": 1200}, cfg, seconds_per_step=0.8).endswith("about 30 s to go")


def test_the_start_models_keys_travel_to_workers_but_never_show(monkeypatch):
    # Ray records what it hands to workers (Ray Train's loop config, Ray Data's operator arguments such as the
    # embedding actors' FeatureSpec) as str() of each non-JSON value in its run state and export events, so a key
    # must not be a plain string there; the workers unwrap it
    from scenecluster.features import FeatureSpec, revealed_keys, store_access

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    access = store_access("s3://bucket/backbone", "http://127.0.0.1:1")
    cfg = _loop_config(**access)
    spec = FeatureSpec("m", 8, "cls", 28, "s3://bucket/backbone", 8, 12, 32, (0.5,) * 3, (0.2,) * 3, **access)
    for carrier in (cfg, spec):
        assert revealed_keys(carrier.credentials)["aws_secret_access_key"] == "very-secret-value"
        shown = json.dumps(asdict(carrier), default=str) + repr(carrier)
        assert "very-secret-value" not in shown and "AKIDTEST" not in shown
    assert store_access("/local/backbone", None) == {"endpoint_url": None}  # no keys for a local model


class _Checkpoint:
    """What _restore uses of a ray.train.Checkpoint."""

    def __init__(self, folder) -> None:
        self.folder = folder

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.folder)


def _state(model_dir, cfg: LoopConfig, seed: int) -> TrainState:
    torch.manual_seed(seed)
    core = SceneClassifier(load_backbone(model_dir), [len(c) for c in cfg.classes])
    optimizer = torch.optim.AdamW(param_groups(core, cfg.lr, cfg.weight_decay, cfg.layer_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.total_steps))
    return TrainState(model=core, core=core, optimizer=optimizer, scheduler=scheduler)


def test_checkpoint_is_a_backbone_folder_plus_plain_state_that_restores_everything(tmp_path, tiny_model_dir):
    cfg = _loop_config()
    trained = _state(tiny_model_dir, cfg, seed=0)
    sum(logits.sum() for logits in trained.core(torch.randn(2, 3, 28, 28))).backward()
    trained.optimizer.step()
    trained.scheduler.step()
    trained.epoch, trained.step, trained.history = 1, 1, [{"epoch": 1, "step": 1, "val_accuracy": None}]
    save_backbone(trained.core.backbone, tmp_path / BACKBONE_DIR)
    torch.save(_training_state(trained, cfg), tmp_path / STATE_FILE)
    torch.load(tmp_path / STATE_FILE, weights_only=True)  # no pickled objects in it

    restored = _state(tiny_model_dir, _loop_config(total_steps=20), seed=1)
    _restore(restored, _Checkpoint(tmp_path), _loop_config(total_steps=20))
    for (name, a), b in zip(trained.core.state_dict().items(), restored.core.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert restored.optimizer.state_dict()["state"].keys() == trained.optimizer.state_dict()["state"].keys()
    assert restored.scheduler.last_epoch == 1
    assert (restored.epoch, restored.step, restored.history) == (1, 1, trained.history)
    assert restored.resumes == [{"epoch": 1, "step": 1}]


def test_a_fine_tune_whose_start_model_was_rewritten_in_place_is_not_reused(tmp_path, tiny_model_dir):
    """``config.yaml`` names the start model only; ``start_model.json`` holds its weights, so a finished fine-tune
    from a folder since rewritten with other weights counts as made with other settings (and is trained again)."""
    import json
    import shutil

    from transformers import Dinov2Model

    from scenecluster.config import dump_config
    from scenecluster.models import resolve_backbone, tiny_dinov2_config
    from scenecluster.outputs import atomic_write_text
    from scenecluster.pipeline import previous_finetune
    from scenecluster.train import START_MODEL_FILE, _claim_output, _Inputs

    start = tmp_path / "start"
    shutil.copytree(tiny_model_dir, start)
    cfg = load_config(
        None, {"sources": ["/s"], "output": str(tmp_path / "out"), "feature.model": str(start)}, model=FinetuneConfig
    )
    inputs = _Inputs(listings=[], classes=[], backbone=resolve_backbone(start), labels=[])
    out, _ = _claim_output(cfg, print, inputs)  # what fit_backbone writes before its workers start
    assert json.loads((out / START_MODEL_FILE).read_text())["weights"].startswith("sha256:")
    assert (out / "config.yaml").read_text() == dump_config(cfg)
    # ... and what its export writes at the end
    save_backbone(load_backbone(tiny_model_dir), out / BACKBONE_DIR)
    atomic_write_text(out / "metrics.json", json.dumps({"backbone": str(out / BACKBONE_DIR), "step": 3}))
    assert previous_finetune(cfg).changed == []  # a rerun reuses it

    torch.manual_seed(7)
    save_backbone(Dinov2Model(tiny_dinov2_config()), start)  # the start model converted or saved over again
    assert previous_finetune(cfg).changed == ["feature.model (its weights)"]

    (out / START_MODEL_FILE).unlink()  # a fine-tune made before the file existed: nothing tells, it is reused
    assert previous_finetune(cfg).changed == []


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_a_cpu_worker_autocasts_to_bfloat16_only_where_the_cpu_computes_it(cpu_bf16):
    # resources.cpu_dtype resolved on the worker (_this_worker): bf16 autocast there (1.5x a float32 step on a Zen 4
    # core), the weights staying float32; else the float32 step as before
    from scenecluster.train_loop import _Worker

    worker = _Worker(rank=0, world=1, device=torch.device("cpu"), cpu_bf16=cpu_bf16)
    layer = torch.nn.Linear(8, 4)
    with worker.autocast():
        out = layer(torch.randn(2, 8))
    assert worker.use_amp == cpu_bf16 and out.dtype == (torch.bfloat16 if cpu_bf16 else torch.float32)
    assert layer.weight.dtype == torch.float32
