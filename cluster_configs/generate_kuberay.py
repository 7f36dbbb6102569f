"""Write ``cluster_configs/kuberay/<stage>.yaml``: a KubeRay ``RayJob`` (and the ``NetworkPolicy`` of its pods) for
every ``rayjobs/<stage>.py``.

    python cluster_configs/generate_kuberay.py           # rewrite the manifests
    python cluster_configs/generate_kuberay.py --check   # exit 1 when one is missing or stale (a test runs this)

All manifests come from the one template in :func:`rayjob`, so they cannot drift apart, and the list of stages is
read from the entrypoints in ``rayjobs/`` (every ``*.py`` not starting with ``_``), so a new entrypoint gets a
manifest on the next run. What differs per stage is in :data:`STAGES`: the example config it mounts and the worker
groups it scales. A stage without an entry mounts ``rayjobs/configs/<stage>.yaml`` and may use every group (they
all start at 0 replicas, so a group a job never asks for costs nothing).

The image is the launcher's (``aws-gpu.yaml``'s ``docker.image``) and ``rayVersion`` is ``constraints.txt``'s ray
pin, read here, so the two kinds of cluster run the same build of the same Ray.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "cluster_configs" / "kuberay"
APP_DIR = "/home/ray/scenecluster"  # where infra/Dockerfile puts the repository
NAMESPACE = "scenecluster"
SERVICE_ACCOUNT = "scenecluster-ray"  # IRSA-bound to infra/terraform's scenecluster-ray-k8s role


@dataclass(frozen=True)
class Group:
    """An autoscaled worker group: its pod size, the most replicas, spot or on-demand, and its marker resource."""

    cpu: int
    memory: str
    gpu: int
    max_replicas: int
    spot: bool
    why: str


GROUPS: dict[str, Group] = {
    "gpu-embed": Group(7, "28Gi", 1, 8, True, "embedding actors: a lost node costs one chunk, a rerun resumes"),
    "gpu-train": Group(7, "28Gi", 1, 4, False, "fine-tuning: a reclaimed node restarts the group from a checkpoint"),
    "cpu-tune": Group(15, "28Gi", 0, 4, True, "Tune trials: short, and Tune retries a trial whose node went"),
}


@dataclass(frozen=True)
class Stage:
    config: str
    groups: tuple[str, ...]


STAGES: dict[str, Stage] = {
    "cluster": Stage("cluster-s3.yaml", ("gpu-embed",)),
    "finetune": Stage("finetune.yaml", ("gpu-train",)),
    "tune": Stage("tune.yaml", ("cpu-tune",)),
    "pipeline": Stage("pipeline.yaml", ("gpu-train", "gpu-embed")),
    "assign": Stage("assign.yaml", ("gpu-embed",)),
    "benchmark": Stage("benchmark.yaml", ("gpu-train", "gpu-embed")),
}

# checkov's Kubernetes checks, skipped on every Ray pod, each with its reason (tests/unit/test_cluster_lint.py
# runs checkov on the pod templates, which it cannot find inside a RayJob by itself).
CHECKOV_SKIPS = {
    "CKV_K8S_8": "KubeRay adds the liveness probe of every Ray container itself (raylet and GCS health)",
    "CKV_K8S_9": "KubeRay adds the readiness probe of every Ray container itself",
    "CKV_K8S_22": "Ray writes its session, spill and log files under /tmp and its caches under the home folder",
    "CKV_K8S_40": "the Ray image's user is uid 1000, which owns its conda environment; it runs non-root, no escalation",
    "CKV_K8S_43": "pinned by an immutable tag (the ECR repository refuses to overwrite one), not a digest",
}


def stages(root: Path = ROOT) -> list[str]:
    """The entrypoints of ``rayjobs/``: every ``<stage>.py`` whose name does not start with ``_``."""
    return sorted(p.stem for p in (root / "rayjobs").glob("*.py") if not p.name.startswith("_"))


def marker(group: str) -> str:
    """The custom resource (one unit) that every node of ``group`` carries, as the launcher's node types do."""
    return group.replace("-", "_")


def stage_settings(stage: str) -> Stage:
    return STAGES.get(stage, Stage(f"{stage}.yaml", tuple(GROUPS)))


def ray_version(root: Path = ROOT) -> str:
    match = re.search(r"^ray==(\S+)", (root / "constraints.txt").read_text(), re.MULTILINE)
    if not match:
        raise SystemExit("constraints.txt pins no ray version")
    return match.group(1)


def image(root: Path = ROOT) -> str:
    return yaml.safe_load((root / "cluster_configs" / "aws-gpu.yaml").read_text())["docker"]["image"]


def _container(name: str, img: str, cpu: int, memory: str, gpu: int, mounts: list[dict]) -> dict[str, Any]:
    """A Ray container: fixed requests equal to limits, non-root, no privilege escalation, no capabilities."""
    resources = {"cpu": str(cpu), "memory": memory, **({"nvidia.com/gpu": str(gpu)} if gpu else {})}
    return {
        "name": name,
        "image": img,
        "imagePullPolicy": "Always",
        "workingDir": APP_DIR,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }


