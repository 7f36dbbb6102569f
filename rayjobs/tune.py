"""Ray job: search UMAP and DP-GMM settings on fixed embeddings (:func:`scenecluster.tune.run_tune`).

ray job submit --working-dir . -- python rayjobs/tune.py --config rayjobs/configs/tune.yaml
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _entry import run


def main(argv: Sequence[str] | None = None) -> int:
    from scenecluster.tune import TuneJobConfig, run_tune

    return run("tune", argv, model=TuneJobConfig, description=__doc__, call=lambda cfg, args: run_tune(cfg))


if __name__ == "__main__":
    sys.exit(main())
