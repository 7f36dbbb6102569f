"""Turn scene images into DINOv2 feature vectors with Ray Data.

The per-batch work is :class:`Embedder`, a plain callable class (numpy dict in, numpy dict out) with no Ray
import, so it can be tested and timed on a machine without Ray; :func:`embed_images` wires it into a
streaming Ray Data pipeline: read bytes -> decode in tasks -> embed on an actor pool -> write Parquet.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scenecluster.data import SceneListing, decode_batch, folder_label
from scenecluster.devices import resolve_torch_device
from scenecluster.errors import InputError
from scenecluster.models import image_normalization, load_backbone

log = logging.getLogger(__name__)

POOLINGS = ("cls", "cls+mean")


class Embedder:
    """Holds a DINOv2 backbone and maps a batch of decoded images to feature vectors.

    The feature is the CLS token of hidden layer ``layer`` (1-based; negative counts from the end, ``-1``
    is the last), passed through the model's final layer norm as the last layer's output is; with
    ``pooling="cls+mean"`` the mean patch token is concatenated to it.

    Parameters
    ----------
    model : str
        Hugging Face id or local folder (see :func:`scenecluster.models.load_backbone`).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    torch_threads : int, optional
        Intra-op threads for CPU inference; set it so that actors x threads does not exceed the cores.
    """

    def __init__(
        self,
        model: str,
        *,
        layer: int = -1,
        pooling: str = "cls",
        device: str = "auto",
        torch_threads: int | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = resolve_torch_device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = load_backbone(model, torch_dtype=self.dtype).to(self.device).eval()
        n_layers = self.model.config.num_hidden_layers
        self.layer = layer if layer > 0 else n_layers + 1 + layer
        if not 1 <= self.layer <= n_layers:
            raise ValueError(f"layer must be in 1..{n_layers} or -{n_layers}..-1, not {layer}")
        self.pooling = pooling
        mean, std = image_normalization(model)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0

    @property
    def n_features(self) -> int:
        hidden = self.model.config.hidden_size
        return hidden * (2 if self.pooling == "cls+mean" else 1)

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """``uint8 (n, H, W, 3)`` -> ``float32 (n, n_features)``."""
        if len(images) == 0:
            return np.zeros((0, self.n_features), dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().sub_(self._mean).div_(self._std).to(self.dtype)
        last = self.layer == self.model.config.num_hidden_layers
        out = self.model(pixel_values=x, output_hidden_states=not last)
        tokens = out.last_hidden_state if last else self.model.layernorm(out.hidden_states[self.layer])
        feats = tokens[:, 0]
        if self.pooling == "cls+mean":
            feats = torch.cat([feats, tokens[:, 1:].mean(dim=1)], dim=1)
        return feats.float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data batch function: ``{"path", "image", "error"}`` -> ``{"path", "error", "embedding"}``.

        Rows that failed to decode keep their path and error and get a NaN vector.
        """
        errors = batch["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        emb = np.full((len(errors), self.n_features), np.nan, dtype=np.float32)
        emb[ok] = self.embed(batch["image"][ok])
        return {"path": batch["path"], "error": errors, "embedding": emb}


@dataclass
class EmbedResult:
    """What :func:`embed_images` did."""

    n_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def embedding_schema(n_features: int, with_labels: bool) -> pa.Schema:
    fields = [pa.field("path", pa.string())]
    if with_labels:
        fields.append(pa.field("label", pa.string()))
    fields.append(pa.field("embedding", pa.list_(pa.float32(), n_features)))
    return pa.schema(fields)


def embedding_table(paths, embeddings: np.ndarray, labels=None) -> pa.Table:
    """Build the Parquet table: ``path``, optional ``label``, fixed-size float32 ``embedding``."""
    n, d = embeddings.shape
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    cols = {"path": pa.array(list(paths), pa.string())}
    if labels is not None:
        cols["label"] = pa.array(list(labels), pa.string())
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(flat, d)
    return pa.table(cols, schema=embedding_schema(d, labels is not None))


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str] | None]:
    """Read ``embeddings.parquet`` back: paths, ``(n, d)`` float32 matrix and labels (or ``None``)."""
    table = pq.read_table(path)
    col = table.column("embedding").combine_chunks()
    d = col.type.list_size
    X = col.values.to_numpy(zero_copy_only=False).reshape(-1, d)
    labels = table.column("label").to_pylist() if "label" in table.column_names else None
    return table.column("path").to_pylist(), X, labels


def embed_images(
    listing: SceneListing,
    output: str | os.PathLike,
    *,
    model: str,
    layer: int = -1,
    pooling: str = "cls",
    image_size: int = 224,
    batch_size: int = 32,
    num_actors: int = 1,
    actor_cpus: float = 1.0,
    actor_gpus: float = 0.0,
    torch_threads: int | None = None,
    with_labels: bool = False,
) -> EmbedResult:
    """Embed every image of ``listing`` on the current Ray cluster and write ``output`` (Parquet).

    The file is written under a temporary name and renamed at the end, so an interrupted run never leaves
    a file that looks whole. Undecodable images are skipped and returned in ``EmbedResult.skipped``.
    """
    import ray

    start = time.perf_counter()
    ds = ray.data.read_binary_files(
        listing.paths,
        filesystem=listing.filesystem,
        include_paths=True,
        num_cpus=0.25,
    )
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"image_size": image_size},
        batch_size=batch_size,
        num_cpus=0.25,
    )
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model": model,
            "layer": layer,
            "pooling": pooling,
            "device": "cuda" if actor_gpus > 0 else "cpu",
            "torch_threads": torch_threads,
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        num_cpus=actor_cpus,
        num_gpus=actor_gpus,
    )
    result = _write_batches(ds.iter_batches(batch_size=None, batch_format="numpy"), output, with_labels)
    result.seconds = time.perf_counter() - start
    return result


def _write_batches(batches: Iterator[dict[str, np.ndarray]], output, with_labels: bool) -> EmbedResult:
    output = os.fspath(output)
    tmp = f"{output}.tmp-{os.getpid()}"
    writer: pq.ParquetWriter | None = None
    result = EmbedResult(n_images=0)
    try:
        for batch in batches:
            errors = batch["error"]
            ok = np.array([not e for e in errors], dtype=bool)
            result.n_images += len(errors)
            result.skipped.extend((p, e) for p, e, good in zip(batch["path"], errors, ok, strict=True) if not good)
            if not ok.any():
                continue
            paths = batch["path"][ok]
            labels = [folder_label(p) for p in paths] if with_labels else None
            table = embedding_table(paths, batch["embedding"][ok], labels)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is None:
            raise InputError(f"none of the {result.n_images} images could be decoded; see the skipped list")
        writer.close()
        writer = None
        os.replace(tmp, output)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return result
