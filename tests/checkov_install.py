"""checkov in a virtual environment of its own, installed in the background while other tests run.

checkov pins boto3, botocore and packaging below what this project uses, so it cannot join the dev extra; its
tests install it, at the version ``constraints.txt`` pins, into a throwaway virtual environment under the pytest
cache. On a fresh CI machine that install took about 45 s, which the suite waited for when the lint tests reached
their fixture. ``tests/conftest.py`` starts it instead as soon as collection shows a test that needs it: the
integration tests (most of the suite's time, much of it spent waiting on Ray processes) run meanwhile, and the lint
tests find it done.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import venv
from pathlib import Path

__all__ = ["FIXTURE", "checkov_executable", "start"]

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = "checkov"  # the fixture's name: a collected test that uses it starts the install

_lock = threading.Lock()
_install: threading.Thread | None = None
_result: tuple[str | None, str] = (None, "not installed")


def requirement() -> str:
    """``checkov==X`` as ``constraints.txt`` pins it."""
    pin = re.search(r"^checkov==\S+", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    if pin is None:
        raise AssertionError("constraints.txt must pin checkov")
    return pin.group(0)


def tools_dir(config) -> Path:
    """The environment's folder: in the pytest cache, kept for the next run, or a temporary folder without it."""
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        return Path(cache.mkdir("checkov-venv"))
    return Path(tempfile.gettempdir()) / "scenecluster-checkov-venv"


def start(config) -> None:
    """Start installing checkov in a thread (once), unless it is installed already."""
    global _install
    with _lock:
        if _install is None:
            _install = threading.Thread(target=_run, args=(tools_dir(config),), name="checkov-install", daemon=True)
            _install.start()


def checkov_executable(config) -> tuple[str | None, str]:
    """Wait for the install: ``(path of checkov, "")``, or ``(None, why it could not be installed)``."""
    start(config)
    assert _install is not None
    _install.join()
    return _result


def _run(env_dir: Path) -> None:
    global _result
    try:
        _result = _installed(env_dir, requirement())
    except Exception as exc:  # a failed install skips the lint tests with the reason; it must not end the thread
        _result = (None, f"{type(exc).__name__}: {exc}")


def _installed(env_dir: Path, pinned: str) -> tuple[str | None, str]:
    exe, marker = env_dir / "bin" / "checkov", env_dir / f".installed-{pinned}"
    if marker.is_file() and exe.is_file():
        return str(exe), ""
    shutil.rmtree(env_dir, ignore_errors=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    proc = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", pinned],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        return None, f"{pinned} could not be installed: {proc.stderr.strip().splitlines()[-1:]}"
    marker.write_text("")
    return str(exe), ""
