"""S3 faults against a real server: wrong credentials, and an object that vanishes mid-run."""

from __future__ import annotations

import pytest

from scenecluster.config import EmbedConfig
from scenecluster.data import list_scenes
from scenecluster.devices import decide, local_inventory
from scenecluster.embed import embed_images
from scenecluster.errors import InputError
from scenecluster.features import resolve_feature_spec
from scenecluster.outputs import OutputFolder
from tests.conftest import copy_sample

pytestmark = pytest.mark.integration


def test_wrong_credentials_give_one_clear_error(s3_server, monkeypatch, tmp_path):
    s3_server.create_bucket("creds")
    s3_server.upload_folder(copy_sample(tmp_path / "s", per_class=1, classes=2), "creds", "x")
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(InputError) as info:
        list_scenes("s3://creds/x/")
    message = str(info.value)
    assert "s3://creds/x/" in message and "\n" not in message


def test_object_vanishing_mid_run_is_counted_not_fatal(ray_cluster, s3_env, tmp_path, tiny_model_dir):
    s3_env.create_bucket("vanish")
    s3_env.upload_folder(copy_sample(tmp_path / "s", per_class=4, classes=3), "vanish", "scenes")
    listing = list_scenes("s3://vanish/scenes/")
    assert len(listing) == 12
    gone = listing.paths[5]
    s3_env.boto3_client().delete_object(Bucket="vanish", Key=gone.split("/", 1)[1])
    spec = resolve_feature_spec(str(tiny_model_dir), image_size=28)
    result = embed_images(
        listing,
        OutputFolder(str(tmp_path / "out")),
        spec,
        resources=decide("cpu", local_inventory()),
        settings=EmbedConfig(image_size=28, batch_size=4),
    )
    assert result.n_images == 12
    assert [p for p, _ in result.skipped] == [gone]
    assert result.skipped[0][1].startswith("read failed")
