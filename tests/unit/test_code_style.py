"""The Python tree stays ``ruff check`` and ``ruff format`` clean (``pyproject.toml``'s settings).

Both were run by hand before each commit, and 22 files had still drifted from the formatter: in the test suite the
check cannot be forgotten. ``ruff`` comes with the dev extra, which the README's install and ``.ci/run`` install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TREES = ["src", "tests", "benchmarks", "rayjobs"]


def _ruff() -> str:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return found


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_the_tree_is_ruff_clean(command):
    result = subprocess.run(
        [_ruff(), *command, *TREES], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"ruff {' '.join(command)} found:\n{result.stdout}{result.stderr}"
