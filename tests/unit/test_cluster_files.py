"""The cluster files would run what the tests run: the launcher YAML is valid for Ray's own schema and installs
nothing at start-up, every ``rayjobs/`` entrypoint has a KubeRay manifest that names files that exist, and the
image and both kinds of cluster pin the Ray and torch of ``constraints.txt``. (hadolint and checkov:
``test_cluster_lint.py``.)"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_CONFIGS = ROOT / "cluster_configs"
LAUNCHERS = sorted(CLUSTER_CONFIGS.glob("*.yaml"))
MANIFESTS = sorted((CLUSTER_CONFIGS / "kuberay").glob("*.yaml"))
DOCKERFILE = ROOT / "infra" / "Dockerfile"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
# Anything that installs or fetches code at start-up, and ways to hide a failed command.
INSTALLERS = re.compile(r"\b(pip3?|conda|mamba|uv|apt(-get)?|yum|dnf|git\s+clone|curl|wget)\b|\|\|\s*true|OWNER")


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def entrypoints() -> set[str]:
    return {p.stem for p in (ROOT / "rayjobs").glob("*.py") if not p.name.startswith("_")}


def ray_schema() -> dict:
    """``ray/autoscaler/ray-schema.json`` from the installed ray package, found without importing ray."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations, "ray is not installed"
    return json.loads((Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json").read_text())


def load_generator():
    """``cluster_configs/generate_kuberay.py``, a script rather than a package module (it is repository tooling)."""
    name = "_scenecluster_generate_kuberay"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CLUSTER_CONFIGS / "generate_kuberay.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def rayjob(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"{path.name}: expected one RayJob, found {len(jobs)}"
    return jobs[0]


def launcher_image() -> str:
    return yaml.safe_load((CLUSTER_CONFIGS / "aws-gpu.yaml").read_text())["docker"]["image"]


# ------------------------------------------------------------------------------------------ launcher YAML
def test_there_is_a_launcher_yaml_and_a_manifest_per_entrypoint():
    assert LAUNCHERS and MANIFESTS
    assert {p.stem for p in MANIFESTS} == entrypoints()


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_is_valid_against_rays_schema(path):
    import jsonschema

    jsonschema.validate(yaml.safe_load(path.read_text()), ray_schema())


def test_the_schema_check_is_not_vacuous():
    import jsonschema

    config = yaml.safe_load((CLUSTER_CONFIGS / "aws-gpu.yaml").read_text())
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_embed"]["min_worker"] = 0  # a typo Ray would otherwise ignore at `ray up`
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(bad, ray_schema())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_installs_nothing_at_start_up(path):
    config = yaml.safe_load(path.read_text())
    assert "OWNER" not in path.read_text() and "|| true" not in path.read_text()
    commands = [(key, cmd) for key in COMMAND_KEYS for cmd in config.get(key) or []]
    for name, node_type in config["available_node_types"].items():
        commands += [(f"{name}.{key}", cmd) for key in COMMAND_KEYS for cmd in node_type.get(key) or []]
    offending = [(key, cmd) for key, cmd in commands if INSTALLERS.search(cmd)]
    assert not offending, f"start-up commands that install or hide failures: {offending}"
    assert not config.get("setup_commands") and not config.get("file_mounts")
    assert re.search(r":[\w.-]+$", config["docker"]["image"]) and not config["docker"]["image"].endswith(":latest")


def test_launcher_has_embed_train_and_tune_groups():
    config = yaml.safe_load((CLUSTER_CONFIGS / "aws-gpu.yaml").read_text())
    types = config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = ("g4dn", "g5", "g6", "p3", "p4", "p5")
    for name, gpu in (("gpu_embed", True), ("gpu_train", True), ("cpu_tune", False)):
        node = workers[name]
        assert node["node_config"]["InstanceType"].startswith(gpu_types) == gpu, name
        assert node["min_workers"] == 0 < node["max_workers"], name
        assert node["resources"] == {name: 1}, f"{name} needs its marker resource for `scenecluster doctor`"
    spot = {n for n, t in workers.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType")}
    assert spot == {"gpu_embed", "cpu_tune"}


# ------------------------------------------------------------------------------------------- KubeRay
def test_kuberay_manifests_are_generated_and_current():
    assert load_generator().main(["--check"]) == 0, "run: python cluster_configs/generate_kuberay.py"


def test_generator_gives_a_new_entrypoint_a_manifest(tmp_path):
    gen = load_generator()
    (tmp_path / "rayjobs").mkdir()
    for name in ("_entry.py", "cluster.py", "relabel.py"):
        (tmp_path / "rayjobs" / name).write_text("")
    assert gen.stages(tmp_path) == ["cluster", "relabel"]
    job = gen.rayjob("relabel", img="img:1", ray="2.60.0")  # a stage without an entry in STAGES
    assert job["spec"]["entrypoint"].endswith("rayjobs/relabel.py --config /config/relabel.yaml")
    assert [g["groupName"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]] == list(gen.GROUPS)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_names_an_entrypoint_and_a_config_that_exist(path):
    job = rayjob(path)
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and "--config" in argv
    script = Path(argv[1])
    assert script.parent.name == "rayjobs" and (ROOT / "rayjobs" / script.name).is_file(), argv[1]
    assert script.stem == path.stem
    config = Path(argv[argv.index("--config") + 1])
    assert (ROOT / "rayjobs" / "configs" / config.name).is_file(), f"{config.name} is not in rayjobs/configs"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts[str(config.parent)] in {v["name"] for v in head["volumes"]}
    assert f"--from-file={config.name}=rayjobs/configs/{config.name}" in path.read_text()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_pins_the_ray_of_constraints_and_the_launchers_image(path):
    spec = rayjob(path)["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == pins()["ray"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {launcher_image()}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_worker_groups_autoscale_from_zero(path):
    spec = rayjob(path)["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == 0 < group["maxReplicas"], group["groupName"]
        pod = group["template"]["spec"]
        gpus = pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        assert group["groupName"].startswith("gpu") == bool(gpus), group["groupName"]
        assert pod["securityContext"]["runAsNonRoot"] is True


# ------------------------------------------------------------------------------------------- the image
def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))


def test_image_is_rays_gpu_image_of_the_pinned_ray():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert froms == ["rayproject/ray:${RAY_VERSION}-py311-${CUDA_TAG}"]
    args = dockerfile_args()
    assert args["RAY_VERSION"] == pins()["ray"]
    assert re.fullmatch(r"cu\d{3}", args["CUDA_TAG"])


def test_image_installs_the_torch_line_of_constraints_under_constraints():
    text = DOCKERFILE.read_text()
    assert dockerfile_args()["TORCH_VERSION"] == pins()["torch"]
    installs = re.findall(r"pip install ([^\\&\n]+)", text)
    assert installs and all("-c constraints.txt" in cmd for cmd in installs), installs
    assert '"torch==${TORCH_VERSION}"' in text and '".[gpu]"' in text


def test_image_runs_as_a_non_root_user_and_holds_no_secrets():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    names = re.findall(r"^(?:ENV|ARG)\s+(.*)$", text, re.MULTILINE)
    assert not [n for n in names if re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", n, re.IGNORECASE)]
    sources = [line.split()[-2] for line in re.findall(r"^COPY .*$", text, re.MULTILINE)]
    assert "." not in sources, "copy named files only: the whole context may hold credentials"


def test_every_gpu_extra_package_is_pinned_for_the_image():
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    names = {re.split(r"[<>=!~ ]", req, maxsplit=1)[0] for req in extra}
    assert names <= set(pins()), f"unpinned in constraints.txt: {names - set(pins())}"
