"""A backbone kept in S3 (a real SeaweedFS on 127.0.0.1) is loaded like a local folder, keyed by its weights.

On clusters whose nodes share no disk a fine-tuned backbone lives in object storage; ``--model s3://...`` is
fetched once per machine into the cache (:mod:`scenecluster.model_store`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Model

from scenecluster.embed import Embedder
from scenecluster.errors import OutputError
from scenecluster.features import resolve_feature_spec
from scenecluster.model_store import SOURCE_RECORD, fetch_model_folder, publish_model_folder
from scenecluster.models import (
    ModelLoadError,
    load_backbone,
    resolve_backbone,
    save_backbone,
    tiny_dinov2_config,
)

pytestmark = pytest.mark.integration


def test_a_backbone_in_s3_loads_and_is_fetched_again_when_uploaded_again(
    s3_server, tiny_model_dir, tmp_path, monkeypatch
):
    """The store is named by the job's endpoint setting alone (no ``AWS_ENDPOINT_URL``), and the feature carries
    it to the embedding actors, which fetch the model for themselves."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("SCENECLUSTER_CACHE", str(tmp_path / "cache"))
    endpoint = s3_server.endpoint_url
    s3_server.create_bucket("models")
    s3_server.upload_folder(tiny_model_dir, "models", "runs/ft/backbone")
    # the empty folder marker pyarrow writes (Ray Train's checkpoints in S3 have them): not a file to fetch
    s3_server.boto3_client().put_object(Bucket="models", Key="runs/ft/backbone/", Body=b"")
    uri = "s3://models/runs/ft/backbone"

    spec = resolve_feature_spec(uri, image_size=28, endpoint_url=endpoint)
    local = resolve_feature_spec(str(tiny_model_dir), image_size=28)
    # the URI stays the source, so that each node's workers fetch their own copy, from the job's store
    assert spec.source == uri and spec.endpoint_url == endpoint and spec.hidden_size == local.hidden_size
    assert spec.weights == local.weights  # the same bytes: the same feature as the local folder
    pixels = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        fetched = Embedder(spec, device="cpu").model(pixel_values=pixels).pooler_output  # as an actor loads it
        expected = load_backbone(tiny_model_dir)(pixel_values=pixels).pooler_output
    torch.testing.assert_close(fetched, expected)

    copy = fetch_model_folder(uri, endpoint_url=endpoint)
    assert (copy / SOURCE_RECORD).is_file() and copy.is_relative_to(tmp_path / "cache")
    kept = (copy / "model.safetensors").stat().st_mtime_ns
    assert fetch_model_folder(uri, endpoint_url=endpoint) == copy
    assert (copy / "model.safetensors").stat().st_mtime_ns == kept  # not fetched again

    torch.manual_seed(3)  # a fine-tune saved over the same prefix within the second: fetched again by its ETag
    retrained = tmp_path / "retrained"
    save_backbone(Dinov2Model(tiny_dinov2_config()), retrained)
    s3_server.upload_folder(retrained, "models", "runs/ft/backbone")
    again = resolve_backbone(uri, endpoint_url=endpoint).weights
    assert again == resolve_backbone(retrained).weights != local.weights

    with pytest.raises(ModelLoadError, match=r"s3://models/runs/none.*no config.json"):
        resolve_backbone("s3://models/runs/none", endpoint_url=endpoint)


def test_a_published_folder_is_fetched_whole_and_uploaded_again_only_when_its_weights_change(
    s3_server, tiny_model_dir, tmp_path, monkeypatch
):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SCENECLUSTER_CACHE", str(tmp_path / "cache"))
    s3_server.create_bucket("runs")
    client = s3_server.boto3_client()
    uri = "s3://runs/job/model"
    client.put_object(Bucket="runs", Key="job/model/model-00002-of-00002.safetensors", Body=b"a stale shard")

    assert publish_model_folder(tiny_model_dir, uri) is True
    keys = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket="runs", Prefix="job/model/")["Contents"]}
    assert "job/model/model-00002-of-00002.safetensors" not in keys  # no stale shard is fetched beside the weights
    assert resolve_backbone(uri).weights == resolve_backbone(str(tiny_model_dir)).weights

    assert publish_model_folder(tiny_model_dir, uri) is False  # the same files: nothing uploaded, no ETag moves
    assert {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket="runs", Prefix="job/model/")["Contents"]} == keys

    torch.manual_seed(5)  # the folder rewritten in place (a fine-tune exported again): uploaded again
    retrained = tmp_path / "retrained"
    save_backbone(Dinov2Model(tiny_dinov2_config()), retrained)
    assert publish_model_folder(retrained, uri) is True
    new_weights = resolve_backbone(retrained).weights
    assert resolve_backbone(uri).weights == new_weights != resolve_backbone(tiny_model_dir).weights

    with pytest.raises(OutputError, match=r"cannot copy the model folder .* to s3://no-such-bucket/model"):
        publish_model_folder(tiny_model_dir, "s3://no-such-bucket/model")
