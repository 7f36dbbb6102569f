"""A two-node rehearsal of a cloud run, on this machine: ``scenecluster doctor`` against the cluster, then a
clustering job whose embedding actors run on both nodes, reading from and writing to a real S3 server. (And the
doctor told of no cluster, which checks the private Ray a job would start.)

The head (``ray start --head``) and a second node (``ray start --address``, with its own CPU and a custom
resource that marks it) are separate processes on loopback; each node gets one CPU of this 2-core machine and the
job asks for two half-CPU actors, so Ray Data's actor pool spreads one onto each node. Where the actors ran is read
back from Ray's state API.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from scenecluster.cli import sample_data_dir
from scenecluster.testing.rayhead import LocalRayHead, LocalRayNode
from tests.conftest import copy_sample

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUCKET = "rehearsal"
MARK = "rehearsal_node"  # the second node's custom resource, as a worker group's marker in cluster_configs/
PER_CLASS = 4  # 40 real EuroSAT scenes
JOB_TIMEOUT = int(os.environ.get("REHEARSAL_JOB_TIMEOUT", 420))

# Ray's state API, run as a client of the cluster (its own process: the token is read from its environment).
# Once the job is over its actors are DEAD, and Ray 2.60 keeps node_id for some of them only; their death record
# still names the node's address, which tells the two nodes apart here (127.0.0.2 and 127.0.0.3).
LIST_ACTORS = """
import json, sys
from ray.util.state import list_actors
actors = list_actors(address=sys.argv[1], filters=[("job_id", "=", sys.argv[2])], limit=10000,
                     raise_on_missing_output=False, detail=True)
print(json.dumps([{"class_name": a.class_name, "state": a.state, "node_id": a.node_id,
                   "node_ip": ((a.death_cause or {}).get("actor_died_error_context") or {}).get("node_ip_address")}
                  for a in actors]))
