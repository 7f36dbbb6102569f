"""Public open-data buckets from a machine with no AWS credentials: listed and read unsigned, as on AWS.

A SeaweedFS server whose ``open-data`` bucket anyone may list and read, and whose ``private`` bucket only its
admin may; this process holds no credentials (no keys, no profile, no files, no instance metadata).
"""

from __future__ import annotations

import pytest

from scenecluster.data import open_filesystem, unsigned
from scenecluster.errors import InputError
from scenecluster.job import run_cluster_job
from scenecluster.manifest import check_input, iter_scene_paths
from scenecluster.testing.s3server import REGION, SeaweedS3
from tests.conftest import copy_sample, tiny_job_config
from tests.integration.conftest_s3 import skip_without_weed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    skip_without_weed()
    scenes = copy_sample(tmp_path_factory.mktemp("scenes"), per_class=4, classes=3)
    with SeaweedS3(public_buckets=["open-data"]) as server:
        for bucket in ("open-data", "private"):
            server.create_bucket(bucket)
            server.upload_folder(scenes, bucket, "scenes")
        yield server


@pytest.fixture
def no_credentials(store, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint_url)
    monkeypatch.setenv("AWS_REGION", REGION)
    return store


def test_a_public_bucket_is_listed_and_read_without_credentials(no_credentials):
    assert unsigned()
    paths = list(iter_scene_paths("s3://open-data/scenes"))
    assert len(paths) == 12 and all(p.startswith("open-data/scenes/") and p.endswith(".jpg") for p in paths)
    fs, _ = open_filesystem("s3://open-data/scenes")
    with fs.open_input_file(paths[0]) as f:
        assert f.read(3) == b"\xff\xd8\xff"  # a JPEG


def test_a_private_bucket_says_no_credentials_were_found(no_credentials):
    with pytest.raises(InputError, match="no AWS credentials were found, so the request was unsigned"):
        check_input("s3://private/scenes")


def test_the_job_clusters_a_public_bucket_without_credentials(ray_cluster, no_credentials, tmp_path, tiny_model_dir):
    cfg = tiny_job_config("s3://open-data/scenes", tmp_path / "out", tiny_model_dir, {"data.labels": "folders"})
    metrics = run_cluster_job(cfg, echo=lambda s: None)
    assert (metrics["n_embedded"], metrics["n_skipped"]) == (12, 0)


def test_doctor_says_the_input_was_read_unsigned_and_why_a_private_one_is_not(no_credentials):
    from scenecluster import doctor

    public = doctor.check_input("s3://open-data/scenes", None)
    assert public.status == doctor.PASS and "read unsigned: no AWS credentials were found" in public.detail
    private = doctor.check_input("s3://private/scenes", None)
    assert private.status == doctor.FAIL and "no AWS credentials were found" in private.detail, private
