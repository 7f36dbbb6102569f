"""``ray job submit`` of rayjobs/cluster.py against a real local Ray head and a real S3 store.

120 real EuroSAT scenes of the sample the package ships (4 classes x 30, so that CI runs these tests too: the
shared datasets are only on the development machines) go to SeaweedFS twice: as loose files under ``loose/`` and
as WebDataset-style tar shards under ``shards/``. The head is started here with token authentication (a
random ``RAY_AUTH_TOKEN``) on free ports and stopped here, also when a test fails.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import yaml

from scenecluster.testing.rayhead import LocalRayHead

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLASSES = 4
PER_CLASS = 30
BUCKET = "eurosat"
JOB_TIMEOUT = 240


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, sample_dir) -> Path:
    dest = tmp_path_factory.mktemp("eurosat120")
    for cdir in sorted(p for p in sample_dir.iterdir() if p.is_dir())[:CLASSES]:
        (dest / cdir.name).mkdir()
        for img in sorted(cdir.glob("*.jpg"))[:PER_CLASS]:
            shutil.copy2(img, dest / cdir.name / img.name)
    return dest


@pytest.fixture(scope="module")
def s3_scenes(s3_server, scenes):
    s3_server.create_bucket(BUCKET)
    loose = s3_server.upload_folder(scenes, BUCKET, "loose")
    shards = s3_server.upload_tar_shards(scenes, BUCKET, "shards", images_per_shard=PER_CLASS)
    assert len(loose) == CLASSES * PER_CLASS and len(shards) == 4
    return s3_server


@pytest.fixture(scope="module")
def ray_head():
    with LocalRayHead(num_cpus=2) as head:
        yield head


def _submit(head: LocalRayHead, s3, config: dict, tmp_path: Path) -> tuple[str, str]:
    """Submit rayjobs/cluster.py with ``config``; return (final status, client output)."""
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    job_id = f"test-cluster-{uuid.uuid4().hex[:8]}"
    entrypoint = ["python", "rayjobs/cluster.py", "--config", str(cfg_file)]
    try:
        proc = head.submit_job(job_id, REPO, entrypoint, env_vars=s3.env(), timeout=JOB_TIMEOUT)
        output = proc.stdout + proc.stderr
    except Exception:
        # the client timing out leaves the job running: stop it by id
        head.ray("job", "stop", "--address", head.dashboard_url, job_id, timeout=60)
        raise
    final = head.job_info(job_id)["status"]
    return final, output


def _config(s3, input_uri: str, output: str, model: Path) -> dict:
    return {
        "output": output,
        "data": {"input": input_uri, "labels": "folders", "endpoint_url": s3.endpoint_url},
        "embed": {"model": str(model), "image_size": 28, "batch_size": 32, "actor_cpus": 1.0},
        "reduce": {"n_neighbors": 15},
        "cluster": {"n_components": 10},
    }


def _metrics_from_output(output: str) -> dict:
    """The job prints its metrics as an indented JSON object last; find it in the client's log stream."""
    start = output.rfind('\n{\n  "n_images"')
    assert start >= 0, output[-3000:]
    text = output[start:]
    end = text.find("\n}") + 2
    return json.loads(text[:end])


def test_submit_cluster_job_s3_loose_files_to_local_output(ray_head, s3_scenes, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    status, output = _submit(
        ray_head, s3_scenes, _config(s3_scenes, f"s3://{BUCKET}/loose/", str(out), tiny_model_dir), tmp_path
    )
    assert status == "SUCCEEDED", output[-4000:]
    metrics = _metrics_from_output(output)
    assert metrics["n_images"] == CLASSES * PER_CLASS and metrics["n_skipped"] == 0
    for name in ("embeddings.parquet", "assignments.parquet", "metrics.json", "report.html", "config.yaml"):
        assert (out / name).is_file(), name
    written = json.loads((out / "metrics.json").read_text())
    assert written["n_embedded"] == CLASSES * PER_CLASS and written["n_clusters"] >= 1
    assert 0.0 <= written["nmi"] <= 1.0


def test_submit_with_a_bad_setting_fails_the_job(ray_head, s3_scenes, tiny_model_dir, tmp_path):
    config = _config(s3_scenes, f"s3://{BUCKET}/no-such-prefix/", str(tmp_path / "out"), tiny_model_dir)
    status, output = _submit(ray_head, s3_scenes, config, tmp_path)
    assert status == "FAILED"
    assert "rayjobs/cluster: error: input 's3://eurosat/no-such-prefix/' does not exist" in output


def test_submit_cluster_job_on_tar_shards_with_s3_output(ray_head, s3_scenes, tiny_model_dir, tmp_path):
    output_uri = f"s3://{BUCKET}/out/run1"
    status, output = _submit(
        ray_head, s3_scenes, _config(s3_scenes, f"s3://{BUCKET}/shards/", output_uri, tiny_model_dir), tmp_path
    )
    assert status == "SUCCEEDED", output[-4000:]
    listed = s3_scenes.boto3_client().list_objects_v2(Bucket=BUCKET, Prefix="out/run1/")
    keys = {o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", [])}
    assert {"embeddings.parquet", "assignments.parquet", "metrics.json", "report.html"} <= keys
    body = s3_scenes.boto3_client().get_object(Bucket=BUCKET, Key="out/run1/metrics.json")["Body"].read()
    metrics = json.loads(body)
    assert metrics["n_embedded"] == CLASSES * PER_CLASS
    assert "nmi" in metrics  # the <class>/<image> member names of the shards carried the labels
    # the report read its thumbnails of shard members from S3 by their recorded byte ranges, not one was missed
    assert "[report] shown without a picture" not in output, output[-4000:]
    page = s3_scenes.boto3_client().get_object(Bucket=BUCKET, Key="out/run1/report.html")["Body"].read().decode()
    assert "unreadable" not in page and "data:image/webp;base64," in page
