"""The Ray-free pieces of fine-tuning: labels, the step budget and the worker's settings."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from scenecluster.config import FinetuneConfig, load_config
from scenecluster.errors import ConfigError
from scenecluster.train import LoopConfig, _attach_labels, plan_steps


def _cfg(**overrides) -> FinetuneConfig:
    return load_config(None, {"sources": ["/s"], "output": "/o", **overrides}, model=FinetuneConfig)


def test_labels_come_from_the_row_path_and_unknown_ones_become_error_rows():
    batch = {
        "path": np.array(["/s/Forest/a.jpg", "/s/River/x.tar/b.jpg", "/s/x.tar/Lake/c.jpg", "/s/River/d.jpg"], object),
        "error": np.array(["", "", "", "decode failed"], dtype=object),
        "image": np.zeros((4, 2, 2, 3), dtype=np.uint8),
        "source": np.array(["/s/Forest/a.jpg", "/s/River/x.tar", "/s/x.tar", "/s/River/d.jpg"], dtype=object),
    }
    out = _attach_labels(batch, classes=["Forest", "River"], source=1)
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


def test_loop_config_travels_as_a_plain_dict():
    cfg = LoopConfig(
        model="m", pooling="cls", classes=[["a", "b"]], mean=[0.5] * 3, std=[0.2] * 3, seed=0, freeze_blocks=0,
        lr=1e-4, weight_decay=0.05, layer_decay=1.0, warmup_steps=0, label_smoothing=0.1, batch_size=4,
        grad_accum=1, epochs=1, micro_per_epoch=2, total_steps=2, n_val=0,
    )  # fmt: skip
    assert LoopConfig(**asdict(cfg)) == cfg
