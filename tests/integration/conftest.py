"""One local Ray cluster per test session: each start and stop costs seconds."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray Train's controller polls its workers every 2 s, so a fine-tune of a few seconds waited up to 2 s more to
    # be seen finished (3.3 s from the loop's end to fit()'s return, 1.1 s at 0.2 s): some 20 fine-tunes here.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# The S3 server fixtures live in their own module (they need no Ray); importing them here registers them.
from tests.integration.conftest_s3 import s3_env, s3_server  # noqa: E402, F401
