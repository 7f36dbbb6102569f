"""The example configs of rayjobs/ must stay valid as the config models change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scenecluster.config import (
    AssignJobConfig,
    ClusterJobConfig,
    FinetuneConfig,
    PipelineConfig,
    TuneJobConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "rayjobs" / "configs"


@pytest.mark.parametrize("name", ["cluster-local.yaml", "cluster-s3.yaml"])
def test_cluster_configs_load(name):
    cfg = load_config(CONFIGS / name, model=ClusterJobConfig)
    assert cfg.output


def test_s3_config_names_an_endpoint():
    cfg = load_config(CONFIGS / "cluster-s3.yaml", model=ClusterJobConfig)
    assert cfg.data.input.startswith("s3://") and cfg.data.endpoint_url
    # the KubeRay cluster RayJob mounts this config and deletes its head when the job ends: a folder there is lost
    assert cfg.output.startswith("s3://"), cfg.output


def test_finetune_config_loads():
    model = FinetuneConfig
    assert load_config(CONFIGS / "finetune.yaml", model=model).sources


def test_tune_config_loads():
    model = TuneJobConfig
    cfg = load_config(CONFIGS / "tune.yaml", model=model)
    assert cfg.search.covariance_prior_scale == (0.5, 8.0)


def test_pipeline_config_loads():
    model = PipelineConfig
    cfg = load_config(CONFIGS / "pipeline.yaml", model=model)
    assert cfg.finetune.sources and cfg.cluster.data.input
    # nodes share no disk: checkpoints and clusterings (with their copy of the backbone) outlive the head in S3
    assert cfg.finetune.storage_path.startswith("s3://") and cfg.cluster.output.startswith("s3://")


def test_assign_config_loads():
    model = AssignJobConfig
    cfg = load_config(CONFIGS / "assign.yaml", model=model)
    assert cfg.clustering and cfg.data.input


def test_the_examples_fine_tunes_keep_their_checkpoints_apart():
    # one storage_path, several examples: a shared run name would make one example resume (or with --overwrite
    # delete) another's checkpoints
    from scenecluster.config import BenchmarkConfig, FinetuneConfig, PipelineConfig

    runs = [
        load_config(CONFIGS / "finetune.yaml", model=FinetuneConfig),
        load_config(CONFIGS / "pipeline.yaml", model=PipelineConfig).finetune,
        load_config(CONFIGS / "benchmark.yaml", model=BenchmarkConfig).finetune,
    ]
    where = [(cfg.storage_path or cfg.output, cfg.name) for cfg in runs]
    assert len(set(where)) == len(where), where


def test_every_example_is_tested():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {
        "cluster-local.yaml",
        "cluster-s3.yaml",
        "finetune.yaml",
        "tune.yaml",
        "pipeline.yaml",
        "assign.yaml",
        "benchmark.yaml",
    }


def test_runtime_env_is_a_mapping_with_working_dir():
    env = yaml.safe_load((ROOT / "rayjobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and "AWS_DEFAULT_REGION" in env["env_vars"]


@pytest.mark.parametrize("stage", ["cluster", "tune", "finetune", "pipeline", "assign", "benchmark"])
def test_entrypoint_bad_setting_is_one_line_and_exit_2(stage, tmp_path):
    # Validation happens before ray.init(), so this runs without Ray.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "rayjobs" / f"{stage}.py"), "--set", "no_such.setting=1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rayjobs/{stage}: error:"), proc.stderr


def test_benchmark_config_loads_and_couples_the_feature():
    from scenecluster.config import BenchmarkConfig

    cfg = load_config(CONFIGS / "benchmark.yaml", model=BenchmarkConfig)
    assert cfg.finetune.sources and cfg.cluster.data.input and cfg.seeds == [0, 1, 2]
    # the target is embedded at the fine-tune's size and always scored against its folders
    assert cfg.cluster.embed.image_size == cfg.finetune.feature.image_size == 224
    assert cfg.cluster.data.labels == "folders"
    assert cfg.output.startswith("s3://") and cfg.finetune.storage_path.startswith("s3://")


def test_benchmark_config_needs_sources_or_a_backbone():
    from scenecluster.config import BenchmarkConfig
    from scenecluster.errors import ConfigError

    with pytest.raises(ConfigError, match="finetune.sources .* or backbone"):
        load_config(None, {"output": "o", "cluster.output": "o/runs", "cluster.data.input": "t"}, model=BenchmarkConfig)
