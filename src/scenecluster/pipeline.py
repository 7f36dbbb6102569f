"""Fine-tune on labelled sources, cluster a target with that backbone, then self-train on the target.

``scenecluster pipeline`` and ``rayjobs/pipeline.py`` both build a :class:`scenecluster.config.PipelineConfig`
(which owns the coupling between the stages: image size, pooling, store and resources) and call
:func:`run_pipeline`, so the two cannot diverge.

The recipe is the one measured best in both transfer directions (docs/benchmarks.md, issue 10): fine-tune on the
sources, cluster, then ``self_train.rounds`` rounds (default one) that fine-tune the start model again on the
sources beside the target's pseudo-labels (:mod:`scenecluster.self_train`) and re-cluster (a target too small
for two pseudo-classes skips them, with a message). Round ``N`` writes
``<finetune.output>-roundN`` (with its ``pseudo_labels.parquet`` and ``round.json``) and
``<cluster.output>-roundN``; the last round's clustering is the result. A round whose clusters agree with the
previous round's at ``self_train.stop_agreement`` (ARI on the fit sample; no labels) ends the rounds early.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from scenecluster.config import FinetuneConfig, PipelineConfig

__all__ = ["PipelineConfig", "finetune_backbone", "run_pipeline"]


def finetune_backbone(cfg: FinetuneConfig, echo=print) -> tuple[Path, dict[str, Any]]:
    """:func:`scenecluster.train.fit_backbone`, and the metrics it wrote beside the backbone (with ``seconds``)."""
    from scenecluster.train import fit_backbone  # lazy: Ray Train and torch only when fine-tuning

    started = time.perf_counter()
    backbone = Path(fit_backbone(cfg, echo=echo))
    metrics_file = backbone.parent / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return backbone, {**metrics, "seconds": round(time.perf_counter() - started, 1)}


def run_pipeline(cfg: PipelineConfig, *, overwrite: bool = False, echo=print) -> dict[str, Any]:
    """Run :func:`scenecluster.train.fit_backbone`, then :func:`scenecluster.job.run_cluster_job` on it, then the
    self-training rounds.

    Returns
    -------
    dict
        ``{"backbone": str, "finetune": <metrics.json of the last fine-tune>, "cluster": <the last clustering's
        metrics>, "cluster_output": <its folder>, "self_train": [<one summary per round>]}``.
    """
    from scenecluster.job import run_cluster_job
    from scenecluster.outputs import atomic_write_text
    from scenecluster.self_train import TooFewPseudoClasses, clustering_agreement, prepare_round

    backbone, finetune = finetune_backbone(cfg.finetune, echo)
    job = cfg.cluster_job(backbone)
    cluster = run_cluster_job(job, overwrite=overwrite, echo=echo)
    rounds: list[dict[str, Any]] = []
    st, endpoint = cfg.self_train, cfg.cluster.data.endpoint_url
    for n in range(1, st.rounds + 1):
        agreement = rounds[-1]["agreement_with_previous"] if rounds else None
        if agreement is not None and agreement >= st.stop_agreement:
            echo(f"[self-train] round {n - 1} agreed with the one before at ARI {agreement:.3f}; stopping")
            break
        try:
            tune, pseudo = prepare_round(cfg, n, job.output)
        except TooFewPseudoClasses as exc:
            echo(f"[self-train] round {n} skipped: {exc}; the result is the clustering in {job.output}")
            break
        echo(
            f"[self-train] round {n}: {pseudo['kept']} of {pseudo['of']} fitted scenes as "
            f"{pseudo['pseudo_classes']} pseudo-classes"
        )
        previous = job.output
        backbone, finetune = finetune_backbone(tune, echo)
        job = cfg.cluster_job(backbone, round=n)
        cluster = run_cluster_job(job, overwrite=overwrite, echo=echo)
        summary = {
            "round": n,
            "pseudo_labels": pseudo,
            "backbone": str(backbone),
            "cluster_output": job.output,
            "n_clusters": cluster.get("n_clusters"),
            "agreement_with_previous": clustering_agreement(previous, job.output, endpoint_url=endpoint),
        }
        atomic_write_text(Path(tune.output) / "round.json", json.dumps(summary, indent=2) + "\n")
        rounds.append(summary)
    return {
        "backbone": str(backbone),
        "finetune": finetune,
        "cluster": cluster,
        "cluster_output": job.output,
        "self_train": rounds,
    }
