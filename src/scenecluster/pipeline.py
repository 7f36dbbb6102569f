"""Fine-tune on labelled sources, cluster a target with that backbone, then self-train on the target.

``scenecluster pipeline`` and ``rayjobs/pipeline.py`` both build a :class:`scenecluster.config.PipelineConfig`
(which owns the coupling between the stages: image size, pooling, store and resources) and call
:func:`run_pipeline`, so the two cannot diverge.

The recipe is the one measured best in both transfer directions (docs/benchmarks.md, issue 10): fine-tune on the
sources, cluster, then ``self_train.rounds`` rounds (default one) that fine-tune the start model again on the
sources beside the target's pseudo-labels (:mod:`scenecluster.self_train`) and re-cluster (a target too small
for two pseudo-classes skips them, with a message). Round ``N`` writes
``<finetune.output>-roundN`` (with its ``pseudo_labels-<key>.parquet`` and ``round.json``) and
``<cluster.output>-roundN``; the last round's clustering is the result. A round whose clusters agree with the
previous round's at ``self_train.stop_agreement`` (ARI on the fit sample; no labels) ends the rounds early.

A rerun of the same command resumes, stage by stage: a fine-tune that finished with the same settings is reused
as it is, an interrupted one continues from its last checkpoint (as ``--resume`` would), and the clustering job
reuses its finished parts and fit. A fine-tune folder made with other settings, or from a start model whose
weights have changed since (``start_model.json``), is refused, naming them, unless ``overwrite`` (then it starts
again from scratch); a round's pseudo-labels are named by the clustering and settings that made them, so a round
fine-tuned on others counts as made with other settings. A backbone trained again into the same folder has other
weights, which the clustering's feature identity holds, so the target is embedded again rather than reused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scenecluster.config import FinetuneConfig, PipelineConfig, dump_config
from scenecluster.errors import OutputError

__all__ = ["PipelineConfig", "PreviousFinetune", "finetune_backbone", "previous_finetune", "run_pipeline"]

#: Settings that change how a fine-tune runs, not what it learns: a rerun may change them and still reuse it.
RUN_ONLY_SETTINGS = ("resume", "max_failures", "cache_decoded", "cpus_per_worker", "resources.", "data.endpoint_url")


@dataclass(frozen=True)
class PreviousFinetune:
    """A fine-tune already under a stage's output: its ``metrics.json`` once it finished (else None) and the
    settings (dotted names) in which its ``config.yaml`` differs from this run's."""

    metrics: dict[str, Any] | None
    changed: list[str]


def previous_finetune(cfg: FinetuneConfig) -> PreviousFinetune | None:
    """What ``cfg.output`` already holds of a fine-tune: None when nothing (no checkpoint, no exported backbone)."""
    from scenecluster.train import run_exists

    out = Path(cfg.output).expanduser().resolve()
    metrics_file = out / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    if metrics is not None and not (Path(metrics["backbone"]) / "config.json").is_file():
        metrics = None  # the exported backbone is gone: continue the run (or start it) to export it again
    if metrics is None and not run_exists(cfg):
        return None
    saved_file = out / "config.yaml"
    if not saved_file.is_file():
        return PreviousFinetune(metrics, ["(no config.yaml beside it)"])
    saved = _flatten(yaml.safe_load(saved_file.read_text()) or {})
    wanted = _flatten(yaml.safe_load(dump_config(cfg)))  # as fit_backbone wrote it, so values compare alike
    changed = [
        key
        for key in sorted(saved.keys() | wanted.keys())
        if saved.get(key) != wanted.get(key) and not key.startswith(RUN_ONLY_SETTINGS)
    ]
    if "feature.model" not in changed and _start_weights_changed(out, cfg.feature.model, cfg.data.endpoint_url):
        changed.append("feature.model (its weights)")
    return PreviousFinetune(metrics, changed)


def _start_weights_changed(out: Path, model: str, endpoint_url: str | None) -> bool:
    """Whether ``model`` now holds other weights than the fine-tune in ``out`` started from.

    ``config.yaml`` names the start model only: a local folder rewritten in place (another conversion, a
    checkpoint saved over it) would let the old fine-tune be reused. False when it cannot tell: a run made before
    ``start_model.json`` was written, or a start model that no longer resolves (a finished fine-tune does not
    need it; continuing one reports the model's own error).
    """
    from scenecluster.models import ModelLoadError, resolve_backbone
    from scenecluster.train import START_MODEL_FILE

    start_file = out / START_MODEL_FILE
    if not start_file.is_file():
        return False
    started_from = json.loads(start_file.read_text()).get("weights")
    try:
        return started_from != resolve_backbone(model, endpoint_url=endpoint_url).weights
    except ModelLoadError:
        return False


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finetune_backbone(cfg: FinetuneConfig, echo=print, *, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """:func:`scenecluster.train.fit_backbone`, and the metrics it wrote beside the backbone (with ``seconds``).

    What ``cfg.output`` already holds is used (:func:`previous_finetune`): a finished fine-tune with the same
    settings is returned as it is (``"reused": True`` in its metrics), an interrupted one continues from its last
    checkpoint. One with other settings raises :class:`OutputError` naming them, or with ``overwrite`` is
    deleted and trained again.
    """
    from scenecluster.train import discard_run, fit_backbone  # lazy: Ray Train and torch only when fine-tuning

    previous = previous_finetune(cfg)
    if previous is not None and previous.changed:
        if not overwrite:
            raise OutputError(
                f"{cfg.output} holds a fine-tune with other settings ({', '.join(previous.changed[:6])}); "
                "rerun with --overwrite to train it again, or choose another --output"
            )
        echo(f"[finetune] {cfg.output} held a fine-tune with other settings; training again (--overwrite)")
        discard_run(cfg)
    elif previous is not None and previous.metrics is not None:
        echo(f"[finetune] reused the finished fine-tune in {cfg.output} (step {previous.metrics.get('step')})")
        return Path(previous.metrics["backbone"]), {**previous.metrics, "reused": True}
    elif previous is not None and not cfg.resume:
        echo(f"[finetune] continuing the interrupted fine-tune in {cfg.output} from its last checkpoint")
        cfg = cfg.model_copy(update={"resume": True})
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
    from scenecluster.manifest import check_run_paths
    from scenecluster.outputs import atomic_write_text

    # the target and the clustering's output are checked now, not after a fine-tune of hours (and before the
    # stages' modules are imported, which takes seconds)
    check_run_paths(cfg.cluster.data.input, cfg.cluster.output, endpoint_url=cfg.cluster.data.endpoint_url)
    from scenecluster.job import run_cluster_job
    from scenecluster.self_train import TooFewPseudoClasses, clustering_agreement, prepare_round

    backbone, finetune = finetune_backbone(cfg.finetune, echo, overwrite=overwrite)
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
        backbone, finetune = finetune_backbone(tune, echo, overwrite=overwrite)
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
