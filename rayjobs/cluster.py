"""Ray job: cluster a folder or S3 prefix (:func:`scenecluster.job.run_cluster_job`).

ray job submit --working-dir . -- python rayjobs/cluster.py --config rayjobs/configs/cluster-local.yaml
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _entry import run


def main(argv: Sequence[str] | None = None) -> int:
    from scenecluster.config import ClusterJobConfig
    from scenecluster.job import run_cluster_job

    return run(
        "cluster",
        argv,
        model=ClusterJobConfig,
        description=__doc__,
        overwrite=True,
        call=lambda cfg, args: run_cluster_job(cfg, overwrite=args.overwrite),
    )


if __name__ == "__main__":
    sys.exit(main())
