"""Embedding matrices as Arrow fixed-size list columns, and back, without a per-row Python loop.

Kept apart from :mod:`scenecluster.embed` (which imports torch and transformers for its model) because the processes
that only read or write embeddings, such as the fit task and the assignment actors of :mod:`scenecluster.scale`,
would otherwise import transformers for nothing: seconds and over a hundred MiB per Ray worker process.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["vector_column", "vector_matrix"]


def vector_column(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """``(n, d)`` float32 matrix -> a fixed-size list column, without a per-row Python loop."""
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1])


def vector_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A fixed-size list column -> ``(n, d)`` float32 matrix, without a per-row Python loop."""
    col = table.column(column).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
