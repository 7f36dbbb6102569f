"""The benchmark protocol on a small real subset with the tiny model: fine-tune, a self-training round, both
references, every seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scenecluster.benchmark import METHOD, ORACLE
from scenecluster.cli import main, sample_data_dir

pytestmark = pytest.mark.integration


def split_sample(tmp_path: Path, per_class: int = 8) -> tuple[Path, Path]:
    """Real EuroSAT scenes: three classes as the labelled source, four others as the target."""
    classes = sorted(p for p in sample_data_dir().iterdir() if p.is_dir())
    source, target = tmp_path / "source", tmp_path / "target"
    for root, picked in ((source, classes[:3]), (target, classes[3:7])):
        for cdir in picked:
            (root / cdir.name).mkdir(parents=True)
            for img in sorted(cdir.iterdir())[:per_class]:
                shutil.copy2(img, root / cdir.name / img.name)
    return source, target


def test_benchmark_runs_the_method_and_both_references_over_seeds(ray_cluster, tmp_path, tiny_model_dir, capsys):
    source, target = split_sample(tmp_path)
    out = tmp_path / "bench"
    code = main(
        [
            "benchmark",
            "--source",
            str(source),
            "--target",
            str(target),
            "-o",
            str(out),
            "--seeds",
            "0",
            "1",
            "--epochs",
            "1",
            "--model",
            str(tiny_model_dir),
            "--image-size",
            "28",
            "--projection",
            "pca",
            "--device",
            "cpu",
            "--set",
            "finetune.batch_size=4",
            "--set",
            "finetune.workers=1",
            "--set",
            "finetune.resources.device=cpu",
            "--set",
            "self_train.min_size=2",  # 32 scenes: the default 50 would skip the round
        ]
    )
    assert code == 0
    result = json.loads((out / "benchmark.json").read_text())
    for key in ("target", "sources", "backbone", "seeds", "finetune", "self_train", "runs", "summary", "seconds"):
        assert key in result, key
    assert result["sources"] == [str(source)] and result["finetune"]["step"] > 0
    # the tuned backbone is the fine-tune's folder; the untuned reference is the model it started from; the
    # self-trained one was tuned again beside pseudo-labels from the tuned backbone's first DP-GMM run
    models = {run["backbone"]: run["model"] for run in result["runs"]}
    round1 = out / "finetune-round1"
    assert models == {
        "tuned": result["backbone"],
        "self-trained-1": str(round1 / "backbone"),
        "untuned": str(tiny_model_dir),
    }
    assert Path(result["backbone"]).parent == out / "finetune"
    (self_trained,) = result["self_train"]
    assert self_trained["pseudo_labels"]["from_run"] == str(out / "tuned")
    (pseudo_file,) = round1.glob("pseudo_labels-*.parquet")
    assert self_trained["pseudo_labels"]["kept"] > 0 and self_trained["pseudo_labels"]["file"] == str(pseudo_file)
    assert json.loads((round1 / "metrics.json").read_text())["pseudo_labels"] == [str(pseudo_file)]
    assert len(result["runs"]) == 3 * 2 * 2  # backbones x methods x seeds
    for run in result["runs"]:
        assert run["n_scenes"] == 32 and run["n_classes"] == 4
        assert set(run) >= {"acc", "nmi", "ari", "n_clusters", "stage_seconds"}
        if run["method"] == ORACLE:
            assert run["n_clusters"] == 4  # k-means is told the true number of classes
    groups = {(row["backbone"], row["method"]) for row in result["summary"]}
    assert groups == {(b, m) for b in ("tuned", "self-trained-1", "untuned") for m in (METHOD, ORACLE)}
    for row in result["summary"]:
        assert row["n_seeds"] == 2 and set(row["acc"]) == {"mean", "std"}
    seeds = [(run["backbone"], run["method"], run["seed"]) for run in result["runs"]]
    assert len(set(seeds)) == len(seeds)  # each (backbone, method) ran once per seed
    # the target was embedded once per backbone: every later run refit on the same embeddings
    printed = capsys.readouterr().out
    embed_lines = [line for line in printed.splitlines() if line.startswith("[embed]")]
    assert len(embed_lines) == 12 and sum("reused 32 embeddings" in line for line in embed_lines) == 9
    table = (out / "benchmark.md").read_text()
    assert "| tuned | dpgmm |" in table and "| untuned | kmeans-true-k |" in table
    assert "benchmark.json" in printed
