"""The one place that decides where work runs: CPU or GPU, how many GPUs an actor takes, in which dtype, with
how many torch threads, and whether cuML can project.

The driver calls :func:`decide` once per run, with the run's ``resources`` settings and what the Ray cluster
holds (:func:`scenecluster.raycluster.ensure_ray`), and passes the frozen :class:`Resources` down to every
stage. No stage probes CUDA or counts CPUs itself. The one fact read where the work runs is whether a CPU computes
bfloat16 natively (:func:`resolve_cpu_dtype`, for ``resources.cpu_dtype: auto``): the nodes of one cluster may be
of different CPU families, and the driver's head node says nothing about its workers'. Ray-free, so it is tested and
used without Ray.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import torch

from scenecluster.errors import ConfigError

DeviceName = Literal["auto", "cpu", "cuda"]

__all__ = [
    "ClusterInventory",
    "Resources",
    "check_fits",
    "cpu_computes_bf16",
    "decide",
    "local_inventory",
    "resolve_cpu_dtype",
    "resolve_torch_device",
]


def resolve_torch_device(device: str = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a ``torch.device`` for code running in this process.

    ``auto`` picks CUDA when this process sees a GPU. Asking for ``cuda`` without one is an error with a
    clear message rather than a failure deep inside torch.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA GPU here")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', not {device!r}")


def cpu_computes_bf16() -> bool:
    """Whether this process's CPU has bfloat16 arithmetic in hardware (AVX512-BF16: AMD Zen 4 and later, Intel
    Cooper Lake; AMX: Intel Sapphire Rapids and later), as torch's own CPU probe reports it.

    Why only these: oneDNN runs bfloat16 on any AVX-512 CPU, but without the instructions it converts in software,
    and float32 is then as fast or faster. False where torch cannot say (its probe is private API)."""
    try:
        capability = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return bool(capability.get("avx512_bf16") or capability.get("amx_bf16"))


def resolve_cpu_dtype(setting: str = "auto") -> torch.dtype:
    """``resources.cpu_dtype`` as the torch dtype a model runs in on this process's CPU: ``auto`` is bfloat16 where
    :func:`cpu_computes_bf16`, else float32 (1.7x float32 on a Zen 4 core for a ViT-S/14 at 224 px, features within
    cosine 0.99995 of float32's; docs/benchmarks.md)."""
    if setting == "auto":
        return torch.bfloat16 if cpu_computes_bf16() else torch.float32
    if setting in ("bfloat16", "float32"):
        return getattr(torch, setting)
    raise ValueError(f"cpu dtype must be 'auto', 'bfloat16' or 'float32', not {setting!r}")


@dataclass(frozen=True)
class ClusterInventory:
    """What a Ray cluster holds: all its CPUs and GPUs, and the CPUs (and GPUs) of its largest node.

    ``fixed`` is true for a Ray the job started itself (nothing will add nodes to it, so a request larger than
    it can never be granted); ``where`` says which cluster it is, in words.
    """

    num_cpus: float
    num_gpus: float
    cpus_per_node: float
    gpus_per_node: float | None = None
    fixed: bool = False
    where: str = ""


def local_inventory() -> ClusterInventory:
    """This machine as a one-node cluster, for runs that start no Ray (e.g. reusing finished embeddings)."""
    cpus = float(os.cpu_count() or 1)
    gpus = float(torch.cuda.device_count())
    return ClusterInventory(num_cpus=cpus, num_gpus=gpus, cpus_per_node=cpus, gpus_per_node=gpus, fixed=True)


@dataclass(frozen=True)
class Resources:
    """What the driver decided once for the whole run.

    Attributes
    ----------
    use_gpu : bool
        Actors and workers run on GPUs.
    device : {"cuda", "cpu"}
        Where actors and workers run their models.
    dtype : {"bfloat16", "float32", "auto"}
        Inference dtype of the models on ``device`` (bf16 on GPUs: 4.9x fp32 on an H100, features within
        cosine 0.9999; see docs/benchmarks.md). On CPUs the ``cpu_dtype`` setting: ``auto`` is resolved by each
        actor on its own node (:func:`resolve_cpu_dtype`).
    gpus_per_actor : float
        ``num_gpus`` of each embedding actor.
    torch_threads : int
        Intra-op threads of each actor or worker, so that actors x threads fits a node.
    cpus_per_node : float
    fit_device : {"cuda", "cpu"}
        Where the fit task runs the projection and the mixture (it asks Ray for a GPU on GPU runs).
    cuml : bool
        cuML UMAP is importable (the nodes run the same image) and the fit runs on a GPU.
    decode_on_gpu : bool
        Embedding actors decode JPEGs with nvJPEG rather than PIL tasks decoding them first.
    num_cpus, num_gpus : float
        The Ray cluster's CPUs and GPUs when the run started (what the assignment pool may grow to).
    """

    use_gpu: bool
    device: str
    dtype: str
    gpus_per_actor: float
    torch_threads: int
    cpus_per_node: float
    fit_device: str
    cuml: bool
    decode_on_gpu: bool
    num_cpus: float
    num_gpus: float

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def umap_backend(self, requested: str) -> str:
        """``auto`` -> ``cuml`` when usable here, else ``umap-learn``; an explicit choice is kept."""
        if requested != "auto":
            return requested
        return "cuml" if self.cuml else "umap-learn"


def decide(
    device: str,
    inventory: ClusterInventory,
    *,
    actors: int = 1,
    torch_threads: int | None = None,
    actor_gpus: float = 0.0,
    decode: str = "auto",
    actor_cpus: float | None = None,
    cpu_dtype: str = "auto",
) -> Resources:
    """Decide the run's resources from the ``resources.device`` setting and the cluster's inventory.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        ``auto`` uses GPUs when the cluster has any.
    inventory : ClusterInventory
    actors : int
        Actors or workers that share a node's CPUs (for the default thread count).
    torch_threads : int, optional
        Explicit threads per actor or worker.
    actor_gpus : float
        Explicit GPUs per embedding actor (0: one per actor on GPU runs).
    decode : {"auto", "cpu", "gpu"}
        Where JPEGs are decoded; ``auto`` decodes on the GPU on GPU runs.
    actor_cpus : float, optional
        CPUs each embedding actor asks for, checked against a cluster that cannot grow (see :func:`check_fits`).
    cpu_dtype : {"auto", "bfloat16", "float32"}
        The models' dtype on CPU runs (``resources.cpu_dtype``).

    Raises
    ------
    ConfigError
        ``resources.device='cuda'`` on a cluster without GPUs, or actors a fixed cluster can never hold.
    """
    if device == "cuda" and inventory.num_gpus == 0:
        raise ConfigError("setting resources.device: 'cuda' was asked for, but the Ray cluster has no GPU")
    use_gpu = device == "cuda" or (device == "auto" and inventory.num_gpus > 0)
    gpus_per_actor = actor_gpus or (1.0 if use_gpu else 0.0)
    if actor_cpus is not None:
        check_fits(inventory, actors=actors, actor_cpus=actor_cpus, actor_gpus=gpus_per_actor if use_gpu else 0.0)
    fit_device = "cuda" if use_gpu else "cpu"  # the fit runs in a Ray task that holds a GPU on GPU runs
    return Resources(
        use_gpu=use_gpu,
        device="cuda" if use_gpu else "cpu",
        dtype="bfloat16" if use_gpu else cpu_dtype,
        gpus_per_actor=gpus_per_actor,
        torch_threads=torch_threads or max(1, int(inventory.cpus_per_node // max(1, actors))),
        cpus_per_node=inventory.cpus_per_node,
        fit_device=fit_device,
        cuml=fit_device == "cuda" and importlib.util.find_spec("cuml") is not None,
        decode_on_gpu=decode == "gpu" or (decode == "auto" and gpus_per_actor > 0),
        num_cpus=inventory.num_cpus,
        num_gpus=inventory.num_gpus,
    )


def check_fits(inventory: ClusterInventory, *, actors: int, actor_cpus: float, actor_gpus: float = 0.0) -> None:
    """Refuse actors that a cluster which cannot grow will never hold, which Ray would wait for forever.

    Only a Ray the job started itself is fixed; a joined cluster may have an autoscaler that adds nodes for a
    request it cannot hold yet, so there the request is passed on as it is.

    Raises
    ------
    ConfigError
        Naming the setting and the largest value that fits.
    """
    if not inventory.fixed:
        return
    node = inventory.cpus_per_node
    if actor_cpus > node:
        raise ConfigError(
            f"setting embed.actor_cpus: each embedding actor asks for {actor_cpus:g} CPUs, but this machine's Ray "
            f"has {node:g}; use --actor-cpus {node:g} or less"
        )
    if actors * actor_cpus > inventory.num_cpus:
        raise ConfigError(
            f"setting embed.num_actors: {actors} actors x {actor_cpus:g} CPUs need {actors * actor_cpus:g} CPUs, but "
            f"this machine's Ray has {inventory.num_cpus:g}; use fewer --num-actors or a smaller --actor-cpus"
        )
    gpus = inventory.num_gpus if inventory.gpus_per_node is None else inventory.gpus_per_node
    if actor_gpus > gpus:
        raise ConfigError(
            f"setting embed.actor_gpus: each embedding actor asks for {actor_gpus:g} GPUs, but this machine's Ray "
            f"has {gpus:g}"
        )
