"""Size and load time of a finished run's report, opened in headless Chromium.

    python benchmarks/bench_report.py RUN_DIR [--output FILE] [--repeats 5] [--existing]

Regenerates the report from RUN_DIR into FILE (default: a temporary file; RUN_DIR is not written), then opens
it ``--repeats`` times in a fresh headless Chromium at 1280x900 and at 390x844 and prints one JSON line per
width: bytes, the time to regenerate, and the median and worst seconds from navigation to the load event and
to the scatter being drawn (BokehJS has rendered). ``--existing`` measures FILE as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

from scenecluster.report import write_report_file
from scenecluster.testing.browser import visit

READY = "!!(window.Bokeh && Bokeh.index && Object.keys(Bokeh.index).length)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--output")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--existing", action="store_true", help="measure --output as it is")
    args = p.parse_args()
    page = args.output or os.path.join(tempfile.mkdtemp(), "report.html")
    build = float("nan")
    if not args.existing:
        start = time.perf_counter()
        write_report_file(args.run, page)
        build = time.perf_counter() - start
    for width, height in ((1280, 900), (390, 844)):
        visits = [visit(page, width=width, height=height, ready=READY) for _ in range(args.repeats)]
        errors = sorted({e for v in visits for e in v.errors})
        loads, readies = [v.load_seconds for v in visits], [v.ready_seconds for v in visits]
        print(
            json.dumps(
                {
                    "page": page,
                    "bytes": os.path.getsize(page),
                    "build_s": round(build, 1),
                    "width": width,
                    "load_s_median": round(statistics.median(loads), 2),
                    "load_s_max": round(max(loads), 2),
                    "drawn_s_median": round(statistics.median(readies), 2),
                    "drawn_s_max": round(max(readies), 2),
                    "repeats": args.repeats,
                    "errors": errors,
                    "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(),
                }
            )
        )


if __name__ == "__main__":
    main()
