"""What keeping umap-learn's numba compiles on disk saves a fresh process (``scenecluster.jitcache``).

Each measurement is a new Python process, as a fit task or an assignment actor is, with its own empty
``NUMBA_CACHE_DIR``, timing a UMAP ``fit`` on ``n`` random 32-d rows and a ``transform`` of 100 of them:

* ``off``: umap-learn as it ships (its uncached functions compile in every process);
* ``cold``: through :func:`scenecluster.reduce.make_umap`, first process on the machine (compiles and writes);
* ``warm``: the same again, loading what ``cold`` wrote.

Sizes below 4,096 take umap-learn's exact-neighbour path; from 4,096 on, pynndescent's (whose ``nn_descent``
numba cannot cache, so the warm fit still compiles it). One JSON line per size.

    python benchmarks/bench_jitcache.py --sizes 300 5000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date

from _hardware import cpu_model  # benchmarks/ is on sys.path when run as a script

PROBE = """
import sys, time, warnings
warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
start = time.perf_counter()
import numpy as np
n, mode = int(sys.argv[1]), sys.argv[2]
if mode == "off":
    import umap
    projection = umap.UMAP(n_components=5, n_neighbors=15, min_dist=0.0, metric="cosine", random_state=0,
                           low_memory=True)
else:
    from scenecluster.reduce import make_umap
    projection = make_umap(5, n_neighbors=15, backend="umap-learn")
X = np.random.default_rng(0).normal(size=(n, 32)).astype(np.float32)
ready = time.perf_counter()
projection.fit(X)
fitted = time.perf_counter()
projection.transform(X[:100])
done = time.perf_counter()
print(round(ready - start, 2), round(fitted - ready, 2), round(done - fitted, 2))
"""


def measure(n: int, mode: str, cache_dir: str) -> dict[str, float]:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(n), mode], capture_output=True, text=True, env=env, check=True
    )
    imports, fit, transform = map(float, done.stdout.split()[-3:])
    return {"import_s": imports, "fit_s": fit, "transform_s": transform}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 5000])
    args = parser.parse_args()

    for n in args.sizes:
        with tempfile.TemporaryDirectory() as off_dir, tempfile.TemporaryDirectory() as on_dir:
            row = {"n": n, "off": measure(n, "off", off_dir), "cold": measure(n, "cold", on_dir)}
            row["warm"] = measure(n, "warm", on_dir)
        for stage in ("fit_s", "transform_s"):
            row[f"{stage[:-2]}_speedup_warm_vs_off"] = round(row["off"][stage] / max(row["warm"][stage], 0.01), 1)
        row.update(cpu=cpu_model(), cores=os.cpu_count(), date=date.today().isoformat())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
