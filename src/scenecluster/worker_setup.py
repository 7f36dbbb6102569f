"""What each worker process of a private local Ray runs as it starts (Ray's ``worker_process_setup_hook``).

A module of its own that imports nothing but ``logging``: the hook runs in every worker the run starts, data tasks
included, which otherwise never import torch (``docs/benchmarks.md``, "What each Ray worker process imports").
"""

from __future__ import annotations

import logging

__all__ = ["quiet_private_ray_workers"]

# Loggers of Ray's own that a private Ray (no dashboard, so no State API) makes warn without cause, in its workers.
# Ray Train's PlacementGroupCleaner, a detached actor each fine-tune starts, asks the State API every second whether
# the Train controller still lives, so that it can free the workers' placement group should the controller die;
# without the dashboard every ask fails and warns ("Failed to query Ray Train Controller actor state"): 954 lines
# through a 17-minute CPU fine-tune, the job's own epoch lines lost among them. The private Ray ends with the run,
# placement groups and all, so the cleaner has nothing to do there.
_NOISY_WITHOUT_DASHBOARD = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_private_ray_workers() -> None:
    """Hush Ray's loggers that warn only because a private Ray runs without the dashboard; their errors still show."""
    for name in _NOISY_WITHOUT_DASHBOARD:
        logging.getLogger(name).setLevel(logging.ERROR)
