"""``scenecluster doctor``: check a Ray cluster, the stores and the model before a long run, and print a table.

A clustering or fine-tuning job that fails an hour in, on a Ray version that differs from the client's, a GPU
node whose image lacks the package or cuML, or an S3 prefix it may not write, wastes that hour and the cluster's
cost. Each of these shows in seconds when asked directly, so the doctor asks, one row per finding:

- Ray reachable at the address, and the Ray of every node type equal to this client's;
- the nodes Ray sees (alive), with their CPUs, GPUs and custom resources;
- on one node of each node type (head, and each worker group, told apart by their custom resources), a task that
  imports scenecluster at this driver's version, and on GPU node types uses CUDA torch and cuML;
- the input prefix readable and the output prefix writable with this process's credentials (``AWS_*``);
- the model loadable.

Exit status 0 when nothing failed (skipped rows are fine), 1 when a check failed. Ray and torch are imported
inside the checks only, so the module imports without them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scenecluster.errors import InputError, one_line
from scenecluster.pixels import PixelSpec

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
_DESCRIBE_MAX_BYTES = 256 * 2**20  # a file larger than this is no tile: it is read, not decoded
_DEFAULT_PIXELS = PixelSpec()
_DESCRIBE_TRIES = 3  # scenes tried before the input check fails: one corrupt first scene is no broken archive
_NOT_SCENES = ("license", "readme", ".md", ".txt", ".json", ".xml", ".csv")  # beside the scenes, not them
# Resources every node has; any other (not node:<ip>, not accelerator_type:<x>) marks a node type.
_STANDARD_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
_HEAD_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class Check:
    """One row of the table: what was checked, where, and what was found."""

    name: str
    where: str
    status: str
    detail: str


@dataclass(frozen=True)
class DoctorOptions:
    """What to check. ``None`` for input, output or model skips that check."""

    address: str | None = None
    input: str | None = None
    output: str | None = None
    model: str | None = None
    endpoint_url: str | None = None
    timeout: float = 120.0
    pixels: PixelSpec = _DEFAULT_PIXELS  # how the input's first scene is read and described


# ------------------------------------------------------------------------------------------------ table
def format_table(checks: Sequence[Check]) -> str:
    """The rows as a plain-text table with a header, columns padded to their widest cell."""
    rows = [("CHECK", "WHERE", "STATUS", "DETAIL"), *((c.name, c.where, c.status, c.detail) for c in checks)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in (*widths, len("DETAIL"))))
    return "\n".join(lines)


def exit_code(checks: Sequence[Check]) -> int:
    """1 when any check failed, else 0: skipped checks were not asked for, so they do not fail the run."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def _guard(name: str, where: str, check: Callable[[], Check]) -> Check:
    """Run one check; an exception it did not expect becomes a FAIL row naming it, so one check never hides
    the others."""
    try:
        return check()
    except Exception as exc:
        return Check(name, where, FAIL, one_line(exc, with_type=True))


