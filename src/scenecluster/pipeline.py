"""Fine-tune on labelled sources, then cluster a target with that backbone: one config, one call.

``scenecluster pipeline`` and ``rayjobs/pipeline.py`` both build a :class:`scenecluster.config.PipelineConfig`
(which owns the coupling between the stages: image size, pooling, store and resources) and call
:func:`run_pipeline`, so the two cannot diverge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scenecluster.config import PipelineConfig

__all__ = ["PipelineConfig", "run_pipeline"]


def run_pipeline(cfg: PipelineConfig, *, overwrite: bool = False, echo=print) -> dict[str, Any]:
    """Run :func:`scenecluster.train.fit_backbone`, then :func:`scenecluster.job.run_cluster_job` on it.

    Returns
    -------
    dict
        ``{"backbone": str, "finetune": <OUT/metrics.json of the fine-tune>, "cluster": <cluster metrics>}``.
    """
    from scenecluster.job import run_cluster_job
    from scenecluster.train import fit_backbone  # lazy: Ray Train and torch only when fine-tuning

    backbone = Path(fit_backbone(cfg.finetune, echo=echo))
    metrics_file = backbone.parent / "metrics.json"
    finetune = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    cluster = run_cluster_job(cfg.cluster_job(backbone), overwrite=overwrite, echo=echo)
    return {"backbone": str(backbone), "finetune": finetune, "cluster": cluster}
