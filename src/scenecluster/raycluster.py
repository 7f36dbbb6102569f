"""Join or start the Ray cluster a job runs on, and read what hardware it has.

A job runs on exactly one of two things, never a surprise third: the cluster it is told to join
(``resources.ray_address`` or ``RAY_ADDRESS``), or a private Ray it starts for itself. A bare ``ray.init()``
would instead join whatever ``ray start`` last recorded on the machine (``/tmp/ray/ray_current_cluster``), and
can hang for minutes on that head's other network address; a job started with ``address="local"`` never looks
there, so two local runs on one machine each keep their own Ray too.

Kept apart from the stages so they stay importable without Ray (the GPU test machine has none).
"""

from __future__ import annotations

import logging
import os

from scenecluster.devices import ClusterInventory
from scenecluster.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["PROGRESS_LOG_INTERVAL_S", "ensure_ray"]

PROGRESS_LOG_INTERVAL_S = 60


def ensure_ray(resources) -> ClusterInventory:
    """Connect to ``resources.ray_address`` / ``RAY_ADDRESS``, or start a private local Ray; return what it holds.

    ``resources`` is a :class:`scenecluster.config.ResourcesConfig`. A local Ray is started quietly on
    127.0.0.1 with the dashboard off, since a one-machine run needs neither. The inventory's ``where`` says
    which of the two it is, for the job's first line of output. What to do with the hardware is decided in
    :func:`scenecluster.devices.decide`, not here.

    Raises
    ------
    ConfigError
        When the named cluster does not answer (checked with a 5 s TCP probe, before Ray's own minutes of retries).
    """
    import ray

    # Ray Data logs its progress (a block of lines per dataset) every 10 s when stdout is not a terminal, which is
    # where `ray job submit` and `kubectl logs` read a job: a day of embedding would be some 80,000 lines, with the
    # job's own stage lines and errors among them. Once a minute still shows a stalled stage within the minute.
    # Ray reads the variable when it first logs progress, so a value the user set is kept.
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(PROGRESS_LOG_INTERVAL_S))
    fixed = False
    if ray.is_initialized():
        where = "using the Ray cluster this process already joined"
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        named_by = "--ray-address" if resources.ray_address else "RAY_ADDRESS"
        address = resources.ray_address or os.environ.get("RAY_ADDRESS")
        kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address:
            _check_reachable(address, named_by)
            ray.init(address=address, **kwargs)
            where = f"joined the Ray cluster at {address} ({named_by})"
        else:
            # Ray warns on stderr that its (default) token authentication is on: for a private Ray that no one
            # else joins that is noise, and it would push the job's own first line of output down.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            ray.init(
                address="local",
                num_cpus=resources.num_cpus,
                include_dashboard=False,
                # hushes Ray's warnings of the dashboard a private Ray runs without (scenecluster.worker_setup)
                runtime_env={"worker_process_setup_hook": "scenecluster.worker_setup.quiet_private_ray_workers"},
                **kwargs,
            )
            where = "started a local Ray for this run (give --ray-address or RAY_ADDRESS to join a cluster)"
            fixed = True
    total = ray.cluster_resources()
    num_cpus = float(total.get("CPU", 1.0))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus_per_node = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=num_cpus) or num_cpus
    gpus_per_node = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
    return ClusterInventory(
        num_cpus=num_cpus,
        num_gpus=float(total.get("GPU", 0.0)),
        cpus_per_node=cpus_per_node,
        gpus_per_node=gpus_per_node,
        fixed=fixed,
        where=where,
    )


def _check_reachable(address: str, named_by: str) -> None:
    from scenecluster.doctor import FAIL, check_reachable

    check = check_reachable(address)
    if check.status == FAIL:
        raise ConfigError(
            f"Ray cluster {address!r} (from {named_by}) does not answer: {check.detail}; start it, fix the address, "
            "or unset it to run on a local Ray started for this job"
        )
