"""One validated configuration for a clustering run.

Built from defaults, then a YAML file, then dotted overrides (``embed.batch_size=64``), and validated on
load so a bad setting fails before any Ray task starts, with a message naming the setting. The same dotted
names serve the CLI, Ray Tune's search space and the resolved ``config.yaml`` written beside the outputs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scenecluster.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the scenes are and how to read them."""

    input: str = Field(description="local folder or s3://bucket/prefix holding the images")
    labels: Literal["none", "folders"] = Field(
        "none", description="'folders' reads <class>/<image> as ground truth, for scoring"
    )
    endpoint_url: str | None = Field(None, description="S3 endpoint for non-AWS stores (else AWS_ENDPOINT_URL)")
    sample: int | None = Field(None, ge=1, description="cluster a seeded random sample of this many images")
    seed: int = Field(0, description="seed of the sample")


class EmbedConfig(_Section):
    """The feature extractor and how it runs on Ray Data."""

    model: str = Field("facebook/dinov2-small", description="Hugging Face id or local folder of a DINOv2 model")
    layer: int = Field(-1, description="hidden layer whose CLS token is the feature (1-based; -1 = last)")
    pooling: Literal["cls", "cls+mean"] = Field("cls", description="CLS token, or CLS + mean patch token")
    image_size: int = Field(224, ge=14, le=1036, description="images are resized to this square size (px)")
    batch_size: int = Field(32, ge=1, description="images per model batch")
    num_actors: int = Field(1, ge=1, description="embedding actors (model replicas)")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per actor (0 = CPU; 'auto' device sets 1 on GPU clusters)")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per actor (default: CPUs / actors)")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="where JPEGs are decoded: 'gpu' (nvJPEG in the actor), 'cpu' (PIL tasks); auto = GPU on GPUs",
    )
    chunk_size: int = Field(4096, ge=1, description="listing entries per resumable embeddings part")


class ReduceConfig(_Section):
    """UMAP settings (shared by cuML and umap-learn)."""

    n_components: int = Field(5, ge=1, description="dimension of the projection the mixture is fitted on")
    n_neighbors: int = Field(30, ge=2, description="UMAP neighbourhood size")
    min_dist: float = Field(0.0, ge=0.0, description="UMAP minimum distance")
    metric: str = Field("cosine", description="UMAP input metric")
    random_state: int | None = Field(0, description="seed (None: faster, not reproducible)")
    backend: Literal["auto", "umap-learn", "cuml"] = Field("auto", description="cuML on GPU when available")


class ClusterConfig(_Section):
    """Variational Dirichlet-process Gaussian mixture settings."""

    n_components: int = Field(50, ge=1, description="truncation level: the most clusters the mixture may use")
    weight_concentration_prior: float | None = Field(
        None, gt=0, description="DP concentration (None: 1 / n_components)"
    )
    covariance_prior_scale: float = Field(
        2.0, gt=0, description="Wishart prior covariance = this x the data's covariance; larger merges more"
    )
    covariance_type: Literal["full", "diag"] = Field("full", description="covariance of each component")
    max_iter: int = Field(500, ge=1, description="most variational iterations")
    tol: float = Field(1e-3, gt=0, description="stop when the lower bound gains less than this")
    n_init: int = Field(1, ge=1, description="restarts; the best lower bound is kept")
    init_params: Literal["kmeans", "kmeans++", "random"] = Field("kmeans", description="initialisation")
    random_state: int | None = Field(0, description="seed")


class ReportConfig(_Section):
    """What the HTML report shows."""

    thumbnails_per_cluster: int = Field(8, ge=1, le=64, description="scenes shown per cluster")
    scatter_points: int = Field(20000, ge=100, description="most points in the 2-D scatter")


class ResourcesConfig(_Section):
    """Where the work runs."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses GPUs when the cluster has them")
    ray_address: str | None = Field(None, description="Ray cluster to join (else RAY_ADDRESS, else a local Ray)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray started by the job")


class ClusterJobConfig(_Section):
    """Everything a clustering run needs."""

    output: str = Field(description="folder for the outputs")
    data: DataConfig
    embed: EmbedConfig = EmbedConfig()
    reduce: ReduceConfig = ReduceConfig()
    cluster: ClusterConfig = ClusterConfig()
    report: ReportConfig = ReportConfig()
    resources: ResourcesConfig = ResourcesConfig()


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``dotted == "a.b"``, creating sections as needed."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"embed.batch_size=64"`` -> ``("embed.batch_size", 64)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string; a number is meant
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip(), value


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    model: type[BaseModel] = ClusterJobConfig,
) -> Any:
    """Defaults -> YAML file -> dotted overrides, validated.

    Raises
    ------
    ConfigError
        Naming the file or the dotted setting at fault.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        tree = loaded
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source=str(path) if path else None)) from None


def describe_validation_error(exc: ValidationError, source: str | None = None) -> str:
    """One line per bad setting, with its dotted name."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"setting {loc}: {err['msg']}")
    where = f" in {source!r}" if source else ""
    return f"invalid configuration{where}: " + "; ".join(parts)


def dump_config(cfg: BaseModel) -> str:
    """The resolved configuration as YAML, for ``OUT/config.yaml``."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class FinetuneConfig(_Section):
    """Fine-tuning a DINOv2 backbone on labelled source scenes (``scenecluster finetune``).

    Flat rather than sectioned: it configures one stage, and every field is also a CLI flag. Several
    ``sources`` train jointly: one shared backbone, one linear head per source.
    """

    sources: list[str] = Field(min_length=1, description="labelled <class>/<image> folders or s3:// prefixes")
    output: str = Field(description="local folder for backbone/, metrics.json and (by default) checkpoints")
    storage_path: str | None = Field(
        None, description="where Ray Train keeps checkpoints (default: output; may be s3://bucket/prefix)"
    )
    name: str = Field("finetune", description="Ray Train run name; a rerun with the same name can resume")
    model: str = Field("facebook/dinov2-small", description="Hugging Face id or local folder to start from")
    pooling: Literal["cls", "cls+mean"] = Field("cls", description="head input: CLS token, or CLS + mean patch")
    epochs: int = Field(10, ge=1, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (bounds a CPU run)")
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel replicas)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses GPUs when the cluster has them")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per worker (default: a share "
        "of the node that leaves room for Ray Data's decode tasks)",
    )
    image_size: int = Field(224, ge=14, le=1036, description="images are resized to this square size (px)")
    batch_size: int = Field(32, ge=1, description="images per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate of the heads and last block (AdamW)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases, norms, tokens)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the cosine decay")
    layer_decay: float = Field(1.0, gt=0, le=1, description="layer-wise LR decay: block i gets lr x decay^(L-i)")
    freeze_blocks: int = Field(0, ge=0, description="freeze the patch embedding and the first N blocks (0: none)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="stratified held-out share of each class")
    seed: int = Field(0, description="seed of the split, the augmentations and the heads' init")
    sample: int | None = Field(None, ge=2, description="use a seeded random sample of this many images per source")
    resume: bool = Field(False, description="continue the run of the same name and storage path")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1: no limit)")
    endpoint_url: str | None = Field(None, description="S3 endpoint for non-AWS stores (else AWS_ENDPOINT_URL)")
    ray_address: str | None = Field(None, description="Ray cluster to join (else RAY_ADDRESS, else a local Ray)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray started by the job")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker (default: CPUs / workers)")
    fail_after_step: int | None = Field(
        None,
        ge=1,
        description="TEST ONLY: rank 0 raises once, after the first "
        "checkpoint at or beyond this step, to exercise recovery",
    )