# ------------------------------------------------------------------------------------------ Ray cluster
def resolve_address(address: str | None) -> str:
    """The Ray a job would run on: the option, else ``RAY_ADDRESS``, else ``local``, the private Ray a job starts on
    this machine without either (:func:`scenecluster.raycluster.ensure_ray`), which the doctor starts to check too.
    Why not ``auto``: a job never looks for a cluster it was not told of, so a doctor that did failed ("Could not
    find any running Ray instance") where the job would run."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def check_reachable(address: str, timeout: float = 5.0) -> Check:
    """A TCP connection to ``host:port`` before ``ray.init``, which would otherwise retry for a minute or more
    on an address where nothing listens. ``auto`` and ``local`` have no host to try and are left to ``ray.init``;
    a name without a port is no address (``ray.init`` would raise a ValueError deep inside)."""
    hostport = address.split("://", 1)[-1]
    if address == "local":
        return Check(
            "ray reachable", address, SKIP, "a private Ray on this machine, as a job told of no cluster starts one"
        )
    if address == "auto":
        return Check("ray reachable", address, SKIP, "no host:port to try; ray.init looks the cluster up")
    if ":" not in hostport:
        return Check("ray reachable", address, FAIL, "not an address: give host:port, ray://host:port or auto")
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        return Check("ray reachable", address, FAIL, f"nothing answers on {hostport}: {one_line(exc)}")
    return Check("ray reachable", address, PASS, f"{hostport} answers")


def connect(address: str) -> Check:
    """Join the cluster as a driver. Ray itself refuses a client whose Ray or Python version differs from the
    cluster's; that refusal is reported as the version check failing."""
    import logging

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    private = address == "local"  # started here as a job starts its own: without the dashboard
    try:
        ray.init(
            address=address,
            logging_level=logging.ERROR,
            log_to_driver=False,
            **({"include_dashboard": False} if private else {}),
        )
    except Exception as exc:
        name = "ray version" if "version" in str(exc).lower() else "ray connect"
        return Check(name, address, FAIL, one_line(exc, with_type=True))
    if private:
        return Check("ray connect", address, PASS, f"started a private Ray {ray.__version__}, as a job would")
    return Check("ray connect", address, PASS, f"joined as a driver with Ray {ray.__version__}")


def node_group(node: dict[str, Any]) -> str:
    """The node type of a node from :func:`ray.nodes`: ``head``, else its custom resources (the launcher's and
    KubeRay's worker groups each carry one), else ``gpu-worker`` or ``cpu-worker``."""
    resources = node.get("Resources", {})
    if _HEAD_RESOURCE in resources:
        return "head"
    custom = sorted(k for k in resources if k not in _STANDARD_RESOURCES and not k.startswith(("node:", "accel")))
    if custom:
        return "+".join(custom)
    return "gpu-worker" if resources.get("GPU") else "cpu-worker"


def check_nodes(nodes: list[dict[str, Any]]) -> list[Check]:
    """One row per alive node with what Ray sees on it, and a total."""
    alive = [n for n in nodes if n.get("Alive")]
    rows = []
    for node in sorted(alive, key=lambda n: (node_group(n) != "head", node_group(n), n["NodeID"])):
        res = node.get("Resources", {})
        custom = {k: v for k, v in res.items() if k not in _STANDARD_RESOURCES and not k.startswith("node:")}
        detail = f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"
        detail += "".join(f", {k} {v:g}" for k, v in sorted(custom.items()))
        where = f"{node_group(node)} {node.get('NodeManagerAddress', '?')} {node['NodeID'][:8]}"
        rows.append(Check("node", where, PASS, detail))
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in alive)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in alive)
    status = PASS if alive else FAIL
    rows.append(Check("nodes", "cluster", status, f"{len(alive)} alive: {cpus:g} CPU, {gpus:g} GPU in all"))
    return rows


# ------------------------------------------------------------------------------------ per-node-type probe
def _line(exc: BaseException) -> str:
    """``Type: first line`` of an exception; the probe's own copy, since the node may lack scenecluster."""
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def probe_node(want_gpu: bool) -> dict[str, Any]:
    """What a node's Python offers, run there as a Ray task (and callable directly, e.g. on a bare GPU host).

    Shipped by value (:func:`probe_groups`) and free of scenecluster imports at call time except the one it
    tests, so a node without the package reports that instead of failing to load the probe. Each part is tried
    on its own so one missing piece does not hide the others.
    """
    import platform

    found: dict[str, Any] = {"python": platform.python_version()}
    try:
        import ray

        found["ray"] = ray.__version__
    except Exception as exc:
        found["ray_error"] = _line(exc)
    try:
        import scenecluster

        found["scenecluster"] = scenecluster.__version__
    except Exception as exc:
        found["scenecluster_error"] = _line(exc)
    if want_gpu:
        found.update(_probe_cuda())
    return found


