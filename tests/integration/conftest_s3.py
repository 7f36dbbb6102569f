"""A real S3 server (SeaweedFS) for the whole test session, on free loopback ports, with random keys."""

from __future__ import annotations

import pytest

from scenecluster.testing.s3server import SeaweedS3, find_weed


def skip_without_weed() -> None:
    """Skip the test, saying why, on a machine without SeaweedFS's ``weed`` binary."""
    try:
        find_weed()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def s3_server():
    skip_without_weed()
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server's AWS_* variables in this process (for pyarrow and scenecluster.data)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


__all__ = ["s3_env", "s3_server", "skip_without_weed"]
