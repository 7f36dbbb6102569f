"""The ``scenecluster`` command line: a thin layer over the Python API.

Each subcommand builds the validated config, calls one public function and returns an exit code. Errors a
user can act on print one line and exit 2; nothing below this layer prints tracebacks for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from scenecluster.config import FeatureConfig, config_flags
from scenecluster.errors import ConfigError, SceneClusterError


def _flags(model_name: str, prefix: str = "", only: tuple[str, ...] | None = None) -> list:
    """The flags of a config model, read off its fields (see :func:`scenecluster.config.config_flags`); with
    ``only``, those of these dotted settings."""
    from scenecluster import config

    flags = config_flags(getattr(config, model_name), prefix)
    return flags if only is None else [opt for opt in flags if opt.dotted in only]


# (flag, dotted setting, type, help) of ``cluster`` and ``demo``, generated from ClusterJobConfig's fields.
CLUSTER_FLAGS = [(f.flag, f.dotted, f.type, f.help) for f in _flags("ClusterJobConfig")]


def _add_config_options(
    p: argparse.ArgumentParser,
    model_name: str,
    prefix: str = "",
    *,
    with_config: bool = True,
    only: tuple[str, ...] | None = None,
):
    """``--config``, ``--set`` and one flag per flagged setting of the config model ``model_name`` (of the dotted
    settings ``only`` names, when given)."""
    if with_config:
        p.add_argument("--config", metavar="YAML", help="a config file; flags and --set override it")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override any setting by its dotted name, e.g. --set cluster.tol=1e-4 (repeatable)",
        )
    for opt in _flags(model_name, prefix, only):
        text = f"{opt.help} [{opt.dotted}]"
        if opt.choices:
            text += f"; one of {', '.join(map(str, opt.choices))}"
        if opt.is_switch:
            p.add_argument(opt.flag, dest=_dest(opt.dotted), action="store_true", default=None, help=text)
        else:
            metavar = {int: "N", float: "X"}.get(opt.type, "VALUE")
            p.add_argument(opt.flag, dest=_dest(opt.dotted), type=opt.type, default=None, metavar=metavar, help=text)


def _dest(dotted: str) -> str:
    return "opt__" + dotted.replace(".", "__")


def command_flags(command: str) -> dict[str, str]:
    """``{dotted setting: flag}`` for the setting flags ``scenecluster COMMAND`` really registers.

    Read off the built parser, so ``docs/configuration.md``'s flag column shows what each command takes: a
    combined config (pipeline, benchmark) offers one stage's flags, not every flagged field of its sections.
    """
    import re

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags: dict[str, str] = {}
    for action in subcommands.choices[command]._actions:
        if not action.option_strings:
            continue
        if action.dest.startswith("opt__"):
            flags[action.dest.removeprefix("opt__").replace("__", ".")] = action.option_strings[0]
        elif named := re.search(r"\[([\w.]+)\]$", action.help or ""):  # a command's own flag, e.g. --epochs
            flags[named.group(1)] = action.option_strings[0]
    return flags


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse an output folder that holds another run (its outputs are replaced)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scenecluster",
        description="Cluster unlabelled remote-sensing scenes: DINOv2 features, UMAP, a Dirichlet-process "
        "Gaussian mixture, on Ray. The number of clusters is inferred.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, including Ray's messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_cluster_commands(sub)
    _add_assign_command(sub)
    _add_finetune_commands(sub)
    _add_doctor_command(sub)
    _add_benchmark_command(sub)
    _add_report_commands(sub)
    return parser


def _add_assign_command(sub) -> None:
    a = sub.add_parser(
        "assign",
        help="assign new scenes to the clusters of a finished run, flagging the novel ones",
        description="Embed the images under INPUT with the saved run's feature, project them with its fitted "
        "projection and assign them to its clusters (same ids); scenes less likely than its calibrated "
        "threshold are flagged novel. Writes embeddings, assignments and metrics.json to --output.",
    )
    a.add_argument("input", metavar="INPUT", help="local folder or s3://bucket/prefix of new scenes")
    a.add_argument("--clustering", required=True, metavar="RUN", help="output folder of a clustering run")
    a.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder for the new scenes")
    _add_overwrite(a)
    _add_config_options(a, "AssignJobConfig")


def _add_cluster_commands(sub) -> None:
    c = sub.add_parser(
        "cluster",
        help="embed, project and cluster a folder or S3 prefix of scene images",
        description="Embed the images under INPUT with DINOv2 on Ray Data, project them with UMAP, "
        "cluster them with a variational DP-GMM, and write embeddings.parquet, assignments.parquet, "
        "metrics.json, skipped.jsonl (unreadable scenes and why) and report.html to --output.",
    )
    c.add_argument(
        "input", metavar="INPUT", help="local folder or s3://bucket/prefix of JPEG/PNG/TIFF/JPEG 2000/WebP images"
    )
    c.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created; a rerun resumes)")
    _add_overwrite(c)
    _add_config_options(c, "ClusterJobConfig")

    d = sub.add_parser(
        "demo",
        help="run the whole job on the small EuroSAT sample shipped with the package",
        description="Cluster the 300-image EuroSAT sample the package ships (30 per class, "
        "MIT licence) on a local Ray and score it against its folders. Defaults differ from "
        "'cluster' only in --image-size 112 --labels folders.",
    )
    d.add_argument(
        "-o", "--output", default="scenecluster-demo", metavar="OUT", help="output folder (default ./scenecluster-demo)"
    )
    _add_overwrite(d)
    _add_config_options(d, "ClusterJobConfig")


def _add_finetune_commands(sub) -> None:
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
    f.add_argument("--use-gpu", action="store_true", help="train on GPUs (same as --device cuda)")
    _add_config_options(f, "FinetuneConfig")

    pl = sub.add_parser(
        "pipeline",
        help="fine-tune on labelled sources, then cluster a target with that backbone",
        description="Run 'finetune' on the SOURCEs into OUT/finetune, then 'cluster' on --target "
        "into OUT/cluster with --model OUT/finetune/backbone; then, per self-training round N (default one), "
        "fine-tune on the SOURCEs beside the target's pseudo-labels into OUT/finetune-roundN and cluster "
        "again into OUT/cluster-roundN. Prints each stage's summary; the last clustering is the result.",
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
    _add_overwrite(pl)
    pl.add_argument("--use-gpu", action="store_true", help="train on GPUs (same as --device cuda)")
    _add_config_options(pl, "FinetuneConfig", "finetune.")
    _add_config_options(pl, "SelfTrainConfig", "self_train.", with_config=False)


def _add_benchmark_command(sub) -> None:
    """``scenecluster benchmark``: the protocol of :mod:`scenecluster.benchmark`."""
    b = sub.add_parser(
        "benchmark",
        help="fine-tune on labelled sources, cluster a labelled target over seeds, score it beside references",
        description="Fine-tune on --source (or reuse --backbone), cluster --target once per seed with the "
        "tuned and the untuned backbone, and with k-means told the true number of classes; write "
        "OUT/benchmark.json and OUT/benchmark.md (mean and spread of acc, NMI, ARI and the cluster count).",
    )
    b.add_argument("--source", default="", metavar="SRC[,SRC2]", help="labelled source(s) to fine-tune on")
    b.add_argument("--target", required=True, metavar="TGT", help="labelled <class>/<image> target to cluster")
    b.add_argument("--backbone", metavar="CKPT", help="a fine-tuned backbone folder to reuse (no fine-tuning)")
    b.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    b.add_argument("--seeds", type=int, nargs="+", metavar="N", help="seeds (default 0 1 2)")
    b.add_argument(
        "--sample-seed",
        type=int,
        metavar="N",
        help="draw the target's --sample once with this seed for every seed: one embedding per backbone "
        "(default: each seed draws its own) [sample_seed]",
    )
    b.add_argument("--no-references", action="store_true", help="skip the untuned backbone and the oracle-K k-means")
    b.add_argument("--epochs", type=int, metavar="N", help="fine-tuning epochs [finetune.epochs]")
    _add_overwrite(b)
    _add_config_options(b, "ClusterJobConfig", "cluster.")
    _add_config_options(b, "SelfTrainConfig", "self_train.", with_config=False)
    b.set_defaults(run_fn=_cmd_benchmark)


def _file_in(output: str, name: str) -> str:
    """Where the file ``name`` in a run's ``output`` is, as the user would open it: an absolute path on this
    machine, a URI in a store."""
    from scenecluster.data import absolute_location

    return f"{absolute_location(output).rstrip('/')}/{name}"


def _under(output: str, name: str) -> str:
    """A stage's folder ``name`` inside ``output``. A URI is joined as text: ``pathlib`` would turn ``s3://bucket/x``
    into ``s3:/bucket/x``, and the stage's own check could then no longer tell that it was given a store."""
    return f"{output.rstrip('/')}/{name}" if "://" in output else str(Path(output) / name)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    """Build the same :class:`BenchmarkConfig` that ``rayjobs/benchmark.py`` reads, then run it."""
    from scenecluster.benchmark import markdown_table, run_benchmark
    from scenecluster.config import BenchmarkConfig, load_config

    sources = [s for s in args.source.split(",") if s]
    if not sources and not args.backbone:
        raise ConfigError("benchmark needs --source to fine-tune on, or --backbone to reuse")
    out = args.output
    overrides: dict = {"output": out, "cluster.data.input": args.target, "cluster.output": _under(out, "runs")}
    if args.backbone:
        overrides["backbone"] = args.backbone
    else:
        overrides.update({"finetune.sources": sources, "finetune.output": _under(out, "finetune")})
        if args.epochs is not None:
            overrides["finetune.epochs"] = args.epochs
    if args.seeds:
        overrides["seeds"] = args.seeds
    if args.sample_seed is not None:
        overrides["sample_seed"] = args.sample_seed
    if args.no_references:
        overrides["references"] = False
    overrides.update(_overrides(args, "ClusterJobConfig", "cluster."))
    overrides.update(_flag_values(args, "SelfTrainConfig", "self_train."))
    if not args.backbone:  # the fine-tune owns the feature the target is embedded with (as in the pipeline)
        for name in ("model", "image_size", "pooling"):
            if f"cluster.embed.{name}" in overrides:
                overrides[f"finetune.feature.{name}"] = overrides.pop(f"cluster.embed.{name}")
    cfg = load_config(args.config, overrides, model=BenchmarkConfig)
    result = run_benchmark(cfg, overwrite=args.overwrite)
    print(markdown_table(result), end="")
    print(f"results: {_file_in(cfg.output, 'benchmark.json')}")
    return 0