def _probe_cuda() -> dict[str, Any]:
    """CUDA torch and cuML, each used once on the GPU (a matrix product, a 2-cluster k-means): importable is not
    enough when the driver or the CUDA runtime does not match."""
    found: dict[str, Any] = {}
    try:
        import torch

        x = torch.ones(256, 256, device="cuda")
        assert float((x @ x).sum()) == 256.0**3, "a 256 x 256 matrix product on the GPU came out wrong"
        found["torch"] = f"torch {torch.__version__} CUDA {torch.version.cuda} on {torch.cuda.get_device_name(0)}"
    except Exception as exc:
        found["torch_error"] = _line(exc)
    try:
        import cuml
        import cupy
        from cuml.cluster import KMeans

        points = cupy.concatenate([cupy.zeros((50, 2)), cupy.ones((50, 2))]).astype(cupy.float32)
        labels = KMeans(n_clusters=2, random_state=0).fit_predict(points)
        assert len(set(cupy.asnumpy(labels).tolist())) == 2, "k-means on the GPU did not find two clusters"
        found["cuml"] = f"cuML {cuml.__version__}, CuPy {cupy.__version__}: k-means ran on the GPU"
    except Exception as exc:
        found["cuml_error"] = _line(exc)
    return found


def probe_groups(nodes: list[dict[str, Any]], timeout: float) -> dict[str, dict[str, Any]]:
    """Run :func:`probe_node` on one alive node of each node type, pinned to it; ``{group: result}``.

    A node type whose task has not answered within ``timeout`` (all its GPUs busy, a worker that cannot start)
    gets ``{"error": ...}``.
    """
    import sys

    import ray
    from ray import cloudpickle
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    first: dict[str, dict[str, Any]] = {}
    for node in sorted((n for n in nodes if n.get("Alive")), key=lambda n: n["NodeID"]):
        first.setdefault(node_group(node), node)
    refs = {}
    this = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(this)  # the probe runs where scenecluster may be missing or older
    try:
        for group, node in first.items():
            has_gpu = node.get("Resources", {}).get("GPU", 0) > 0
            task = ray.remote(probe_node).options(
                num_cpus=0,
                num_gpus=0.01 if has_gpu else 0,
                max_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            )
            refs[group] = (task.remote(has_gpu), has_gpu)
    finally:
        cloudpickle.unregister_pickle_by_value(this)
    if not refs:
        return {}
    ready, _ = ray.wait([r for r, _ in refs.values()], num_returns=len(refs), timeout=timeout)
    results = {}
    for group, (ref, has_gpu) in refs.items():
        try:
            results[group] = (
                {**ray.get(ref, timeout=0), "gpu": has_gpu}
                if ref in ready
                else {"error": f"no answer in {timeout:g} s (busy, or no worker could start)", "gpu": has_gpu}
            )
        except Exception as exc:
            results[group] = {"error": one_line(exc, with_type=True), "gpu": has_gpu}
        if ref not in ready:
            ray.cancel(ref, force=True)
    return results


def check_probes(results: dict[str, dict[str, Any]], client_ray: str, driver_version: str) -> list[Check]:
    """Rows from :func:`probe_groups`: Ray equal to the client's on every node type, the package importable at
    the driver's version, and on GPU node types CUDA torch and cuML usable."""
    rows = []
    for group, found in sorted(results.items()):
        if "error" in found:
            rows.append(Check("package", group, FAIL, f"the probe task failed: {found['error']}"))
            continue
        same_ray = found.get("ray") == client_ray
        rows.append(
            Check(
                "ray version",
                group,
                PASS if same_ray else FAIL,
                f"node {found.get('ray', found.get('ray_error'))}, client {client_ray}",
            )
        )
        version = found.get("scenecluster")
        if version is None:
            rows.append(Check("package", group, FAIL, f"scenecluster: {found.get('scenecluster_error')}"))
        else:
            status = PASS if version == driver_version else FAIL
            rows.append(Check("package", group, status, f"scenecluster {version}, driver {driver_version}"))
        if not found["gpu"]:
            rows.append(Check("cuda + cuml", group, SKIP, "no GPU on this node type"))
            continue
        for key, name in (("torch", "cuda torch"), ("cuml", "cuml")):
            ok = key in found
            rows.append(Check(name, group, PASS if ok else FAIL, found[key] if ok else found[f"{key}_error"]))
    return rows


