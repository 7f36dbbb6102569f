"""Ray job: fine-tune, then cluster a target with that backbone (:func:`scenecluster.pipeline.run_pipeline`).

ray job submit --working-dir . -- python rayjobs/pipeline.py --config rayjobs/configs/pipeline.yaml
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _entry import run


def main(argv: Sequence[str] | None = None) -> int:
    from scenecluster.pipeline import PipelineConfig, run_pipeline

    return run(
        "pipeline",
        argv,
        model=PipelineConfig,
        description=__doc__,
        overwrite=True,
        call=lambda cfg, args: run_pipeline(cfg, overwrite=args.overwrite),
    )


if __name__ == "__main__":
    sys.exit(main())
