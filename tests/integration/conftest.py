"""One local Ray cluster per test session: each start and stop costs seconds."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster(request):
    """The session's Ray. Its workers hold the test store's credentials and endpoint, as a cloud cluster's nodes
    hold their instance profile's: a worker that reads S3 with the node's own chain (an ``s3://`` model, fetched
    by each embedding actor) reaches the store, whichever test first started Ray."""
    import ray

    try:
        store_env = request.getfixturevalue("s3_server").env()
    except pytest.skip.Exception:  # no SeaweedFS here: the tests that need it skip, the others run
        store_env = {}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": store_env})
    yield ray
    ray.shutdown()


# The S3 server fixtures live in their own module (they need no Ray); importing them here registers them.
from tests.integration.conftest_s3 import s3_env, s3_server  # noqa: E402, F401
