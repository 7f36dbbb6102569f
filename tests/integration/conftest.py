"""One local Ray cluster per test session: each start and stop costs seconds."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# The S3 server fixtures live in their own module (they need no Ray); importing them here registers them.
from tests.integration.conftest_s3 import s3_env, s3_server  # noqa: E402, F401
