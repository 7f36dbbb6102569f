"""The output folder: atomic writes and the check that a folder belongs to this run.

A run records what determines its embeddings in ``run.json``. A rerun with the same settings resumes
(finished stages are reused); a different run pointed at the same folder is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from scenecluster.errors import OutputError

RUN_FILE = "run.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary name in the same folder, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def prepare_output(folder: str | os.PathLike, identity: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Create ``folder`` or check that it holds the same run; return it.

    Raises
    ------
    OutputError
        When the folder holds other files or a run with different settings (and ``overwrite`` is false).
    """
    out = Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} is a file, not a folder")
    run_file = out / RUN_FILE
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        if not run_file.is_file():
            raise OutputError(
                f"output folder {str(out)!r} is not empty and holds no scenecluster run; "
                "choose another --output or pass --overwrite"
            )
        previous = json.loads(run_file.read_text())
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise OutputError(
                f"output folder {str(out)!r} holds a different run (differs in: {', '.join(changed)}); "
                "choose another --output or pass --overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and run_file.is_file() and json.loads(run_file.read_text()) != identity:
        for stale in ("embeddings.parquet", "assignments.parquet", "metrics.json", "report.html", "skipped.txt"):
            (out / stale).unlink(missing_ok=True)
    atomic_write_text(run_file, json.dumps(identity, indent=2, sort_keys=True))
    return out