def _local_file(text: str) -> str:
    """argparse type of a file written on this machine (``~`` expanded, ``file://`` read as its path): a page or a
    table is one local file, and ``pathlib`` would write ``s3://bucket/x`` to a folder named ``s3:``."""
    from scenecluster.data import local_path

    try:
        return os.path.expanduser(local_path(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: this file is written here (copy it to a store afterwards)") from None


def _positive_seconds(text: str) -> float:
    """argparse type of a wait in seconds: a positive number (argparse prints the one-line usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    """argparse type of a count: a whole number of at least 1 (argparse prints the one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


# The pixel settings doctor takes as flags: those of FeatureConfig.PIXEL_SETTINGS that have one (_flags keeps only
# flagged settings), so a pixel setting given a flag later is one of doctor's too.
_DOCTOR_PIXEL_FLAGS = FeatureConfig.PIXEL_SETTINGS


def _add_doctor_command(sub) -> None:
    """``scenecluster doctor``: the checks of :mod:`scenecluster.doctor`, printed as a table."""
    d = sub.add_parser(
        "doctor",
        help="check a Ray cluster, the S3 prefixes and the model before a long run",
        description="Check that Ray answers at ADDR with this client's version, list the nodes it sees, run a "
        "probe on one node of each node type (package at this version; CUDA torch and cuML on GPU nodes), and "
        "check the input readable (its first scene decoded as the job would, with the bands shown and what marks "
        "its footprint), the output writable (with this shell's AWS_* credentials) and the model "
        "loadable. Prints a table; exits 1 when a check failed.",
    )
    d.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster (host:6379, ray://host:10001, or auto: the one `ray start` began on this machine; default "
        "RAY_ADDRESS, else a private Ray started here, as a job without --ray-address starts one)",
    )
    # INPUT and -o as `cluster INPUT -o OUT` takes them, so a user checks a run by changing only the command
    d.add_argument("input_arg", nargs="?", metavar="INPUT", help="the same as --input")
    d.add_argument("--input", metavar="URI", help="input folder or s3://bucket/prefix that a job will read")
    d.add_argument("-o", "--output", metavar="URI", help="output folder or s3://bucket/prefix that a job will write")
    d.add_argument("--model", metavar="MODEL", help="Hugging Face id or folder of the backbone a job will load")
    d.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint for non-AWS stores (else AWS_ENDPOINT_URL)")
    # how the input's first scene is decoded and described, as a run with these flags would see it
    _add_config_options(d, "FeatureConfig", with_config=False, only=_DOCTOR_PIXEL_FLAGS)
    d.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=120.0,
        metavar="S",
        help="seconds to wait for the probe tasks on the nodes (default 120)",
    )
    d.set_defaults(run_fn=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from scenecluster.config import load_config
    from scenecluster.doctor import DoctorOptions, exit_code, format_table, run_doctor

    if args.input_arg and args.input and args.input_arg != args.input:
        raise ConfigError(f"give the input once: INPUT {args.input_arg!r} and --input {args.input!r} differ")
    pixel_settings = _flag_values(args, "FeatureConfig", only=_DOCTOR_PIXEL_FLAGS)
    checks = run_doctor(
        DoctorOptions(
            address=args.address,
            input=args.input or args.input_arg,
            output=args.output,
            model=args.model,
            endpoint_url=args.endpoint_url,
            timeout=args.timeout,
            pixels=load_config(None, pixel_settings, model=FeatureConfig).pixel_spec(),
        )
    )
    print(format_table(checks))
    return exit_code(checks)


def _add_report_commands(sub) -> None:
    """``scenecluster report RUN`` and ``scenecluster compare RUN RUN ...``: read finished runs, run nothing."""
    r = sub.add_parser(
        "report",
        help="regenerate the HTML report of a finished run from its output folder",
        description="Read a finished run's folder (config, metrics, assignments, the fitted sample, embeddings) "
        "and write its self-contained report.html; thumbnails are read from the run's input.",
    )
    r.add_argument("run", metavar="RUN", help="output folder of a clustering or assign run (local or s3://)")
    r.add_argument(
        "-o", "--output", type=_local_file, metavar="FILE", help="where to write the page (default RUN/report.html)"
    )
    r.add_argument("--input", metavar="URI", help="read the scenes' thumbnails from here (default: the run's input)")
    r.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint for non-AWS stores (else AWS_ENDPOINT_URL)")
    r.add_argument(
        "--thumbnail-reads",
        type=_positive_int,
        metavar="N",
        help="thumbnails read at once (default: the run's report.thumbnail_reads, 16)",
    )
    r.set_defaults(run_fn=_cmd_report)
    c = sub.add_parser(
        "compare",
        help="set several runs' settings and scores side by side (a Markdown table)",
        description="Read each RUN's config.yaml and metrics.json and print one Markdown table, a column per run; "
        "rows whose values differ are marked.",
    )
    c.add_argument("runs", nargs="+", metavar="RUN", help="output folders of finished runs")
    c.add_argument(
        "-o", "--output", type=_local_file, metavar="FILE", help="write the table here instead of printing it"
    )
    c.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint for non-AWS stores (else AWS_ENDPOINT_URL)")
    c.set_defaults(run_fn=_cmd_compare)


def _cmd_report(args: argparse.Namespace) -> int:
    from scenecluster.report import write_report_file

    def warn(line: str) -> None:
        print(line, file=sys.stderr)

    written = write_report_file(
        args.run,
        args.output,
        input_uri=args.input,
        endpoint_url=args.endpoint_url,
        echo=warn,
        threads=args.thumbnail_reads,
    )
    print(f"report: {written}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from scenecluster.outputs import atomic_write_text
    from scenecluster.report_compare import compare_runs

    table = compare_runs(args.runs, endpoint_url=args.endpoint_url)
    if args.output:
        atomic_write_text(args.output, table)
        print(f"comparison: {args.output}")
    else:
        print(table, end="")
    return 0


def sample_data_dir() -> Path:
    """The EuroSAT sample shipped inside the package."""
    return Path(str(resources.files("scenecluster") / "sample_data" / "eurosat30"))


def _flag_values(
    args: argparse.Namespace, model_name: str, prefix: str = "", only: tuple[str, ...] | None = None
) -> dict:
    """Dotted settings from the flags of ``model_name`` (of ``only``, when given) that were given."""
    values = {opt.dotted: getattr(args, _dest(opt.dotted)) for opt in _flags(model_name, prefix, only)}
    return {k: v for k, v in values.items() if v is not None}


def _overrides(args: argparse.Namespace, model_name: str, prefix: str = "") -> dict:
    """Dotted settings from the flags that were given, then from ``--set``."""
    from scenecluster.config import parse_override

    values = _flag_values(args, model_name, prefix)
    if getattr(args, "use_gpu", False):
        values[f"{prefix}resources.device"] = "cuda"
    for text in getattr(args, "overrides", []):
        key, value = parse_override(text)
        values[key] = value
    return values


# The demo's settings: 112 px (EuroSAT tiles are 64 px, and 112 px is 5x faster than 224 on a CPU), scored against
# the sample's folders. The feature is otherwise the job's default: the model's own feature layer (layer 8 of the
# offline stand-in, whose config names it) and the CLS + mean patch token.
DEMO_DEFAULTS = {"data.labels": "folders", "embed.image_size": 112}


def _cmd_cluster(args: argparse.Namespace, *, input_uri: str, defaults: dict | None = None) -> int:
    from scenecluster.config import load_config
    from scenecluster.manifest import check_run_paths

    overrides = {"data.input": input_uri, "output": args.output, **(defaults or {})}
    overrides.update(_overrides(args, "ClusterJobConfig"))
    cfg = load_config(args.config, overrides)
    check_run_paths(cfg.data.input, cfg.output, endpoint_url=cfg.data.endpoint_url)  # before the job's imports
    from scenecluster.job import run_cluster_job

    metrics = run_cluster_job(cfg, overwrite=args.overwrite)
    print(_cluster_summary(metrics))
    print(f"report: {_file_in(cfg.output, 'report.html')}")
    return 0


def _cluster_summary(metrics: dict, prefix: str = "") -> str:
    summary = f"{prefix}{metrics['n_clusters']} clusters from {metrics['n_embedded']} images"
    summary += f" ({metrics['n_skipped']} skipped)" if not prefix else ""
    if "acc" in metrics:
        summary += f"; acc {metrics['acc']:.3f}, NMI {metrics['nmi']:.3f}, ARI {metrics['ari']:.3f}"
    return summary


def _finetune_summary(ft: dict, backbone: str) -> str:
    acc = ft.get("val_accuracy")
    accuracy = "n/a" if acc is None else f"{acc:.3f}"
    return f"finetune: step {ft.get('step')}, epoch {ft.get('epoch')}, val accuracy {accuracy}; backbone {backbone}"


def _cmd_finetune(args: argparse.Namespace) -> int:
    from scenecluster.config import FinetuneConfig, load_config

    overrides = {"sources": list(args.sources), "output": args.output, **_overrides(args, "FinetuneConfig")}
    cfg = load_config(args.config, overrides, model=FinetuneConfig)
    from scenecluster.train import fit_backbone  # torch and Ray Train: after the settings are known to be valid

    backbone = fit_backbone(cfg)
    print(f"backbone: {backbone}")
    print(f"metrics: {backbone.parent / 'metrics.json'}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    """Build the same :class:`PipelineConfig` that ``rayjobs/pipeline.py`` reads, then run it."""
    from scenecluster.config import PipelineConfig, load_config
    from scenecluster.pipeline import run_pipeline

    overrides = {
        "finetune.sources": list(args.sources),
        "finetune.output": _under(args.output, "finetune"),
        "cluster.data.input": args.target,
        "cluster.data.labels": args.labels,
        "cluster.output": _under(args.output, "cluster"),
        **_overrides(args, "FinetuneConfig", "finetune."),
        **_flag_values(args, "SelfTrainConfig", "self_train."),
    }
    result = run_pipeline(load_config(args.config, overrides, model=PipelineConfig), overwrite=args.overwrite)
    for r in result["self_train"]:
        pseudo = r["pseudo_labels"]
        agreement = r["agreement_with_previous"]
        print(
            f"self-train round {r['round']}: {pseudo['kept']} pseudo-labelled scenes in {pseudo['pseudo_classes']} "
            f"classes; {r['n_clusters']} clusters, agreement with the round before "
            f"{'n/a' if agreement is None else f'{agreement:.3f}'}"
        )
    print(_finetune_summary(result["finetune"], result["backbone"]))
    print(_cluster_summary(result["cluster"], prefix="cluster: "))
    print(f"report: {_file_in(result['cluster_output'], 'report.html')}")
    return 0


def _cmd_assign(args: argparse.Namespace) -> int:
    from scenecluster.config import AssignJobConfig, load_config
    from scenecluster.manifest import check_run_paths

    overrides = {"data.input": args.input, "output": args.output, "clustering": args.clustering}
    overrides.update(_overrides(args, "AssignJobConfig"))
    cfg = load_config(args.config, overrides, model=AssignJobConfig)
    check_run_paths(cfg.data.input, cfg.output, endpoint_url=cfg.data.endpoint_url)  # before the job's imports
    from scenecluster.job import run_assign_job

    metrics = run_assign_job(cfg, overwrite=args.overwrite)
    print(f"{_cluster_summary(metrics)}; {metrics['n_novel']} novel")
    return 0


def _run_command(args: argparse.Namespace) -> int:
    if getattr(args, "run_fn", None):  # subcommands that name their own handler
        return args.run_fn(args)
    if args.command == "assign":
        return _cmd_assign(args)
    if args.command == "cluster":
        return _cmd_cluster(args, input_uri=args.input)
    if args.command == "demo":
        return _cmd_cluster(args, input_uri=str(sample_data_dir()), defaults=DEMO_DEFAULTS)
    if args.command == "finetune":
        return _cmd_finetune(args)
    return _cmd_pipeline(args)


def line_buffered_output() -> None:
    """Write each printed line at once, to a pipe too (``| tee``, ``nohup``, a CI or job log): a stage's line
    (``[embed] ...``) is how a user sees a run of hours progress, and a pipe's block buffer held every line until the
    run ended, so a Ctrl-C meant for the fit found the run already finishing. (stderr is line-buffered already.)"""
    if hasattr(sys.stdout, "reconfigure"):  # a text stream, not a replacement without the method
        sys.stdout.reconfigure(line_buffering=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    line_buffered_output()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return _run_command(args)
    except SceneClusterError as exc:
        print(f"scenecluster: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A fine-tune continues only when asked (Ray Train would otherwise refuse the run folder); every other
        # command, the pipeline's fine-tunes included, resumes when rerun as it was.
        how = "rerun it with --resume to continue" if args.command == "finetune" else "rerun the same command to resume"
        print(f"scenecluster: interrupted; {how}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
