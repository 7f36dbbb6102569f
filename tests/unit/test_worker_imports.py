"""What a Ray worker process imports before it can run one of the job's functions.

Ray imports the module of every task function, actor class and Ray Data batch function in each new worker process
that runs it, so a module that imports torch or transformers at its top makes each such process pay seconds and
hundreds of MiB before it reads a byte. Before these checks, a fine-tune's label function lived in
``scenecluster.train``: every Ray Data task and SplitCoordinator of a fine-tune imported torch and transformers, and
a 2-step fine-tune took 45 s instead of 22 s on 2 cores (docs/benchmarks.md).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# module -> the heavy packages it must not import; what runs from it in a Ray worker
LIGHT = {
    # read, decode and label tasks of every embedding and fine-tune dataset, and their SplitCoordinator
    "scenecluster.ingest": ("torch", "transformers", "sklearn", "umap"),
    "scenecluster.data": ("torch", "transformers", "sklearn", "umap"),
    # the manifest's part loaders, which feed every embedding and assignment pass
    "scenecluster.manifest": ("torch", "transformers", "sklearn", "umap"),
    # the fit task and the assignment actors need torch and UMAP (imported when they run), never transformers
    "scenecluster.scale": ("torch", "transformers"),
}


@pytest.mark.parametrize("module", sorted(LIGHT))
def test_modules_that_ray_workers_import_stay_light(module):
    heavy = LIGHT[module]
    code = f"import sys, {module}; print(sorted(name for name in {heavy!r} if name in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"{module} imports {done.stdout.strip()}"


def test_the_fine_tunes_batch_functions_live_in_the_light_reader():
    from scenecluster import ingest, train

    # train._dataset maps this function; the module ships by reference to each Ray Data task
    assert train.attach_labels is ingest.attach_labels
    assert ingest.attach_labels.__module__ == "scenecluster.ingest"