def check_cluster(options: DoctorOptions) -> list[Check]:
    """Every Ray row: reachable, joined, nodes, and the probes of each node type. Leaves Ray connected only
    while it runs."""
    import ray

    import scenecluster

    address = resolve_address(options.address)
    rows = [check_reachable(address)]
    if rows[0].status == FAIL:
        return rows
    rows.append(connect(address))
    if rows[-1].status == FAIL:
        return rows
    try:
        nodes = ray.nodes()
        rows += check_nodes(nodes)
        probes = probe_groups(nodes, options.timeout)
        rows += check_probes(probes, ray.__version__, scenecluster.__version__)
    finally:
        ray.shutdown()
    return rows


# --------------------------------------------------------------------------------------- stores and model
def check_input(uri: str, endpoint_url: str | None, pixels: PixelSpec = _DEFAULT_PIXELS) -> Check:
    """The input lists and its first image (or archive) reads, at most two folder levels down: a listing alone
    can pass where reading objects is refused. The first image is decoded as the job would under ``pixels``, and
    how the model will see it is the detail (:func:`scenecluster.pixels.describe_scene`)."""
    import pyarrow.fs as pafs

    from scenecluster.data import input_filesystem, reads_requester_pays, refused_hint, unsigned_hint

    try:
        fs, root = input_filesystem(uri, endpoint_url=endpoint_url)
    except InputError as exc:  # AWS_REQUEST_PAYER with another value than requester
        return Check("input readable", uri, FAIL, str(exc))
    try:
        found = fs.get_file_info(root).type != pafs.FileType.NotFound
    except OSError as exc:  # refused: the store's words, and why (unsigned, or a Requester Pays bucket)
        return Check("input readable", uri, FAIL, f"{one_line(exc)}{refused_hint(fs, exc)}")
    if not found:
        return Check(
            "input readable", uri, FAIL, f"does not exist (or this identity may not list it){unsigned_hint(fs)}"
        )
    check = _first_readable(fs, root, uri, pixels)
    if check.status == PASS and unsigned_hint(fs):
        check = dataclasses.replace(check, detail=f"{check.detail} (read unsigned: no AWS credentials were found)")
    if check.status == PASS and reads_requester_pays(fs):
        check = dataclasses.replace(check, detail=f"{check.detail} (Requester Pays: AWS_REQUEST_PAYER=requester)")
    return check


def _first_readable(fs, root: str, uri: str, pixels: PixelSpec) -> Check:
    """:func:`check_input`'s search for a first scene (or shard) to read, at most two folder levels down."""
    import pyarrow.fs as pafs

    from scenecluster.data import IMAGE_SUFFIXES, is_archive

    folders, seen, first_file = [root], 0, None
    for _depth in range(3):
        infos = [i for folder in folders for i in fs.get_file_info(pafs.FileSelector(folder, recursive=False))]
        seen += len(infos)
        files = sorted((i.path, i.size or 0) for i in infos if i.type == pafs.FileType.File)
        images = [f for f in files if f[0].lower().endswith(IMAGE_SUFFIXES) and f[1] <= _DESCRIBE_MAX_BYTES]
        if images:
            return _describe_first_scene(fs, [path for path, _ in images[:_DESCRIBE_TRIES]], uri, seen, pixels)
        shards = [f[0] for f in files if is_archive(f[0])]
        if shards:  # WebDataset shards: read, not decoded
            first_file = shards[0]
            break
        first_file = first_file or next((f[0] for f in files if not f[0].lower().endswith(_NOT_SCENES)), None)
        folders = sorted(i.path for i in infos if i.type == pafs.FileType.Directory)[:1]
    if first_file:
        with fs.open_input_stream(first_file) as stream:
            stream.read(16)
        return Check("input readable", uri, PASS, f"listed {seen} entries; read {first_file.rsplit('/', 1)[-1]}")
    if not seen:
        return Check("input readable", uri, FAIL, "is empty")
    return Check("input readable", uri, FAIL, f"listed {seen} entries but found no file two levels down")


