"""Save a fitted :class:`DPGMM` as plain files and load it back: safetensors for the arrays, JSON for the rest.

No pickle: a saved mixture is data, so loading one from an untrusted place cannot run code. What is saved is
exactly what prediction needs (the variational posterior, the used components, the hyper-parameters) plus
the fit's summary (iterations, lower bound, number of clusters), so ``predict``, ``predict_proba`` and
``score_samples`` of the loaded model equal the original's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from scenecluster.mixture._dpgmm import DPGMM

__all__ = ["load_dpgmm", "save_dpgmm"]

ARRAYS_FILE = "mixture.safetensors"
META_FILE = "mixture.json"
FORMAT = "scenecluster-dpgmm/1"

_ARRAYS = (
    "mean_precision_",
    "means_",
    "degrees_of_freedom_",
    "covariances_",
    "precisions_cholesky_",
    "precisions_",
    "weights_",
)
_SCALARS = ("n_features_in_", "n_clusters_", "n_iter_", "converged_", "lower_bound_", "weight_concentration_prior_")


def save_dpgmm(model: DPGMM, folder: str | Path) -> None:
    """Write ``mixture.safetensors`` and ``mixture.json`` into ``folder`` (which must exist)."""
    folder = Path(folder)
    arrays = {name: np.ascontiguousarray(getattr(model, name), dtype=np.float64) for name in _ARRAYS}
    a, b = model.weight_concentration_
    arrays["weight_concentration_a"] = np.ascontiguousarray(a, dtype=np.float64)
    arrays["weight_concentration_b"] = np.ascontiguousarray(b, dtype=np.float64)
    arrays["used_components_"] = np.ascontiguousarray(model.used_components_, dtype=np.uint8)
    arrays["dropped_components_"] = np.ascontiguousarray(model.dropped_components_, dtype=np.uint8)
    params: dict[str, Any] = {}
    for key, value in model.get_params().items():
        if key in ("device", "dtype"):  # where it runs is the loader's choice
            continue
        if isinstance(value, np.ndarray | list | tuple):  # covariance_prior, mean_prior
            arrays[f"param.{key}"] = np.ascontiguousarray(value, dtype=np.float64)
        else:
            params[key] = _plain(value) if key != "random_state" or isinstance(value, int | None) else None
    save_file(arrays, str(folder / ARRAYS_FILE))
    meta = {"format": FORMAT, "params": params, "fitted": {name: _plain(getattr(model, name)) for name in _SCALARS}}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_dpgmm(folder: str | Path, *, device: str = "auto") -> DPGMM:
    """Rebuild the fitted :class:`DPGMM` saved in ``folder``, predicting on ``device``."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / META_FILE} is not a saved DPGMM of format {FORMAT} (found {meta.get('format')!r})")
    arrays = load_file(str(folder / ARRAYS_FILE))
    params = dict(meta["params"])
    params.update({k[len("param.") :]: v for k, v in arrays.items() if k.startswith("param.")})
    model = DPGMM(**params, device=device)
    for name in _ARRAYS:
        setattr(model, name, arrays[name])
    model.weight_concentration_ = (arrays["weight_concentration_a"], arrays["weight_concentration_b"])
    model.used_components_ = arrays["used_components_"].astype(bool)
    # saved before components could be dropped: none were
    dropped = arrays.get("dropped_components_", np.zeros(len(model.used_components_), dtype=np.uint8))
    model.dropped_components_ = dropped.astype(bool)
    for name, value in meta["fitted"].items():
        setattr(model, name, value)
    return model


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
