"""A Requester Pays bucket (NAIP's and Landsat's on AWS): refused with a hint until ``AWS_REQUEST_PAYER=requester``
accepts its charges, then listed, checked by doctor, clustered by the job and fine-tuned on, every request carrying the
header.

The bucket is the tests' SeaweedFS behind :class:`scenecluster.testing.s3gate.RequesterPaysGate`, which answers a
request without ``x-amz-request-payer: requester`` with 403 AccessDenied, as S3 answers such a bucket's non-owners.
"""

from __future__ import annotations

import pickle

import pytest

from scenecluster.data import list_scenes
from scenecluster.errors import InputError
from scenecluster.job import run_cluster_job
from scenecluster.testing.s3gate import RequesterPaysGate
from tests.conftest import copy_sample, tiny_job_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return copy_sample(tmp_path_factory.mktemp("paying"), per_class=3, classes=3)


@pytest.fixture
def gate(s3_server, scenes, monkeypatch):
    """The server's keys in this process, its endpoint the gate's; the bucket ``paying`` holds 9 scenes."""
    if "paying" not in {b["Name"] for b in s3_server.boto3_client().list_buckets()["Buckets"]}:
        s3_server.create_bucket("paying")
        s3_server.upload_folder(scenes, "paying", "scenes")
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_REQUEST_PAYER", raising=False)
    with RequesterPaysGate(s3_server.endpoint_url) as gate:
        monkeypatch.setenv("AWS_ENDPOINT_URL", gate.endpoint_url)
        yield gate


def test_refused_with_a_hint_until_the_charges_are_accepted_then_listed_and_read(gate, scenes, monkeypatch):
    with pytest.raises(InputError) as refused:
        list_scenes("s3://paying/scenes")
    assert "AccessDenied" in str(refused.value) or "ACCESS_DENIED" in str(refused.value), refused.value
    assert "set AWS_REQUEST_PAYER=requester to accept its charges" in str(refused.value)
    assert gate.refused > 0 and gate.paid == 0

    monkeypatch.setenv("AWS_REQUEST_PAYER", "requester")
    refused_before = gate.refused
    listing = list_scenes("s3://paying/scenes")
    assert len(listing) == 9 and all(p.startswith("paying/scenes/") for p in listing.paths)
    # the filesystem travels to Ray's workers pickled, with its endpoint and keys but not its client
    fs = pickle.loads(pickle.dumps(listing.filesystem))
    first = listing.paths[0]
    local = scenes / first.removeprefix("paying/scenes/")
    with fs.open_input_stream(first) as f:
        assert f.read() == local.read_bytes()
    data = local.read_bytes()
    with fs.open_input_file(first) as f:  # random access reads ranges: a report's member of a shard of gigabytes
        assert f.size() == len(data) and f.read_at(100, 50) == data[50:150]
        f.seek(len(data) - 10)
        assert f.read() == data[-10:] and f.read() == b""
    assert fs.get_file_info(first).size == local.stat().st_size
    with pytest.raises(FileNotFoundError, match="paying/scenes/no-such.jpg"):
        fs.open_input_stream("paying/scenes/no-such.jpg")
    with pytest.raises(OSError, match="read, never written"):
        fs.open_output_stream("paying/scenes/new.jpg")
    assert gate.refused == refused_before and gate.paid > 0  # every request accepted the charges


def test_another_value_of_the_variable_is_refused_naming_it(gate, monkeypatch):
    monkeypatch.setenv("AWS_REQUEST_PAYER", "yes")
    with pytest.raises(InputError, match=r"AWS_REQUEST_PAYER='yes': the only value S3 accepts is 'requester'"):
        list_scenes("s3://paying/scenes")


def test_doctor_reads_the_first_scene_and_says_the_requester_pays(gate, monkeypatch):
    from scenecluster import doctor

    denied = doctor.check_input("s3://paying/scenes", None)
    assert denied.status == doctor.FAIL and "AWS_REQUEST_PAYER=requester" in denied.detail, denied
    monkeypatch.setenv("AWS_REQUEST_PAYER", "requester")
    paid = doctor.check_input("s3://paying/scenes", None)
    assert paid.status == doctor.PASS and "(Requester Pays: AWS_REQUEST_PAYER=requester)" in paid.detail, paid
    assert "JPEG" in paid.detail  # the first scene was read and described


def test_the_job_clusters_a_requester_pays_bucket(ray_cluster, gate, monkeypatch, tmp_path, tiny_model_dir):
    """The listing in the driver and the reads in Ray's tasks, whose environment lacks the variable and the
    endpoint (the local Ray started before they were set): the filesystem carries them."""
    monkeypatch.setenv("AWS_REQUEST_PAYER", "requester")
    cfg = tiny_job_config("s3://paying/scenes", tmp_path / "out", tiny_model_dir, {"data.labels": "folders"})
    lines: list[str] = []
    metrics = run_cluster_job(cfg, echo=lines.append)
    assert (metrics["n_embedded"], metrics["n_skipped"]) == (9, 0)
    assert not any(line.startswith("[report] shown without a picture") for line in lines), lines  # all read
    assert gate.refused == 0 and gate.paid > 9  # the listing and every scene's read


def test_a_fine_tune_reads_its_source_from_a_requester_pays_bucket(
    ray_cluster, gate, monkeypatch, tmp_path, tiny_model_dir
):
    """Fine-tuning's source is listed, counted and read in Ray tasks (whose environment lacks the variable and the
    endpoint) through the same filesystem: every request accepted the charges, no scene was lost."""
    import json

    from scenecluster.config import FinetuneConfig, load_config
    from scenecluster.train import fit_backbone

    monkeypatch.setenv("AWS_REQUEST_PAYER", "requester")
    settings = {
        "sources": ["s3://paying/scenes"],
        "output": str(tmp_path / "tuned"),
        "feature.model": str(tiny_model_dir),
        "feature.image_size": 28,
        "batch_size": 4,
        "epochs": 1,
        "workers": 1,
        "resources.device": "cpu",
        "resources.torch_threads": 1,
        "val_fraction": 0.2,
    }
    backbone = fit_backbone(load_config(None, settings, model=FinetuneConfig), echo=lambda s: None)
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_val"] == 9 and metrics["skipped_train"] + metrics["skipped_val"] == 0
    assert (backbone / "model.safetensors").is_file()
    assert gate.refused == 0 and gate.paid > 9  # the listing, the count and every scene's read
