"""The benchmark's per-seed jobs: what a seed moves, and when the target sample is embedded once."""

from __future__ import annotations

import pytest

from scenecluster.benchmark import METHOD, ORACLE, run_folder, variant_config
from scenecluster.config import BenchmarkConfig, ClusterJobConfig
from scenecluster.features import resolve_feature_spec
from scenecluster.job import run_identity


@pytest.fixture
def job(tiny_model_dir) -> ClusterJobConfig:
    cfg = ClusterJobConfig(output="out", data={"input": "scenes", "sample": 300, "labels": "folders"})
    cfg.embed.model = str(tiny_model_dir)
    return cfg


def _identity(cfg: ClusterJobConfig) -> dict:
    return run_identity(cfg, resolve_feature_spec(cfg.embed.model))


def test_each_seed_draws_its_own_sample_by_default(job):
    first, second = (variant_config(job, METHOD, seed, None) for seed in (0, 1))
    assert (first.data.seed, second.data.seed) == (0, 1)
    assert _identity(first) != _identity(second)  # so each seed embeds its own sample ...
    bench = BenchmarkConfig(output="bench", backbone="tuned-model", cluster=job)
    # ... in a folder of its own: one folder would hold another run at each seed, which a run folder refuses
    assert [run_folder(bench, "tuned", seed) for seed in (0, 1)] == ["bench/tuned/seed-0", "bench/tuned/seed-1"]
    one_sample = bench.model_copy(update={"sample_seed": 7})
    assert {run_folder(one_sample, "tuned", seed) for seed in (0, 1)} == {"bench/tuned"}


def test_a_sample_seed_keeps_one_sample_while_the_fit_seeds_move(job):
    variants = [variant_config(job, METHOD, seed, None, sample_seed=7) for seed in (0, 1, 2)]
    assert {v.data.seed for v in variants} == {7}
    assert [v.reduce.random_state for v in variants] == [0, 1, 2]
    assert [v.cluster.random_state for v in variants] == [0, 1, 2]
    assert len({str(_identity(v)) for v in variants}) == 1  # one embedding, refitted per seed


def test_the_oracle_is_kmeans_told_the_class_count(job):
    oracle = variant_config(job, ORACLE, 3, 10, sample_seed=0)
    assert (oracle.cluster.method, oracle.cluster.n_components, oracle.cluster.random_state) == ("kmeans", 10, 3)
    assert job.cluster.method == "dpgmm"  # the job it was copied from is untouched
