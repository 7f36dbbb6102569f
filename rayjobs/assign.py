"""Ray job: assign new scenes with a finished run's clustering (:func:`scenecluster.job.run_assign_job`).

ray job submit --working-dir . -- python rayjobs/assign.py --config rayjobs/configs/assign.yaml
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _entry import run


def main(argv: Sequence[str] | None = None) -> int:
    from scenecluster.config import AssignJobConfig
    from scenecluster.job import run_assign_job

    return run(
        "assign",
        argv,
        model=AssignJobConfig,
        description=__doc__,
        call=lambda cfg, args: run_assign_job(cfg, overwrite=args.overwrite),
        overwrite=True,
    )


if __name__ == "__main__":
    sys.exit(main())
