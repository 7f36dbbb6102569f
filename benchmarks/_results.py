"""Reading what benchmarks wrote: JSON-lines result files and the GPU transfer run's features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_json_lines(path: str | Path) -> list[dict]:
    """Every record of a JSON-lines result file (one benchmark line each; blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_embedding_set(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One run's ``embeddings/`` folder or ``embeddings.parquet`` -> ``(X, labels)``, X float32 (n, d) as the job
    wrote it, labels its folder labels. ``path#cls`` keeps only the CLS token of a ``cls+mean`` embedding (its first
    half, exactly what ``embed.pooling: cls`` embeds, views averaged alike), so both poolings are measured on one
    embedding run."""
    from scenecluster.embed import read_embeddings

    path, _, part = path.partition("#")
    _, X, labels = read_embeddings(path)
    if part == "cls":
        X = np.ascontiguousarray(X[:, : X.shape[1] // 2])
    elif part:
        raise SystemExit(f"{path}#{part}: only '#cls' (the CLS half of a cls+mean embedding) may follow the path")
    return X, np.asarray(labels)


def read_embedding_sets(specs: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name=path`` specs -> ``{name: (X, labels)}``, each read by :func:`read_embedding_set` (``path#cls`` too)."""
    return {name: read_embedding_set(path) for name, path in (spec.split("=", 1) for spec in specs)}


def load_gpu224(folder: str | Path, feature: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A ``gpu_transfer.py`` result folder's float16 features (``<set>__<feature>.npy``; ``feature`` may be a glob,
    e.g. ``selftrain-*__d4`` for each set's own) as float32, with labels from ``meta.json``'s paths."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    out = {}
    for name, info in meta["sets"].items():
        found = sorted(folder.glob(f"{name}__{feature}.npy"))
        if found:
            X = np.load(found[0]).astype(np.float32)
            out[name] = (X, np.array([p.split("/")[0] for p in info["paths"]]))
    return out
