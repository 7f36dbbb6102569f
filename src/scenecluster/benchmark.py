"""The benchmark protocol: the method on a labelled target, beside the references a reader asks for.

Per backbone (the fine-tuned one; with ``references``, also the untuned one it started from) the target is
embedded once, then clustered once per seed: a seed moves the fit sample, UMAP and the mixture's
initialisation, and a rerun with another seed refits on the embeddings already written (see
:func:`scenecluster.job.run_identity`). With ``cluster.data.sample`` the seed also draws the target sample, so
each seed embeds its own (the spread then includes the sampling); ``sample_seed`` draws one sample for all.
With ``references``, k-means told the true number of classes runs on the same features: an oracle on K,
which shows how much of the gap is the number of clusters. With ``self_train.rounds`` (default one, as in the
pipeline), round ``N``'s backbone ``self-trained-N`` is fine-tuned on the sources beside pseudo-labels from
the previous backbone's first-seed DP-GMM run (:mod:`scenecluster.self_train`), and measured like the
others; every round runs (the pipeline's early stop is for production; a benchmark measures each round).
Labels are read only to score: every run is the plain clustering job (:func:`scenecluster.job.run_cluster_job`),
so the figures are what ``scenecluster cluster`` gives.

Writes ``OUT/benchmark.json`` (every run's scores and stage seconds, the summary, the fine-tune's metrics)
and ``OUT/benchmark.md`` (the summary as a Markdown table: mean and standard deviation over the seeds).
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from scenecluster import __version__
from scenecluster.config import BenchmarkConfig, ClusterJobConfig
from scenecluster.outputs import OutputFolder

__all__ = ["METHOD", "ORACLE", "markdown_table", "run_benchmark", "run_folder", "summarise"]

METHOD = "dpgmm"  # the method as the job runs it: K inferred, no labels
ORACLE = "kmeans-true-k"  # the reference told the number of classes
SCORES = ("acc", "nmi", "ari", "n_clusters")


def run_benchmark(cfg: BenchmarkConfig, *, overwrite: bool = False, echo: Callable = print) -> dict[str, Any]:
    """Fine-tune (or reuse ``cfg.backbone``), cluster the target per backbone, method and seed; score each.

    Returns the ``benchmark.json`` content: ``runs`` (one dict per run), ``summary`` (mean/std per backbone and
    method), ``finetune`` (its metrics, when it ran), ``self_train`` (one summary per round) and ``seconds``.
    """
    from scenecluster.manifest import check_run_paths

    start = time.perf_counter()
    # the target and the output are checked now, not after the fine-tune
    check_run_paths(cfg.cluster.data.input, cfg.output, endpoint_url=cfg.cluster.data.endpoint_url)
    backbones, finetune = _backbones(cfg, echo, overwrite)
    queue = list(backbones.items())
    runs: list[dict[str, Any]] = []
    self_trained: list[dict[str, Any]] = []
    while queue:
        name, model = queue.pop(0)
        job = cfg.cluster.model_copy(deep=True)
        job.embed.model = model
        n_classes = None
        for method in (METHOD, ORACLE) if cfg.references else (METHOD,):
            for seed in cfg.seeds:
                echo(f"[benchmark] {name} backbone, {method}, seed {seed}")
                job.output = run_folder(cfg, name, seed)
                metrics = _run_variant(
                    job, method, seed, n_classes, sample_seed=cfg.sample_seed, overwrite=overwrite, echo=echo
                )
                n_classes = metrics["n_classes"]
                runs.append({"backbone": name, "model": model, "method": method, "seed": seed, **_scores(metrics)})
                if method == METHOD and seed == cfg.seeds[0] and _seeds_next_round(cfg, name, self_trained):
                    # now, before the next seed reuses the run folder: its fit sample gives the pseudo-labels
                    trained = _self_train_round(cfg, len(self_trained) + 1, job.output, echo, overwrite)
                    if trained is not None:
                        self_trained.append(trained)
                        queue.insert(0, (_self_trained_name(trained["round"]), trained["backbone"]))
    result = {
        "target": cfg.cluster.data.input,
        "sources": list(cfg.finetune.sources) if cfg.finetune is not None else [],
        "backbone": backbones.get("tuned"),
        "seeds": list(cfg.seeds),
        "scenecluster_version": __version__,
        "finetune": finetune,
        "self_train": self_trained,
        "runs": runs,
        "summary": summarise(runs),
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = OutputFolder(cfg.output, endpoint_url=cfg.cluster.data.endpoint_url)
    out.write_text("benchmark.json", json.dumps(result, indent=2, default=str) + "\n")
    out.write_text("benchmark.md", markdown_table(result))
    return result


def _backbones(cfg: BenchmarkConfig, echo: Callable, overwrite: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """``{"tuned": folder}`` (fine-tuned here or given), and the untuned model with ``references``."""
    finetune: dict[str, Any] = {}
    if cfg.backbone is not None:
        tuned = cfg.backbone
    else:
        from scenecluster.pipeline import finetune_backbone

        folder, finetune = finetune_backbone(cfg.finetune, echo, overwrite=overwrite)
        tuned = str(folder)
    backbones = {"tuned": tuned}
    if cfg.references:
        backbones["untuned"] = cfg.untuned_model
    return backbones, finetune


def run_folder(cfg: BenchmarkConfig, backbone: str, seed: int) -> str:
    """Where backbone ``backbone``'s runs of ``seed`` go: ``OUT/<backbone>``, shared by every seed and method so
    that the target is embedded once per backbone; ``OUT/<backbone>/seed-<seed>`` when each seed draws its own
    target sample (``data.sample`` without ``sample_seed``), since those are other scenes, that is, other runs."""
    folder = posixpath.join(cfg.output.rstrip("/"), backbone)
    if cfg.cluster.data.sample is not None and cfg.sample_seed is None:
        return posixpath.join(folder, f"seed-{seed}")
    return folder


def _self_trained_name(round_n: int) -> str:
    return f"self-trained-{round_n}"


def _seeds_next_round(cfg: BenchmarkConfig, name: str, self_trained: list[dict[str, Any]]) -> bool:
    """Whether backbone ``name``'s first run gives the next round's pseudo-labels: the newest backbone (the tuned
    one before any round) while rounds remain. A skipped round leaves no newer backbone, so none follows it."""
    newest = _self_trained_name(len(self_trained)) if self_trained else "tuned"
    return name == newest and len(self_trained) < cfg.self_train.rounds


def _self_train_round(
    cfg: BenchmarkConfig, round_n: int, run_output: str, echo: Callable, overwrite: bool
) -> dict[str, Any] | None:
    """Pseudo-labels from ``run_output`` (a DP-GMM run of the previous round's backbone), then the round's
    fine-tune; its summary, or None when the target gives fewer than two pseudo-classes."""
    from scenecluster.pipeline import finetune_backbone
    from scenecluster.self_train import TooFewPseudoClasses, prepare_round

    try:
        tune, pseudo = prepare_round(cfg.pipeline(), round_n, run_output)
    except TooFewPseudoClasses as exc:
        echo(f"[benchmark] self-training round {round_n} skipped: {exc}")
        return None
    backbone, metrics = finetune_backbone(tune, echo, overwrite=overwrite)
    return {
        "round": round_n,
        "pseudo_labels": pseudo,
        "backbone": str(backbone),
        "val_accuracy": metrics.get("val_accuracy"),
        "seconds": metrics["seconds"],
    }


def variant_config(
    job: ClusterJobConfig, method: str, seed: int, n_classes: int | None, sample_seed: int | None = None
) -> ClusterJobConfig:
    """The clustering job of one (method, seed): ``seed`` moves UMAP and the mixture, and ``data.seed`` too
    (the target sample and the fit sample) unless ``sample_seed`` holds it, so that every seed reuses one
    embedded sample instead of embedding its own."""
    cfg = job.model_copy(deep=True)
    cfg.data.seed = seed if sample_seed is None else sample_seed
    cfg.cluster.random_state = seed
    cfg.reduce.random_state = seed
    if method == ORACLE:
        cfg.cluster.method = "kmeans"
        cfg.cluster.n_components = int(n_classes)
    return cfg


def _run_variant(
    job: ClusterJobConfig,
    method: str,
    seed: int,
    n_classes: int | None,
    *,
    sample_seed: int | None,
    overwrite: bool,
    echo: Callable,
) -> dict[str, Any]:
    """One clustering of the backbone's run folder; the first embeds, the others refit on its embeddings."""
    from scenecluster.job import run_cluster_job

    cfg = variant_config(job, method, seed, n_classes, sample_seed)
    return run_cluster_job(cfg, overwrite=overwrite, echo=echo)


def _scores(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "acc": metrics["acc"],
        "nmi": metrics["nmi"],
        "ari": metrics["ari"],
        "n_clusters": metrics["n_clusters"],
        "n_classes": metrics["n_classes"],
        "n_scenes": metrics["n_embedded"],
        "stage_seconds": metrics["stage_seconds"],
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (population) standard deviation of every score per (backbone, method), in run order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["backbone"], run["method"]), []).append(run)
    rows = []
    for (backbone, method), members in groups.items():
        row: dict[str, Any] = {"backbone": backbone, "method": method, "n_seeds": len(members)}
        row["n_classes"] = members[0]["n_classes"]
        for key in SCORES:
            values = np.array([m[key] for m in members], dtype=float)
            row[key] = {"mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4)}
        seconds: dict[str, float] = {}
        for m in members:
            for stage, s in m["stage_seconds"].items():
                seconds[stage] = round(seconds.get(stage, 0.0) + s, 1)
        row["stage_seconds"] = seconds
        rows.append(row)
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    """The summary as a Markdown table, headed by what was run."""
    sources = ", ".join(result["sources"])
    backbone = f"backbone fine-tuned on {sources}" if sources else f"reused backbone {result['backbone']}"
    lines = [
        f"Target `{result['target']}`; {backbone}; seeds {result['seeds']}; "
        f"scenecluster {result['scenecluster_version']}; {result['seconds']:.0f} s in all.",
        "",
        "| backbone | method | clusters (truth) | acc | NMI | ARI |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in ("acc", "nmi", "ari")]
        k = row["n_clusters"]
        clusters = f"{k['mean']:.1f} ± {k['std']:.1f} ({row['n_classes']})"
        lines.append(f"| {row['backbone']} | {row['method']} | {clusters} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
