"""The consensus over seeds: which clusters other fits keep together, and what a merged cluster's scenes get."""

from __future__ import annotations

import numpy as np
import pytest

from scenecluster.config import ClusterConfig
from scenecluster.consensus import co_association, merge_co_associated
from scenecluster.fitted import cluster_probabilities


def test_co_association_is_the_chance_two_clusters_scenes_share_a_cluster_elsewhere():
    reference = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    always_joined = np.array([5, 5, 5, 5, 7, 7, 7, 7])  # 0 and 1 together, 2 apart
    half_split = np.array([1, 1, 1, 1, 1, 1, 3, 3])  # 2 cut in half, one half with 0 and 1
    ids, together = co_association(reference, [always_joined, half_split])
    np.testing.assert_array_equal(ids, [0, 1, 2])
    np.testing.assert_allclose(together[0, 1], 1.0)
    np.testing.assert_allclose(together[0, 2], (0.0 + 0.5) / 2)
    np.testing.assert_allclose(together[2, 2], (1.0 + 0.5) / 2)  # a cluster another fit cuts is < 1 with itself
    np.testing.assert_allclose(together, together.T)


def test_clusters_kept_together_elsewhere_merge_into_the_larger_and_the_rest_stay():
    reference = np.array([4, 4, 4, 9, 9, 2, 2])
    others = [np.array([0, 0, 0, 0, 0, 1, 1]), np.array([3, 3, 3, 3, 3, 8, 8])]
    assert merge_co_associated(reference, others, threshold=0.4) == {2: 2, 4: 4, 9: 4}
    # a threshold no pair reaches, and no other fit at all, leave every cluster as it is
    assert merge_co_associated(reference, [reference], threshold=0.4) == {2: 2, 4: 4, 9: 9}


def test_merges_chain_through_the_cluster_that_survived():
    # 0, 1 and 2 are one group in every other fit: both smaller clusters end in the largest, not in each other
    reference = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    other = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert merge_co_associated(reference, [other], threshold=0.9) == {0: 0, 1: 0, 2: 0, 3: 3}


def test_a_consensus_fit_of_other_scenes_is_refused():
    with pytest.raises(ValueError, match="labelled 3 scenes, the reference 4"):
        co_association(np.array([0, 0, 1, 1]), [np.array([0, 1, 1])])


def test_a_merged_clusters_probability_is_the_sum_of_its_components():
    # components 0 and 1 are one cluster: 0.3 + 0.3 beats the single component 2 at 0.4
    proba = np.array([[0.3, 0.3, 0.4, 0.0], [0.1, 0.0, 0.9, 0.0]])
    cluster, probability = cluster_probabilities(proba, np.array([0, 0, 1, -1]))
    np.testing.assert_array_equal(cluster, [0, 1])
    np.testing.assert_allclose(probability, [0.6, 0.9])
    # one component per cluster: the component's own probability, as before merging existed
    cluster, probability = cluster_probabilities(proba, np.array([2, 0, 1, -1]))
    np.testing.assert_array_equal(cluster, [1, 1])
    np.testing.assert_allclose(probability, [0.4, 0.9])


def test_the_consensus_keys_a_fit_only_where_it_acts():
    assert "consensus_runs" not in ClusterConfig().key_settings()  # off: the key made before it existed
    on = ClusterConfig(consensus_runs=3)
    assert on.key_settings()["consensus_runs"] == 3
    assert on.key_settings() != on.model_copy(update={"consensus_threshold": 0.6}).key_settings()
    # k-means has no consensus; the pseudo-label mixture fits the first run's coordinates, which it leaves alone
    assert "consensus_runs" not in on.model_copy(update={"method": "kmeans"}).key_settings()
    assert "consensus_runs" not in on.with_data_prior().key_settings()
