import numpy as np
import pytest

from scenecluster.evaluate import cluster_accuracy, contingency, score_clusters


def test_permuted_labelling_scores_one():
    y = np.array(["a", "a", "b", "b", "c", "c", "c"])
    perm = np.array([2, 2, 0, 0, 1, 1, 1])
    s = score_clusters(y, perm)
    assert s["acc"] == 1.0
    assert s["nmi"] == pytest.approx(1.0)
    assert s["ari"] == pytest.approx(1.0)
    assert s["n_classes"] == 3 and s["n_clusters"] == 3


def test_hand_computed_accuracy():
    # clusters: 0 -> {a,a,b}, 1 -> {b,b}, 2 -> {a}; best matching 0->a (2), 1->b (2): 4 of 6
    y = ["a", "a", "b", "b", "b", "a"]
    p = [0, 0, 0, 1, 1, 2]
    assert cluster_accuracy(y, p) == pytest.approx(4 / 6)


def test_more_clusters_than_classes_is_allowed_and_penalised():
    y = np.repeat([0, 1], 4)
    split = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # each class split in two
    s = score_clusters(y, split)
    assert s["n_clusters"] == 4
    assert s["acc"] == pytest.approx(0.5)
    assert 0 < s["nmi"] < 1


def test_fewer_clusters_than_classes():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.zeros(6, dtype=int)
    assert cluster_accuracy(y, p) == pytest.approx(2 / 6)
    assert score_clusters(y, p)["ari"] == pytest.approx(0.0)


def test_contingency_table_counts():
    table, clusters, classes = contingency(["x", "y", "y"], [5, 5, 7])
    assert clusters.tolist() == [5, 7]
    assert classes.tolist() == ["x", "y"]
    assert table.tolist() == [[1, 1], [0, 1]]


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError, match="same length"):
        score_clusters([0, 1], [0])
