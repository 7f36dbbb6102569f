"""Self-training's Ray-free pieces: which scenes become pseudo-labels, the file fine-tuning reads, how a round's
rows are labelled, where a round writes, and the label-free agreement that can stop the rounds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scenecluster.config import PipelineConfig, load_config
from scenecluster.errors import InputError
from scenecluster.ingest import attach_labels
from scenecluster.outputs import OutputFolder
from scenecluster.self_train import (
    FIT_SAMPLE,
    INPUT_KEY,
    clustering_agreement,
    read_pseudo_labels,
    select_pseudo_labels,
)


def test_each_cluster_keeps_its_densest_share_and_small_clusters_give_no_class():
    clusters = np.array([5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 9, 9])
    density = np.array([0.1, 0.9, 0.5, 0.7, 3.0, 1.0, 2.0, 0.0, 5.0, 4.0, 8.0, 7.0])
    index, pseudo = select_pseudo_labels(clusters, density, keep=0.5, min_size=2)
    # cluster 2 (6 scenes) keeps 3, cluster 5 (4) keeps 2, cluster 9 (2) would keep 1 < min_size: dropped
    assert index.tolist() == [8, 9, 4, 1, 3]
    assert pseudo.tolist() == [0, 0, 0, 1, 1]  # numbered 0.. without gaps, in cluster order
    index, pseudo = select_pseudo_labels(clusters, density, keep=1.0, min_size=1)
    assert sorted(index.tolist()) == list(range(12)) and sorted(set(pseudo.tolist())) == [0, 1, 2]
    index, pseudo = select_pseudo_labels(clusters, density, keep=0.5, min_size=10)
    assert index.size == 0 and pseudo.size == 0


def _pseudo_file(path, target, paths, labels, **metadata) -> str:
    table = pa.table({"path": paths, "label": labels})
    table = table.replace_schema_metadata({INPUT_KEY: str(target).encode(), **metadata} if target else metadata)
    pq.write_table(table, path)
    return str(path)


def test_pseudo_labels_file_lists_files_and_shards_once_and_names_its_classes(tmp_path):
    target = tmp_path / "tiles"
    target.mkdir()
    paths = [f"{target}/a.jpg", f"{target}/b.jpg", f"{target}/x.tar/c.jpg", f"{target}/x.tar/d.jpg"]
    file = _pseudo_file(tmp_path / "p.parquet", target, paths, ["p01", "p00", "p01", "p00"])
    pseudo = read_pseudo_labels(file)
    assert pseudo.listing.uri == str(target)
    assert pseudo.listing.paths == [f"{target}/a.jpg", f"{target}/b.jpg", f"{target}/x.tar"]
    assert pseudo.classes == ["p00", "p01"] and pseudo.labels[f"{target}/x.tar/c.jpg"] == "p01"


def test_bad_pseudo_labels_files_are_named_in_the_error(tmp_path):
    with pytest.raises(InputError, match="missing.parquet"):
        read_pseudo_labels(str(tmp_path / "missing.parquet"))
    no_target = _pseudo_file(tmp_path / "no-target.parquet", None, ["/t/a.jpg", "/t/b.jpg"], ["p00", "p01"])
    with pytest.raises(InputError, match="no-target.parquet.*metadata"):
        read_pseudo_labels(no_target)
    one_class = _pseudo_file(tmp_path / "one.parquet", tmp_path, [f"{tmp_path}/a.jpg"], ["p00"])
    with pytest.raises(InputError, match="one.parquet.*two classes"):
        read_pseudo_labels(one_class)


def test_pseudo_labelled_rows_take_their_label_by_path_and_unpicked_shard_members_are_left_out():
    labels = {"/t/a.jpg": "p01", "/t/x.tar/b.jpg": "p00", "/t/bad.jpg": "p00"}
    batch = {
        "path": np.array(["/t/a.jpg", "/t/x.tar/b.jpg", "/t/x.tar/other.jpg", "/t/bad.jpg"], dtype=object),
        "error": np.array(["", "", "", "decode failed"], dtype=object),
        "image": np.arange(4 * 12, dtype=np.uint8).reshape(4, 2, 2, 3),
        "source": np.array(["/t/a.jpg", "/t/x.tar", "/t/x.tar", "/t/bad.jpg"], dtype=object),
    }
    out = attach_labels(batch, classes=["p00", "p01"], source=2, labels=labels)
    assert out["path"].tolist() == ["/t/a.jpg", "/t/x.tar/b.jpg", "/t/bad.jpg"]
    assert out["label"].tolist() == [1, 0, 0] and out["source"].tolist() == [2, 2, 2]
    assert out["error"].tolist() == ["", "", "decode failed"]  # the unreadable one is still counted as skipped
    np.testing.assert_array_equal(out["image"], batch["image"][[0, 1, 3]])


def test_a_self_training_round_writes_beside_the_first_and_keeps_the_start_model(tmp_path):
    cfg = load_config(
        None,
        {
            "finetune.sources": ["/src"],
            "finetune.output": str(tmp_path / "finetune"),
            "finetune.feature.model": "/untuned",
            "finetune.epochs": 10,
            "cluster.data.input": "/target",
            "cluster.output": "s3://bucket/run/cluster/",
            "self_train.epochs": 4,
        },
        model=PipelineConfig,
    )
    assert cfg.self_train.rounds == 1  # the measured recipe is the default
    tune = cfg.self_train_finetune(2, "0123abcd4567")
    assert tune.output == f"{tmp_path}/finetune-round2" and tune.name == "finetune-round2"
    # named by what made them: a fine-tune trained on other pseudo-labels has another setting
    assert tune.pseudo_labels == [f"{tmp_path}/finetune-round2/pseudo_labels-0123abcd4567.parquet"]
    assert tune.sources == ["/src"] and tune.feature.model == "/untuned" and tune.epochs == 4
    assert cfg.finetune.pseudo_labels == [] and cfg.finetune.epochs == 10  # the first fine-tune is untouched
    assert cfg.cluster_job("/b", round=2).output == "s3://bucket/run/cluster-round2"
    assert cfg.cluster_job("/b").output == "s3://bucket/run/cluster/"


def _fitted_clusters(folder, paths, clusters) -> str:
    out = OutputFolder(str(folder))
    out.write_table(FIT_SAMPLE, pa.table({"path": paths, "cluster": pa.array(clusters, pa.int32())}))
    return str(folder)


def test_agreement_compares_two_rounds_on_the_scenes_both_fitted(tmp_path):
    paths = [f"/t/{i}.jpg" for i in range(8)]
    first = _fitted_clusters(tmp_path / "a", paths, [0, 0, 0, 0, 1, 1, 1, 1])
    renamed = _fitted_clusters(tmp_path / "b", paths[::-1], [3, 3, 3, 3, 7, 7, 7, 7])  # same partition, new ids
    assert clustering_agreement(first, renamed) == pytest.approx(1.0)
    mixed = _fitted_clusters(tmp_path / "c", paths, [0, 1, 0, 1, 0, 1, 0, 1])
    assert clustering_agreement(first, mixed) < 0.1
    elsewhere = _fitted_clusters(tmp_path / "d", ["/u/a.jpg", "/u/b.jpg"], [0, 1])
    assert clustering_agreement(first, elsewhere) is None


def test_the_pseudo_label_key_does_not_move_with_the_clustering_prior(tmp_path):
    # the pseudo-label mixture always uses the data prior, so a run refitted after the neighbourhood prior became
    # the default keeps the key (and so the pseudo-labels and the round's fine-tune) of the run made before it
    from scenecluster.config import ClusterConfig, ReduceConfig, SelfTrainConfig
    from scenecluster.fitted import fit_clustering, save_clustering
    from scenecluster.self_train import pseudo_label_key

    X = np.random.default_rng(0).normal(size=(60, 6)).astype(np.float32)
    reduce = ReduceConfig(method="pca", n_components=2, backend="umap-learn")
    fitted, _, _ = fit_clustering(X, feature={}, reduce=reduce, cluster=ClusterConfig(n_components=3), device="cpu")
    before, after, other = (OutputFolder(str(tmp_path / name)) for name in ("before", "after", "other"))
    save_clustering(fitted, before, fit_key="old-data-prior-fit", summary={})  # made before: one key
    save_clustering(fitted, after, fit_key="neighbourhood-fit", data_prior_fit_key="old-data-prior-fit", summary={})
    save_clustering(fitted, other, fit_key="neighbourhood-fit", data_prior_fit_key="another-sample", summary={})
    st = SelfTrainConfig()
    old = pseudo_label_key(before.uri, cluster=ClusterConfig(prior_covariance="data"), self_train=st)
    assert pseudo_label_key(after.uri, cluster=ClusterConfig(), self_train=st) == old
    assert pseudo_label_key(after.uri, cluster=ClusterConfig(neighbourhood_share=0.3), self_train=st) == old
    # what does decide them still moves it: the run's sample and projection, and self-training's own settings
    assert pseudo_label_key(other.uri, cluster=ClusterConfig(), self_train=st) != old
    assert pseudo_label_key(after.uri, cluster=ClusterConfig(), self_train=SelfTrainConfig(keep=0.3)) != old
