"""How long a report takes to read its thumbnails from S3: one at a time against the parallel prefetch.

A page shows some 2,400 scenes (8 + 8 a cluster in the strips, up to 2,000 hover thumbnails in the scatter), each
one or two requests to the store (loose files: a ``HEAD`` and a ``GET``; a member of a ``.tar`` shard: the same on
its shard, ranged). Loopback SeaweedFS answers in about a millisecond, S3 in some 20-100 ms, so the local server is
put behind :class:`scenecluster.testing.s3gate.S3Gate`, which holds each request for ``--delay-ms``.

Per layout (loose files, ``.tar`` shards): the shipped sample's scenes are uploaded, clustered by the job (tiny
random DINOv2 at 28 px, local output), and the report is rebuilt from the run folder through the gate with
``--threads`` reads in flight, best of ``--repeats``, first straight to the local server (``direct``), then
through the gate at each delay (the gate itself, a Python proxy that opens a connection per request, adds some
20 ms). One JSON line per (layout, delay, threads); the ratio is to the first ``--threads`` value at that delay.

    python benchmarks/bench_report_s3.py --delay-ms 0 50 --threads 1 16
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path

from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script
from _tiny_model import tiny_model

from scenecluster.cli import sample_data_dir
from scenecluster.config import load_config
from scenecluster.job import run_cluster_job
from scenecluster.outputs import OutputFolder
from scenecluster.report import build_report
from scenecluster.testing.s3gate import S3Gate
from scenecluster.testing.s3server import SeaweedS3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay-ms", type=float, nargs="+", default=[0, 50])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=30, help="images per tar shard")
    args = p.parse_args()
    head = {"date": date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp, SeaweedS3() as s3:
        root = Path(tmp)
        s3.create_bucket("bench")
        s3.upload_folder(sample_data_dir(), "bench", "loose")
        s3.upload_tar_shards(sample_data_dir(), "bench", "shards", args.shard_size)
        os.environ.update(s3.env())
        model = str(tiny_model(root / "tiny"))
        for layout in ("loose", "shards"):
            out = root / layout
            settings = {
                "data.input": f"s3://bench/{layout}/",
                "output": str(out),
                "data.labels": "folders",
                "embed.model": model,
                "embed.image_size": 28,
                "resources.device": "cpu",
            }
            metrics = run_cluster_job(load_config(None, settings), echo=lambda s: None)
            for delay in [None, *args.delay_ms]:  # None: straight to the local server, no gate
                gate = S3Gate(s3.endpoint_url, delay_s=(delay or 0) / 1000).start() if delay is not None else None
                endpoint = gate.endpoint_url if gate else s3.endpoint_url
                try:
                    base = None
                    for threads in args.threads:
                        times, said, requests = [], [], 0
                        for _ in range(args.repeats):
                            before = gate.paid if gate else 0
                            start = time.perf_counter()
                            page = build_report(
                                OutputFolder(str(out)), endpoint_url=endpoint, echo=said.append, threads=threads
                            )
                            times.append(time.perf_counter() - start)
                            requests = (gate.paid - before) if gate else None
                        best = min(times)
                        base = base or best
                        row = {
                            **head,
                            "layout": layout,
                            "scenes": metrics["n_embedded"],
                            "delay_ms": "direct" if delay is None else delay,
                            "threads": threads,
                            "report_s": round(best, 2),
                            "vs_one_thread": round(best / base, 3),
                            "thumbnails": page.count("data:image/webp;base64,"),
                            "requests": requests,
                            "not_shown": said[-1] if said else "",
                        }
                        print(json.dumps(row), flush=True)
                finally:
                    if gate:
                        gate.stop()


if __name__ == "__main__":
    main()
