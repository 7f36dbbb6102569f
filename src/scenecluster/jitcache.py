"""Keep umap-learn's numba compiles on disk, so a new process loads them instead of compiling them again.

Why: umap-learn compiles most of its numba functions without ``cache=True`` (its ``parallel=True`` ones among
them), so every fresh process pays the compile again: about 10 s for a small fit and 4 s for its ``transform``,
and on 4,096 scenes or more (pynndescent's search index) over 40 s for the fit and 55 s for the first
``transform``. In this job every fit task, every assignment actor and every Tune trial is a fresh process, so
the assignment pass paid a minute per actor before it assigned a scene. Numba can cache these functions
(parallel ones included); it is only not asked to. :func:`keep_umap_compiles` asks, before anything compiles,
and the compiles land where numba keeps ``cache=True`` functions: ``__pycache__`` beside the library, or the
user's cache folder when the install is read-only, or ``NUMBA_CACHE_DIR``. Each machine compiles once; the
image in ``infra/`` compiles at build time (``python -m scenecluster.jitcache``).

Numba keys each entry on the function's source file and the CPU, so a new umap-learn or another machine type
compiles afresh rather than loading stale code. A few functions cannot be cached (pynndescent's
``nn_descent`` refers to a function it is handed as a global); they compile as before, and numba's warning
that says so is silenced.
"""

from __future__ import annotations

import importlib
import warnings

__all__ = ["UMAP_MODULES", "cached_dispatchers", "keep_umap_compiles"]

UMAP_MODULES = (
    "umap.umap_",
    "umap.utils",
    "umap.layouts",
    "umap.distances",
    "umap.sparse",
    "umap.spectral",
    "pynndescent.pynndescent_",
    "pynndescent.utils",
    "pynndescent.distances",
    "pynndescent.sparse",
    "pynndescent.sparse_nndescent",
    "pynndescent.rp_trees",
    "pynndescent.graph_utils",
)

_done = False


def cached_dispatchers(modules: tuple[str, ...] = UMAP_MODULES) -> list:
    """The numba functions defined in ``modules`` (those importable here), cached or not."""
    from numba.core.registry import CPUDispatcher

    found = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        found += [
            obj
            for obj in vars(module).values()
            if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == module.__name__
        ]
    return found


def keep_umap_compiles() -> int:
    """Turn on numba's on-disk cache for umap-learn's and pynndescent's functions; return how many were off.

    Call it before the first UMAP fit, ``transform`` or unpickling in a process; calling it again does nothing.
    Functions already compiled in this process keep their in-memory code and are cached from their next compile.
    """
    global _done
    from numba.core.errors import NumbaWarning

    # again on every call: a caller's ``warnings.catch_warnings()`` block drops filters added inside it
    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)
    if _done:
        return 0
    from numba.core.caching import NullCache

    turned_on = 0
    for dispatcher in cached_dispatchers():
        if isinstance(dispatcher._cache, NullCache):
            dispatcher.enable_caching()
            turned_on += 1
    _done = True
    return turned_on


def _warm(sizes: tuple[int, ...] = (300, 5000)) -> None:
    """Compile and cache both of umap-learn's paths: exact neighbours below 4,096 scenes, pynndescent above."""
    import numpy as np

    from scenecluster.reduce import make_umap

    rng = np.random.default_rng(0)
    for n in sizes:
        X = rng.normal(size=(n, 32)).astype(np.float32)
        projection = make_umap(5, n_neighbors=15, backend="umap-learn")
        projection.fit(X).transform(X[:100])


if __name__ == "__main__":
    _warm()
