"""A what-if copy of a finished run with more clusters, to measure how the report grows with the cluster count.

    python benchmarks/split_clusters.py RUN_DIR COPY_DIR --clusters 50

Copies the run's small files and report sample, links its embeddings, and rewrites its assignment parts with the
largest clusters cut in three by a hash of the path until there are ``--clusters`` ids. Only for page size and
load time: the cut clusters mean nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("copy")
    p.add_argument("--clusters", type=int, default=50)
    args = p.parse_args()
    shutil.rmtree(args.copy, ignore_errors=True)
    os.makedirs(os.path.join(args.copy, "assignments"))
    os.makedirs(os.path.join(args.copy, "clustering"))
    for name in ("config.yaml", "metrics.json", "run.json", "skipped.txt", "clustering/report_sample.parquet"):
        if os.path.exists(os.path.join(args.run, name)):
            shutil.copy(os.path.join(args.run, name), os.path.join(args.copy, name))
    os.symlink(os.path.abspath(os.path.join(args.run, "embeddings")), os.path.join(args.copy, "embeddings"))
    parts = sorted(os.listdir(os.path.join(args.run, "assignments")))
    sizes = np.bincount(
        np.concatenate(
            [
                pq.read_table(os.path.join(args.run, "assignments", n), columns=["cluster"]).column(0).to_numpy()
                for n in parts
            ]
        )
    )
    n = len(sizes)
    cut = np.argsort(-sizes)[: max(0, (args.clusters - n) // 2)]  # each cut adds two ids
    new_id = {int(c): (n + 2 * i, n + 2 * i + 1) for i, c in enumerate(cut)}
    for name in parts:
        table = pq.read_table(os.path.join(args.run, "assignments", name))
        clusters = table.column("cluster").to_numpy().copy()
        for i, path in enumerate(table.column("path").to_pylist()):
            h = zlib.crc32(path.encode()) % 3
            if int(clusters[i]) in new_id and h:
                clusters[i] = new_id[int(clusters[i])][h - 1]
        column = table.column_names.index("cluster")
        table = table.set_column(column, "cluster", pa.array(clusters.astype(np.int32)))
        pq.write_table(table, os.path.join(args.copy, "assignments", name))
    print(f"{n} clusters -> {n + 2 * len(cut)} in {args.copy}")


if __name__ == "__main__":
    main()