"""


@pytest.fixture(scope="module")
def two_nodes():
    with LocalRayHead(num_cpus=1, multi_node=True) as head, LocalRayNode(head, num_cpus=1, resources={MARK: 1}) as node:
        yield head, node


@pytest.fixture(scope="module")
def s3_scenes(s3_server, tmp_path_factory):
    scenes = copy_sample(tmp_path_factory.mktemp("rehearsal-scenes"), per_class=PER_CLASS)
    s3_server.create_bucket(BUCKET)
    assert len(s3_server.upload_folder(scenes, BUCKET, "in")) == 10 * PER_CLASS
    return s3_server


def _table(stdout: str) -> list[list[str]]:
    """The doctor's rows as [check, where, status, detail], from the columns' two-space gaps."""
    lines = [line for line in stdout.splitlines()[2:] if line.strip()]
    return [re.split(r"\s{2,}", line.strip(), maxsplit=3) for line in lines]


def _doctor(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``scenecluster doctor ARGS`` in a fresh process, as a user runs it before a long job."""
    cmd = [sys.executable, "-m", "scenecluster.cli", "doctor", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_doctor_reports_both_nodes_and_the_stores(two_nodes, s3_scenes, tiny_model_dir):
    head, node = two_nodes
    stores = ["--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/out/doctor", "--model", str(tiny_model_dir)]
    proc = _doctor("--address", head.gcs_address, *stores, env={**head.env(), **s3_scenes.env()}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = _table(proc.stdout)
    nodes = [r for r in rows if r[0] == "node"]
    assert sorted(r[1].split()[0] for r in nodes) == ["head", MARK], proc.stdout
    assert any(node.node_id[:8] in r[1] and f"{MARK} 1" in r[3] for r in nodes), proc.stdout
    for group in ("head", MARK):
        assert ["package", group, "PASS"] in [r[:3] for r in rows], proc.stdout
        assert ["ray version", group, "PASS"] in [r[:3] for r in rows], proc.stdout
    for check in ("input readable", "output writable", "model loadable"):
        assert [r[2] for r in rows if r[0] == check] == ["PASS"], proc.stdout
    assert not s3_scenes.boto3_client().list_objects_v2(Bucket=BUCKET, Prefix="out/doctor").get("Contents")


def test_doctor_without_an_address_checks_the_private_ray_a_job_would_start():
    # A job told of no cluster starts a private Ray (scenecluster.raycluster); the doctor looked for a running one
    # instead (`auto`) and failed ("Could not find any running Ray instance") where the job would have run. The
    # rehearsal's nodes may be running beside it: `auto` would have joined them, a private Ray ignores them.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = _doctor("--input", str(sample_data_dir()), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [r[:3] for r in _table(proc.stdout)]
    assert ["ray reachable", "local", "SKIP"] in rows and ["ray connect", "local", "PASS"] in rows, proc.stdout
    assert ["package", "head", "PASS"] in rows and ["input readable", str(sample_data_dir()), "PASS"] in rows


def test_doctor_fails_on_a_store_it_may_not_write(two_nodes, s3_scenes):
    head, _ = two_nodes
    env = {**head.env(), **s3_scenes.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    proc = _doctor("--address", "127.0.0.1:1", "--output", f"s3://{BUCKET}/out/doctor", env=env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r[0]: r for r in _table(proc.stdout)}
    assert rows["ray reachable"][2] == "FAIL" and rows["output writable"][2] == "FAIL", proc.stdout


def test_cluster_job_embeds_on_both_nodes(two_nodes, s3_scenes, tiny_model_dir, tmp_path):
    head, node = two_nodes
    config = {
        "output": f"s3://{BUCKET}/out/run1",
        "data": {"input": f"s3://{BUCKET}/in/", "labels": "folders", "endpoint_url": s3_scenes.endpoint_url},
        "embed": {"model": str(tiny_model_dir), "image_size": 28, "batch_size": 8},
        "reduce": {"method": "pca"},  # the placement is under test, not UMAP: no numba compile in the driver
        "cluster": {"n_components": 10},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    job_id = f"rehearsal-{uuid.uuid4().hex[:8]}"
    entrypoint = [
        "python",
        "rayjobs/cluster.py",
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--set",
        "embed.num_actors=2",
        "--set",
        "embed.actor_cpus=0.5",
        "--set",
        "embed.chunk_size=10",  # 4 parts
        "--set",
        "embed.task_parts=0",  # by the actor pool: a small run's parts go to Ray tasks, which Ray may pack on one node
    ]
    try:
        proc = head.submit_job(job_id, REPO, entrypoint, env_vars=s3_scenes.env(), timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        logs = head.ray("job", "logs", "--address", head.dashboard_url, job_id, timeout=60)
        head.ray("job", "stop", "--address", head.dashboard_url, job_id, timeout=60)
        pytest.fail(f"the job did not finish in {JOB_TIMEOUT} s; its log ends:\n{logs.stdout[-6000:]}")
    info = head.job_info(job_id)
    assert info["status"] == "SUCCEEDED", (proc.stdout + proc.stderr)[-4000:]

    listed = subprocess.run(
        [sys.executable, "-c", LIST_ACTORS, head.dashboard_url, info["job_id"]],
        env=head.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    actors = json.loads(listed.stdout)
    embedders = [a for a in actors if a["class_name"] == "MapWorker(MapBatches(PartEmbedder))"]
    assert len(embedders) == 2, actors
    nodes = head.alive_nodes()
    by_ip = {n["node_ip"]: n["node_id"] for n in nodes}
    head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
    assert {a["node_id"] or by_ip.get(a["node_ip"]) for a in embedders} == {head_id, node.node_id}, (actors, nodes)

    s3 = s3_scenes.boto3_client()
    keys = {o["Key"].rsplit("/", 1)[-1] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/run1/")["Contents"]}
    assert {"embeddings.parquet", "assignments.parquet", "metrics.json", "report.html"} <= keys
    # the local model folder was copied beside the results, and both nodes' actors loaded that copy: on a cluster
    # whose nodes share no disk the head's folder would be missing on the other node
    s3.head_object(Bucket=BUCKET, Key="out/run1/model/model.safetensors")
    metrics = json.loads(s3.get_object(Bucket=BUCKET, Key="out/run1/metrics.json")["Body"].read())
    assert metrics["n_embedded"] == 10 * PER_CLASS
