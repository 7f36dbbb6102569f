"""Each job's whole configuration, built from the shared sections (:mod:`scenecluster.config.sections`): a
clustering run, an assignment with a saved clustering, a fine-tune, a Tune search, the pipeline (fine-tune, then
cluster, then self-training rounds) and the benchmark (the pipeline beside its references).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from scenecluster.config.sections import (
    ClusterConfig,
    DataConfig,
    EmbedConfig,
    FeatureConfig,
    ReadConfig,
    ReduceConfig,
    ReportConfig,
    ResourcesConfig,
    ScaleConfig,
    _Section,
    flag,
    local_folder,
    storage_location,
)

# a self-training round's pseudo-labels, in its fine-tune's output, named by what made them
# (scenecluster.self_train.pseudo_label_key)
PSEUDO_LABELS_FILE = "pseudo_labels-{key}.parquet"


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
