"""Ray's progress bars must not replace ``print`` in our processes: numba (under UMAP) cannot compile around it."""

import subprocess
import sys

import pytest

SCRIPT = """
import builtins, os, sys
{prelude}
import numba
from ray.experimental import tqdm_ray

tqdm_ray.instance()  # what showing a Ray Data progress bar does in a driver

@numba.njit
def chatty(x):
    if x < 0:
        print("negative", x)
    return x + 1

print(chatty(1), builtins.print.__module__ == "builtins")
"""


def _run(prelude: str) -> subprocess.CompletedProcess:
    env_free = "os.environ.pop('RAY_TQDM_PATCH_PRINT', None)"
    code = SCRIPT.format(prelude=f"{env_free}\n{prelude}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_scenecluster_keeps_print_compilable_after_a_progress_bar():
    res = _run("import scenecluster")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["2", "True"]


@pytest.mark.filterwarnings("ignore")
def test_without_it_numba_fails_as_seen_in_the_fit():
    res = _run("")
    assert res.returncode != 0
    assert "Untyped global name 'print'" in res.stderr