def _describe_first_scene(fs, paths: list[str], uri: str, seen: int, pixels: PixelSpec) -> Check:
    """The first of ``paths`` that decodes, described (:func:`scenecluster.pixels.describe_scene`); the check
    fails only when none does: the job skips a corrupt scene, but not one of three is a format it cannot read."""
    from scenecluster.data import DECODE_ERRORS, decode_failure
    from scenecluster.pixels import describe_scene

    failures = []
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        with fs.open_input_stream(path) as stream:
            data = stream.read()
        try:
            seen_as = describe_scene(data, pixels)
        except DECODE_ERRORS as exc:  # as the job's reading skips a scene
            failures.append(f"cannot read {name}: {decode_failure(exc)}")
            continue
        skipped = f" ({'; '.join(failures)})" if failures else ""
        return Check("input readable", uri, PASS, f"listed {seen} entries; {name}: {seen_as}{skipped}")
    return Check("input readable", uri, FAIL, f"listed {seen} entries; {'; '.join(failures)}")


def check_output(uri: str, endpoint_url: str | None) -> Check:
    """Write a small object under the output, read it back and delete it: what a job does, minus the job. Folders
    (or S3 folder markers, which pyarrow leaves behind a deleted object) that were not there before are removed,
    parents included."""
    import pyarrow.fs as pafs

    from scenecluster.data import open_filesystem
    from scenecluster.outputs import topmost_missing

    fs, root = open_filesystem(uri, endpoint_url=endpoint_url)
    created = topmost_missing(fs, root)  # what create_dir makes, parents included, and so what to remove
    probe = f"{root.rstrip('/')}/.scenecluster-doctor-{uuid.uuid4().hex[:12]}"
    payload = b"scenecluster doctor probe\n"
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as stream:
            stream.write(payload)
        with fs.open_input_stream(probe) as stream:
            back = stream.read()
        fs.delete_file(probe)
    finally:
        if created is not None and fs.get_file_info(created).type != pafs.FileType.NotFound:
            fs.delete_dir(created)
    if back != payload:
        return Check("output writable", uri, FAIL, "an object written there read back different")
    return Check("output writable", uri, PASS, "wrote, read back and deleted a probe object")


def check_model(model: str) -> Check:
    """Load the backbone the way the embedding actors do (:func:`scenecluster.models.load_backbone`)."""
    from scenecluster.models import load_backbone

    start = time.perf_counter()
    backbone = load_backbone(model)
    n_params = sum(p.numel() for p in backbone.parameters())
    detail = (
        f"{type(backbone).__name__}, {backbone.config.num_hidden_layers} layers, "
        f"{n_params / 1e6:.1f}M parameters, loaded in {time.perf_counter() - start:.1f} s on the driver"
    )
    return Check("model loadable", model, PASS, detail)


def run_doctor(options: DoctorOptions) -> list[Check]:
    """All checks, in table order: the cluster first, then the stores and the model (which need no cluster)."""
    rows: list[Check] = []
    try:
        rows += check_cluster(options)
    except Exception as exc:  # e.g. Ray not installed: a row, so the other checks still run
        rows.append(Check("ray", resolve_address(options.address), FAIL, one_line(exc, with_type=True)))
    targets = [
        ("input readable", options.input, lambda uri: check_input(uri, options.endpoint_url, options.pixels)),
        ("output writable", options.output, lambda uri: check_output(uri, options.endpoint_url)),
        ("model loadable", options.model, check_model),
    ]
    for name, target, check in targets:
        if target is None:
            rows.append(Check(name, "-", SKIP, f"not asked (--{name.split()[0]})"))
        else:
            rows.append(_guard(name, target, lambda check=check, target=target: check(target)))
    return rows
