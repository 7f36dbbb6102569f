"""Listing an S3 prefix: one paginated listing against sub-prefixes listed side by side (``scenecluster.s3listing``).

A real S3 server (SeaweedFS, started here on 127.0.0.1) holds ``--keys`` empty objects in ``--prefixes`` class
folders, or with ``--layout flat`` in one folder, named by zero-padded numbers (``scene-00000000.jpg`` on: the
names start alike for several characters, so the ranges ``walk_s3`` cuts such a level into cost it the most
probing). Both listings run over them, in turn, best of ``--repeats``; with ``--latency-ms`` each listing request
first waits that long in the client (a botocore hook), standing for the round trip to a remote store: the local
server answers in the time its own CPU takes, which is not what limits a listing of S3 from a cluster. One JSON line
per latency: seconds of each listing, their ratio and the keys.

    python benchmarks/bench_s3_listing.py --keys 20000 --prefixes 20 --latency-ms 0 50 100
    python benchmarks/bench_s3_listing.py --layout flat --keys 200000 --latency-ms 0 50 100
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script

from scenecluster import s3listing
from scenecluster.data import s3_client
from scenecluster.testing.s3server import SeaweedS3


def one_listing(client, bucket: str, prefix: str) -> int:
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        n += len(page.get("Contents", []))
    return n


def best(call, repeats: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        n = call()
        times.append(time.perf_counter() - start)
    return min(times), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=20_000)
    p.add_argument("--prefixes", type=int, default=20)
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0, 100])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layout", choices=["folders", "flat"], default="folders")
    args = p.parse_args()
    with SeaweedS3() as server:
        server.create_bucket("scenes")
        client = server.boto3_client()
        if args.layout == "flat":
            keys = [f"archive/scene-{i:08d}.jpg" for i in range(args.keys)]
        else:
            keys = [f"archive/c{i % args.prefixes:03d}/scene-{i:08d}.jpg" for i in range(args.keys)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda key: client.put_object(Bucket="scenes", Key=key, Body=b""), keys))
        os.environ.update(server.env())
        for latency in args.latency_ms:
            listing = s3_client(server.endpoint_url)  # the job's own client (its connection pool)

            def wait(latency=latency, **_):
                time.sleep(latency / 1000)

            listing.meta.events.register("before-send.s3.ListObjectsV2", wait)
            one_s, n_one = best(lambda listing=listing: one_listing(listing, "scenes", "archive/"), args.repeats)
            side_s, n_side = best(
                lambda listing=listing: sum(1 for _ in s3listing.walk_s3(listing, "scenes", "archive/")), args.repeats
            )
            assert n_one == n_side == args.keys, (n_one, n_side)
            row = {
                "keys": args.keys,
                "layout": args.layout,
                "prefixes": args.prefixes if args.layout == "folders" else 0,
                "added_latency_ms": latency,
                "one_listing_s": round(one_s, 2),
                "side_by_side_s": round(side_s, 2),
                "speedup": round(one_s / side_s, 2),
                "listers": s3listing.LISTERS,
                "cpu": cpu_model(),
                "date": datetime.date.today().isoformat(),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
