"""The seams every stage shares: one config tree (and its documentation), one resource decision, one feature
spec, and the registries a new projection or clusterer plugs into."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scenecluster.cli import build_parser
from scenecluster.config import (
    ClusterConfig,
    ClusterJobConfig,
    PipelineConfig,
    ResourcesConfig,
    ScaleConfig,
    config_flags,
    configuration_markdown,
    load_config,
)
from scenecluster.devices import ClusterInventory, decide
from scenecluster.errors import ConfigError
from scenecluster.features import resolve_feature_spec
from scenecluster.models import weights_fingerprint

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_doc_is_current():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == configuration_markdown(), "run: python -m scenecluster.config > docs/configuration.md"


def test_flag_help_shows_the_real_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cluster", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 5) [reduce.n_components]" in text  # --umap-dims, once documented as 10
    flags = {f.flag: f.dotted for f in config_flags(ClusterJobConfig)}
    assert flags["--umap-dims"] == "reduce.n_components" and flags["--torch-threads"] == "resources.torch_threads"


def test_finetune_flags_reach_their_sections():
    args = ["finetune", "src", "-o", "out", "--image-size", "112", "--device", "cpu", "--lr", "0.001", "--resume"]
    from scenecluster.cli import _overrides

    values = _overrides(build_parser().parse_args(args), "FinetuneConfig")
    assert values == {"feature.image_size": 112, "resources.device": "cpu", "lr": 0.001, "resume": True}


def _pipeline(**cluster_embed):
    tree = {
        "finetune": {
            "sources": ["s"],
            "output": "f",
            "feature": {"image_size": 112, "pooling": "cls+mean"},
            "data": {"endpoint_url": "http://127.0.0.1:9"},
            "resources": {"device": "cpu"},
        },
        "cluster": {"output": "c", "data": {"input": "t"}, "embed": cluster_embed},
    }
    return load_config(None, {k: v for k, v in _flatten(tree).items()}, model=PipelineConfig)


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, dict):
            out[f"{prefix}{key}"] = value
    return out


def test_pipeline_config_owns_the_coupling(tmp_path):
    cfg = _pipeline()
    embed = cfg.cluster.embed
    assert (embed.image_size, embed.pooling) == (112, "cls+mean")
    assert cfg.cluster.data.endpoint_url == "http://127.0.0.1:9" and cfg.cluster.resources.device == "cpu"
    job = cfg.cluster_job(tmp_path / "backbone")
    assert job.embed.model == str(tmp_path / "backbone") and cfg.cluster.embed.model != job.embed.model
    with pytest.raises(ConfigError, match=r"cluster\.embed\.image_size"):
        _pipeline(image_size=224)
    assert _pipeline(image_size=112).cluster.embed.image_size == 112  # the same value may be repeated


def test_resources_are_decided_once():
    cpu_node = ClusterInventory(num_cpus=8, num_gpus=0, cpus_per_node=8)
    gpu_node = ClusterInventory(num_cpus=16, num_gpus=2, cpus_per_node=16)
    cpu = decide("auto", cpu_node, actors=2)
    assert (cpu.use_gpu, cpu.device, cpu.dtype, cpu.gpus_per_actor, cpu.torch_threads) == (
        False,
        "cpu",
        "auto",  # resources.cpu_dtype: each actor resolves it on its own node's CPU
        0,
        4,
    )
    assert decide("auto", cpu_node, cpu_dtype="float32").dtype == "float32"
    assert not cpu.decode_on_gpu and cpu.umap_backend("auto") in ("umap-learn", "cuml")
    gpu = decide("auto", gpu_node, actors=2, torch_threads=3, cpu_dtype="float32")  # GPUs run bf16 regardless
    assert (gpu.use_gpu, gpu.device, gpu.dtype, gpu.gpus_per_actor, gpu.torch_threads) == (
        True,
        "cuda",
        "bfloat16",
        1.0,
        3,
    )
    assert gpu.decode_on_gpu and not decide("auto", gpu_node, decode="cpu").decode_on_gpu
    assert not decide("cpu", gpu_node).use_gpu
    with pytest.raises(ConfigError, match="resources.device"):
        decide("cuda", cpu_node)
    assert ResourcesConfig().device == "auto"


def test_the_assignment_pool_grows_to_the_cluster_unless_its_size_is_set():
    from scenecluster.stages import assign_pool_sizes

    cpu = decide("auto", ClusterInventory(num_cpus=48, num_gpus=0, cpus_per_node=16))
    gpu = decide("auto", ClusterInventory(num_cpus=64, num_gpus=8, cpus_per_node=16))
    assert assign_pool_sizes(cpu, 0, on_gpu=False) == (1, 48)  # one actor per CPU: each transforms on one thread
    assert assign_pool_sizes(gpu, 0, on_gpu=True) == (1, 8)  # one per GPU, where the projection runs there
    assert assign_pool_sizes(gpu, 0, on_gpu=False) == (1, 64)  # umap-learn on a GPU cluster: CPU actors
    assert assign_pool_sizes(cpu, 3, on_gpu=False) == (3, 3)  # scale.assign_actors fixes it
    assert assign_pool_sizes(cpu, 0, on_gpu=False, at_least=64) == (1, 64)  # the embedding stage may grow a cluster
    half = decide("auto", ClusterInventory(num_cpus=64, num_gpus=8, cpus_per_node=16), actor_gpus=0.5)
    assert assign_pool_sizes(half, 0, on_gpu=True) == (1, 16)
    assert ScaleConfig().assign_actors == 0


@pytest.mark.parametrize(
    ("backend", "device", "expected"), [("cuml", "auto", True), ("umap-learn", "auto", False), ("cuml", "cpu", False)]
)
def test_assignment_actors_hold_gpus_only_for_a_projection_that_runs_on_them(tmp_path, backend, device, expected):
    import json

    from scenecluster.fitted import FORMAT
    from scenecluster.outputs import OutputFolder
    from scenecluster.stages import assigns_on_gpu

    run = OutputFolder(str(tmp_path))
    run.write_text("clustering/clustering.json", json.dumps({"format": FORMAT, "reduce": {"backend": backend}}))
    resources = decide(device, ClusterInventory(num_cpus=64, num_gpus=8, cpus_per_node=16))
    assert assigns_on_gpu(resources, run) is expected


def test_assignment_parts_of_another_or_refitted_clustering_are_dropped(tmp_path):
    """Assignment parts are kept by name for a rerun to resume; another saved clustering, or the same one fitted
    again, must assign them again (``assign`` into the same output after its ``--clustering`` changed)."""
    import json

    from scenecluster.fitted import FORMAT
    from scenecluster.outputs import OutputFolder
    from scenecluster.stages import ASSIGNMENTS, forget_other_assignments

    out = OutputFolder(str(tmp_path / "assigned"))
    first, second = OutputFolder(str(tmp_path / "run1")), OutputFolder(str(tmp_path / "run2"))
    for run in (first, second):
        run.write_text("clustering/clustering.json", json.dumps({"format": FORMAT, "fit_key": run.uri}))

    def assigned() -> list[str]:
        return sorted(out.list(ASSIGNMENTS))

    forget_other_assignments(out, first)
    out.write_bytes(f"{ASSIGNMENTS}/part-000000-a.parquet", b"")
    forget_other_assignments(out, first)  # a rerun with the same clustering resumes: the part stays
    assert assigned() == ["part-000000-a.parquet"]
    forget_other_assignments(out, second)
    assert assigned() == []
    out.write_bytes(f"{ASSIGNMENTS}/part-000000-a.parquet", b"")
    second.write_text("clustering/clustering.json", json.dumps({"format": FORMAT, "fit_key": "refitted"}))
    forget_other_assignments(out, second)
    assert assigned() == []


def test_assign_names_the_feature_settings_its_saved_clustering_overrules():
    """``assign`` embeds with the saved run's feature: a ``--model`` or ``--layer`` given to it is replaced, and
    said to be (it was replaced silently); defaults, and values equal to the saved ones, are not mentioned."""
    from scenecluster.config import AssignJobConfig, load_config
    from scenecluster.job import _feature_settings, overruled_feature_settings

    saved = _feature_settings({"model": "/runs/a/finetune/backbone", "layer": 8, "pooling": "cls", "image_size": 224})
    plain = load_config(None, {"data.input": "/x", "output": "/o", "clustering": "/c"}, model=AssignJobConfig)
    assert overruled_feature_settings(plain.embed, saved) == []
    given = load_config(
        None,
        {
            "data.input": "/x",
            "output": "/o",
            "clustering": "/c",
            "embed.model": "/elsewhere",
            "embed.layer": 8,
            "embed.image_size": 112,
            "embed.batch_size": 8,
        },
        model=AssignJobConfig,
    )
    assert overruled_feature_settings(given.embed, saved) == ["embed.image_size=112", "embed.model=/elsewhere"]


def test_assign_reads_new_scenes_with_the_saved_runs_nodata():
    """A run with ``--nodata 0`` saves ``nodata`` in its feature; ``assign`` masks new scenes the same way (and a
    ``--nodata 0`` given to it again is the same setting, not an overruled one)."""
    from scenecluster.config import AssignJobConfig, ClusterJobConfig, load_config
    from scenecluster.job import _feature_settings, overruled_feature_settings

    fitted = load_config(None, {"data.input": "/x", "output": "/o", "embed.nodata": 0}, model=ClusterJobConfig)
    feature = {"model": "m", "layer": 8, "pooling": "cls", "image_size": 224, **fitted.embed.pixel_spec().identity()}
    saved = _feature_settings(feature)
    assign = {"data.input": "/y", "output": "/o2", "clustering": "/o"}
    again = load_config(None, {**assign, **{f"embed.{k}": v for k, v in saved.items()}}, model=AssignJobConfig)
    assert again.embed.pixel_spec() == fitted.embed.pixel_spec() and again.embed.pixel_spec().nodata == 0.0
    given = load_config(None, {**assign, "embed.nodata": "0"}, model=AssignJobConfig)
    assert overruled_feature_settings(given.embed, saved) == []
    old_run = {k: v for k, v in feature.items() if k != "nodata"}  # saved before the setting: the default
    assert _feature_settings(old_run)["nodata"] == "auto"


def test_feature_spec_checks_the_layer_without_weights(tiny_model_dir):
    spec = resolve_feature_spec(str(tiny_model_dir), layer=-1, pooling="cls+mean", image_size=28)
    assert (spec.layer, spec.n_layers, spec.n_features) == (2, 2, 64)
    assert spec.identity() == {
        "model": str(tiny_model_dir),
        "layer": -1,
        "pooling": "cls+mean",
        "image_size": 28,
        "bands": "auto",
        "stretch": "auto",
        "percentiles": [2.0, 98.0],
        "weights": weights_fingerprint(tiny_model_dir),  # the weights' bytes are hashed, never loaded into a model
    }
    for bad in (3, -3, 40):
        with pytest.raises(ConfigError, match=r"setting embed\.layer: layer must be in 1\.\.2, -2\.\.-1 or 0"):
            resolve_feature_spec(str(tiny_model_dir), layer=bad)


def test_bad_layer_fails_in_the_driver_before_ray(tmp_path, sample_dir, tiny_model_dir):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scenecluster.cli",
            "cluster",
            str(sample_dir),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--layer",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"RAY_ADDRESS": "127.0.0.1:1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"scenecluster: error: setting embed.layer: layer must be in 1..2, -2..-1 or 0 (the model's choice) "
        f"({tiny_model_dir} has 2 blocks), not 40"
    ]
    assert not out.exists()  # nothing claimed, and RAY_ADDRESS points nowhere: Ray was never joined


def test_clusterer_registry_and_optional_predict_proba():
    from scenecluster.cluster import CLUSTERERS, make_clusterer
    from scenecluster.config import ReduceConfig
    from scenecluster.fitted import fit_clustering
    from scenecluster.reduce import PROJECTIONS, reduce_embeddings

    assert set(CLUSTERERS) == set(ClusterConfig.model_fields["method"].annotation.__args__)
    assert set(PROJECTIONS) == set(ReduceConfig.model_fields["method"].annotation.__args__)
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(c, 0.1, size=(30, 3)) for c in (0.0, 5.0, 10.0)])
    km = make_clusterer(ClusterConfig(method="kmeans", n_components=3), X)
    assert type(km).__name__ == "KMeans" and km.n_clusters == 3
    fitted, clusters, coords = fit_clustering(
        X,
        feature={},
        reduce={"method": "pca", "n_components": 2},
        cluster=ClusterConfig(method="kmeans", n_components=3),
    )
    assert len(np.unique(clusters)) == 3 and coords.shape == (90, 2) and fitted.info["n_iter"] is not None
    assigned = fitted.assign(X)  # k-means has no predict_proba or score_samples: both are optional
    assert np.array_equal(assigned["cluster"], clusters) and np.all(assigned["probability"] == 1.0)
    assert not assigned["novel"].any()
    Z = reduce_embeddings(X, method="pca", n_components=2, n_neighbors=5)
    assert Z.shape == (90, 2) and Z.dtype == np.float32
