"""The SeaweedFS test server is a real S3 store: SigV4 is checked, pyarrow and scenecluster.data read it."""

from __future__ import annotations

import io
import tarfile

import pyarrow.fs as pafs
import pytest
from botocore.exceptions import ClientError

from scenecluster.data import list_scenes, open_filesystem
from scenecluster.errors import InputError
from scenecluster.testing.s3server import SeaweedS3
from tests.conftest import copy_sample

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory):
    scenes = copy_sample(tmp_path_factory.mktemp("scenes"), per_class=3, classes=2)
    s3_server.create_bucket("scenes")
    keys = s3_server.upload_folder(scenes, "scenes", "loose")
    shards = s3_server.upload_tar_shards(scenes, "scenes", "shards", images_per_shard=4)
    return {"keys": keys, "shards": shards}


def test_wrong_secret_is_refused(s3_server, bucket):
    client = s3_server.boto3_client(secret_key="not-the-secret")
    with pytest.raises(ClientError) as info:
        client.list_objects_v2(Bucket="scenes")
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_right_secret_lists_uploads(s3_server, bucket):
    listed = s3_server.boto3_client().list_objects_v2(Bucket="scenes", Prefix="loose/")
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(bucket["keys"])
    assert len(bucket["keys"]) == 6 and all(k.count("/") == 2 for k in bucket["keys"])


def test_pyarrow_filesystem_with_env_credentials(s3_env, bucket):
    fs, root = open_filesystem("s3://scenes/loose", endpoint_url=s3_env.endpoint_url)
    assert isinstance(fs, pafs.S3FileSystem) and root == "scenes/loose"
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    assert sorted(files) == sorted(f"scenes/{k}" for k in bucket["keys"])


def test_list_scenes_reads_s3_with_endpoint_from_env(s3_env, bucket):
    listing = list_scenes("s3://scenes/loose/")
    assert len(listing) == 6


def test_tar_shards_keep_class_folders(s3_server, bucket):
    assert bucket["shards"] == ["shards/shard-000000.tar", "shards/shard-000001.tar"]
    body = s3_server.boto3_client().get_object(Bucket="scenes", Key=bucket["shards"][0])["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = tar.getnames()
    assert len(names) == 4 and all(n.count("/") == 1 and n.endswith(".jpg") for n in names)


@pytest.mark.parametrize("uri", ["s3://scenes/missing", "s3://no-such-bucket/scenes"])
def test_missing_prefix_or_bucket_is_an_input_error(s3_env, bucket, uri):
    with pytest.raises(InputError, match="does not exist"):
        list_scenes(uri)


def test_two_servers_do_not_collide(s3_server):
    with SeaweedS3() as other:
        assert other.endpoint_url != s3_server.endpoint_url
        assert not set(other.ports.values()) & set(s3_server.ports.values())
        other.create_bucket("other")
        assert [b["Name"] for b in other.boto3_client().list_buckets()["Buckets"]] == ["other"]
    assert other._proc is None
