"""umap-learn's numba compiles are kept on disk: a second process loads what the first compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Fits and transforms a small UMAP made by the product's factory, then reports numba's cache counters for
# umap-learn's and pynndescent's functions: loads from disk (hits) and compiles that found nothing (misses).
PROBE = """
import json, numpy as np
from scenecluster.jitcache import cached_dispatchers
from scenecluster.reduce import make_umap

def counted(kind):
    return sum(sum(getattr(d.stats, kind).values()) for d in cached_dispatchers())

projection = make_umap(3, n_neighbors=10, backend="umap-learn")  # turns the cache on before anything compiles
at_import = counted("cache_misses")  # functions umap-learn compiles eagerly at import, before any cache is on
X = np.random.default_rng(0).normal(size=(120, 16)).astype(np.float32)
projection.fit(X).transform(X[:20])
print(json.dumps({"hits": counted("cache_hits"), "misses": counted("cache_misses") - at_import}))
"""


def _probe(cache_dir) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_umaps_compiles_instead_of_compiling(tmp_path):
    first = _probe(tmp_path)
    assert first["misses"] > 0 and first["hits"] == 0  # compiled here, and written to the cache folder
    assert any(tmp_path.rglob("*.nbi"))
    second = _probe(tmp_path)
    assert second["hits"] > 0 and second["misses"] == 0  # every function it needed was loaded, none compiled


def test_turning_the_cache_on_twice_is_harmless():
    from numba.core.caching import NullCache

    from scenecluster.jitcache import cached_dispatchers, keep_umap_compiles

    keep_umap_compiles()
    assert keep_umap_compiles() == 0
    assert not any(isinstance(d._cache, NullCache) for d in cached_dispatchers())