def _pod(stage: str, container: dict, volumes: list[dict], *, token: bool, extra: dict | None = None) -> dict:
    """A pod template around ``container``: the IRSA service account, non-root and seccomp, checkov's skips, and
    the labels :func:`network_policy` selects."""
    annotations = {f"checkov.io/skip{i}": f"{check}={why}" for i, (check, why) in enumerate(CHECKOV_SKIPS.items(), 1)}
    if token:  # the head's autoscaler sidecar talks to the Kubernetes API with the service account's token
        annotations[f"checkov.io/skip{len(CHECKOV_SKIPS) + 1}"] = (
            "CKV_K8S_38=the head runs KubeRay's autoscaler, which scales the worker groups through the Kubernetes API")
    spec = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": token,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
        **(extra or {}),
    }
    return {"metadata": {"labels": _labels(stage), "annotations": annotations}, "spec": spec}


def _labels(stage: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "scenecluster", "app.kubernetes.io/component": stage}


def _worker_group(stage: str, name: str, img: str) -> dict[str, Any]:
    g = GROUPS[name]
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
    extra: dict[str, Any] = {
        "nodeSelector": {"eks.amazonaws.com/capacityType": "SPOT" if g.spot else "ON_DEMAND"},
    }
    if g.gpu:
        extra["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    container = _container("ray-worker", img, g.cpu, g.memory, g.gpu, [{"name": "dshm", "mountPath": "/dev/shm"}])
    return {
        "groupName": name,
        "replicas": 0,
        "minReplicas": 0,
        "maxReplicas": g.max_replicas,
        # the marker resource lets `scenecluster doctor` probe one node of each group
        "rayStartParams": {"resources": '"' + json.dumps({marker(name): 1}).replace('"', '\\"') + '"'},
        "template": _pod(stage, container, [shm], token=False, extra=extra),
    }


def rayjob(stage: str, *, img: str, ray: str) -> dict[str, Any]:
    """The ``RayJob`` of ``stage``: its entrypoint on an autoscaled cluster deleted when the job ends."""
    settings = stage_settings(stage)
    config_map = {"name": "job-config", "configMap": {"name": f"scenecluster-{stage}-config"}}
    head = _container("ray-head", img, 8, "32Gi", 0, [{"name": "job-config", "mountPath": "/config"}])
    head["ports"] = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": f"scenecluster-{stage}", "namespace": NAMESPACE, "labels": _labels(stage)},
        "spec": {
            "entrypoint": f"python {APP_DIR}/rayjobs/{stage}.py --config /config/{settings.config}",
            "runtimeEnvYAML": 'env_vars:\n  AWS_DEFAULT_REGION: us-east-1\n  RAY_USAGE_STATS_ENABLED: "0"\n',
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "activeDeadlineSeconds": 86400,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": {
                "rayVersion": ray,
                "authOptions": {"mode": "token"},  # KubeRay 1.5.1+: a generated token on every Ray container
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600,
                                      "securityContext": {"allowPrivilegeEscalation": False,
                                                          "capabilities": {"drop": ["ALL"]}}},
                "headGroupSpec": {
                    # the head runs the driver (UMAP and the mixture) and coordinates; Ray schedules no task on it
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(stage, head, [config_map], token=True),
                },
                "workerGroupSpecs": [_worker_group(stage, name, img) for name in settings.groups],
            },
        },
    }


def network_policy(stage: str) -> dict[str, Any]:
    """Ray's pods of ``stage`` take connections from pods of their own namespace (each other, the job submitter),
    and on the dashboard port (token-authenticated) from the KubeRay operator, wherever it runs."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"scenecluster-{stage}", "namespace": NAMESPACE, "labels": _labels(stage)},
        "spec": {
            "podSelector": {"matchLabels": _labels(stage)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {}}]},
                {"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": 8265}]},
            ],
        },
    }


def header(stage: str) -> str:
    settings = stage_settings(stage)
    groups = "".join(f"#   {n} ({'spot' if GROUPS[n].spot else 'on-demand'}): {GROUPS[n].why}\n"
                     for n in settings.groups)
    return (
        f"# GENERATED by cluster_configs/generate_kuberay.py from one template: edit that, then rerun it.\n"
        f"# KubeRay RayJob: runs rayjobs/{stage}.py on a cluster of its own (a CPU head that runs the driver, and\n"
        f"# worker groups autoscaled from 0) and deletes the cluster when the job ends. Worker groups:\n"
        f"{groups}"
        f"# Spot groups select EKS spot nodes (eks.amazonaws.com/capacityType). infra/README.md has the set-up.\n"
        f"#   kubectl -n {NAMESPACE} create configmap scenecluster-{stage}-config \\\n"
        f"#     --from-file={settings.config}=rayjobs/configs/{settings.config}\n"
        f"#   kubectl apply -f cluster_configs/kuberay/{stage}.yaml\n"
        f"#   kubectl -n {NAMESPACE} logs -f job/scenecluster-{stage}\n"
    )


def render(stage: str, root: Path = ROOT) -> str:
    docs = [rayjob(stage, img=image(root), ray=ray_version(root)), network_policy(stage)]
    body = yaml.safe_dump_all(docs, sort_keys=False, width=120)
    return header(stage) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report missing, stale or extra manifests")
    args = parser.parse_args(argv)
    wanted = {OUT_DIR / f"{stage}.yaml": render(stage) for stage in stages()}
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    extra = sorted(set(OUT_DIR.glob("*.yaml")) - set(wanted))
    if args.check:
        for path in [*stale, *extra]:
            print(f"{path.relative_to(ROOT)}: {'no entrypoint' if path in extra else 'missing or stale'}")
        return 1 if stale or extra else 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.write_text(wanted[path])
    for path in extra:
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
