"""Fine-tune on labelled sources, then cluster a target with that backbone: one config, one call.

The command line's ``scenecluster pipeline`` builds the same two stages from flags; this module gives Ray
job entrypoints (``rayjobs/pipeline.py``) and tests a Python entry with one validated config, so a
submitted job is described by a YAML file rather than by a command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from scenecluster.config import ClusterJobConfig, FinetuneConfig


class PipelineConfig(BaseModel):
    """``finetune`` (a :class:`FinetuneConfig`) then ``cluster`` (a :class:`ClusterJobConfig`).

    ``cluster.embed.model`` is replaced by the fine-tuned backbone folder, so it need not be set.
    """

    model_config = ConfigDict(extra="forbid")

    finetune: FinetuneConfig
    cluster: ClusterJobConfig


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
    cluster_cfg = cfg.cluster.model_copy(deep=True)
    cluster_cfg.embed.model = str(backbone)
    cluster = run_cluster_job(cluster_cfg, overwrite=overwrite, echo=echo)
    return {"backbone": str(backbone), "finetune": finetune, "cluster": cluster}
