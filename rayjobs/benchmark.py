"""Ray job: the benchmark protocol (:func:`scenecluster.benchmark.run_benchmark`).

Fine-tune on labelled sources (or reuse a backbone), cluster a labelled target once per seed with the tuned and
the untuned backbone and with k-means told the true K; writes benchmark.json and benchmark.md.

ray job submit --working-dir . -- python rayjobs/benchmark.py --config rayjobs/configs/benchmark.yaml
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _entry import run


def main(argv: Sequence[str] | None = None) -> int:
    from scenecluster.benchmark import run_benchmark
    from scenecluster.config import BenchmarkConfig

    return run(
        "benchmark",
        argv,
        model=BenchmarkConfig,
        description=__doc__,
        overwrite=True,
        call=lambda cfg, args: run_benchmark(cfg, overwrite=args.overwrite),
    )


if __name__ == "__main__":
    sys.exit(main())
