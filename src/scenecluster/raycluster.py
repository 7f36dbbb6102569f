"""Join or start the Ray cluster a job runs on, and read what hardware it has.

Kept apart from the stages so they stay importable without Ray (the GPU test machine has none).
"""

from __future__ import annotations

import logging
import os

from scenecluster.devices import ClusterInventory

log = logging.getLogger(__name__)


def ensure_ray(resources) -> ClusterInventory:
    """Connect to ``resources.ray_address`` / ``RAY_ADDRESS``, or start a local Ray; return what it holds.

    ``resources`` is a :class:`scenecluster.config.ResourcesConfig`. A local Ray is started quietly on
    127.0.0.1 with the dashboard off, since a one-machine run needs neither. What to do with the hardware is
    decided in :func:`scenecluster.devices.decide`, not here.
    """
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        address = resources.ray_address or os.environ.get("RAY_ADDRESS")
        kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=resources.num_cpus, include_dashboard=False, **kwargs)
    total = ray.cluster_resources()
    num_cpus = float(total.get("CPU", 1.0))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus_per_node = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=num_cpus) or num_cpus
    return ClusterInventory(num_cpus=num_cpus, num_gpus=float(total.get("GPU", 0.0)), cpus_per_node=cpus_per_node)
