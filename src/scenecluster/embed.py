"""Turn scene images into DINOv2 feature vectors with Ray Data.

The per-batch work is :class:`Embedder`, a plain callable class (numpy dict in, numpy dict out) with no Ray
import, so it can be tested and timed on a machine without Ray; :func:`embed_images` wires it into a
streaming Ray Data pipeline: read bytes (files or tar shards) -> decode in CPU tasks, or on the GPU inside
the actor -> embed on an actor pool -> write Parquet parts.

Resumable: the listing is cut into chunks; each finished chunk is one part file named by a hash of its
sources and the feature settings, so a rerun skips the parts already written and loses nothing done.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from scenecluster.config import EmbedConfig
from scenecluster.data import SceneListing, folder_label
from scenecluster.devices import Resources, resolve_torch_device
from scenecluster.errors import InputError
from scenecluster.features import FeatureSpec, resolve_feature_spec
from scenecluster.ingest import read_scenes
from scenecluster.models import load_backbone, normalize, pool_tokens
from scenecluster.outputs import OutputFolder


class Embedder:
    """Holds a DINOv2 backbone and maps a batch of decoded images to feature vectors.

    The feature is what ``spec`` names: the tokens of hidden layer ``spec.layer`` (passed through the model's
    final layer norm, as the last layer's output is), pooled by :func:`scenecluster.models.pool_tokens`.

    Parameters
    ----------
    spec : FeatureSpec
        Resolved in the driver by :func:`scenecluster.features.resolve_feature_spec`.
    device : str
        ``auto``, ``cpu`` or ``cuda`` (the driver's :class:`scenecluster.devices.Resources` says which).
    dtype : str, optional
        ``bfloat16`` or ``float32``; default bf16 on CUDA, fp32 on the CPU.
    torch_threads : int, optional
        Intra-op threads for CPU inference; set so that actors x threads does not exceed the cores.
    """

    def __init__(
        self, spec: FeatureSpec, *, device: str = "auto", dtype: str | None = None, torch_threads: int | None = None
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec = spec
        self.device = resolve_torch_device(device)
        self.dtype = getattr(torch, dtype) if dtype else torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = load_backbone(spec.source, torch_dtype=self.dtype).to(self.device).eval()

    @classmethod
    def for_model(
        cls, model: str, *, layer: int = -1, pooling: str = "cls", image_size: int = 224, **kwargs: Any
    ) -> Embedder:
        """Resolve the spec of ``model`` here and build the embedder: for direct use outside a job."""
        return cls(resolve_feature_spec(model, layer=layer, pooling=pooling, image_size=image_size), **kwargs)

    @property
    def n_features(self) -> int:
        return self.spec.n_features

    @torch.inference_mode()
    def embed(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """``uint8 (n, H, W, 3)`` (numpy, or a tensor already on the device) -> ``float32 (n, n_features)``."""
        if len(images) == 0:
            return np.zeros((0, self.n_features), dtype=np.float32)
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        x = images.to(self.device, non_blocking=True)
        x = normalize(x.permute(0, 3, 1, 2), self.spec.mean, self.spec.std).to(self.dtype)
        last = self.spec.is_last_layer
        out = self.model(pixel_values=x, output_hidden_states=not last)
        tokens = out.last_hidden_state if last else self.model.layernorm(out.hidden_states[self.spec.layer])
        return pool_tokens(tokens, self.spec.pooling).float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data batch function: ``{"path", "image", "error"}`` -> ``{"path", "error", "embedding"}``.

        Rows that failed to decode keep their path and error and get a NaN vector.
        """
        errors = np.array(batch["error"], dtype=object)
        images = batch.get("image")
        if images is None:  # undecoded bytes: decode here, on the GPU when there is one
            images, errors = self._decode(batch["bytes"], errors)
        ok = np.array([not e for e in errors], dtype=bool)
        emb = np.full((len(errors), self.n_features), np.nan, dtype=np.float32)
        emb[ok] = self.embed(images[torch.from_numpy(ok)] if isinstance(images, torch.Tensor) else images[ok])
        out = {"path": batch["path"], "error": errors, "embedding": emb}
        if "source" in batch:
            out["source"] = batch["source"]
        return out

    def _decode(self, blobs, errors: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        from scenecluster.gpudecode import decode_images

        return decode_images(blobs, errors, self.spec.image_size, device=self.device)


@dataclass
class EmbedResult:
    """What :func:`embed_images` did."""

    n_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    chunks_reused: int = 0
    chunks_computed: int = 0

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def embedding_schema(n_features: int, with_labels: bool) -> pa.Schema:
    fields = [pa.field("path", pa.string())]
    if with_labels:
        fields.append(pa.field("label", pa.string()))
    fields.append(pa.field("embedding", pa.list_(pa.float32(), n_features)))
    return pa.schema(fields)


def _vector_column(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """``(n, d)`` float32 matrix -> a fixed-size list column, without a per-row Python loop."""
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1])


def embedding_table(paths, embeddings: np.ndarray, labels=None) -> pa.Table:
    """Build the Parquet table: ``path``, optional ``label``, fixed-size float32 ``embedding``."""
    cols = {"path": pa.array(list(paths), pa.string())}
    if labels is not None:
        cols["label"] = pa.array(list(labels), pa.string())
    cols["embedding"] = _vector_column(embeddings)
    return pa.table(cols, schema=embedding_schema(embeddings.shape[1], labels is not None))


def read_embeddings(path, filesystem=None) -> tuple[list[str], np.ndarray, list[str] | None]:
    """Read ``embeddings.parquet`` back: paths, ``(n, d)`` float32 matrix and labels (or ``None``)."""
    table = pq.read_table(path, filesystem=filesystem)
    col = table.column("embedding").combine_chunks()
    d = col.type.list_size
    X = col.values.to_numpy(zero_copy_only=False).reshape(-1, d)
    labels = table.column("label").to_pylist() if "label" in table.column_names else None
    return table.column("path").to_pylist(), X, labels


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive listing entries whose embeddings are written together as one part."""

    index: int
    sources: list[str]
    key: str

    @property
    def part_name(self) -> str:
        return f"part-{self.index:06d}-{self.key}.parquet"


def plan_chunks(sources: list[str], chunk_size: int, feature_identity: dict) -> list[Chunk]:
    """Cut the (sorted) listing into chunks keyed by their sources and the feature settings."""
    ident = json.dumps(feature_identity, sort_keys=True).encode()
    chunks = []
    for index, start in enumerate(range(0, len(sources), chunk_size)):
        members = sources[start : start + chunk_size]
        digest = hashlib.sha1(ident)
        for src in members:
            digest.update(src.encode())
            digest.update(b"\0")
        chunks.append(Chunk(index=index, sources=members, key=digest.hexdigest()[:16]))
    return chunks


def build_embedding_dataset(
    sources: list[str], filesystem, spec: FeatureSpec, *, resources: Resources, settings: EmbedConfig
):
    """The Ray Data pipeline from listed sources to ``{"source", "path", "error", "embedding"}`` batches.

    Output order follows ``sources`` (``preserve_order``, which :func:`_write_parts` relies on), so consecutive
    chunks complete one after another. Reading and decoding are :func:`scenecluster.ingest.read_scenes`, in
    fractional-CPU tasks that overlap with the model actors; on GPU runs the actors decode JPEGs themselves
    (nvJPEG), as ``resources.decode_on_gpu`` says.
    """
    import ray

    batch_size = settings.batch_size
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = read_scenes(
        sources, filesystem, image_size=spec.image_size, batch_size=batch_size, decode=not resources.decode_on_gpu
    )
    return ds.map_batches(
        Embedder,
        fn_constructor_args=(spec,),
        fn_constructor_kwargs={
            "device": resources.device,
            "dtype": resources.dtype,
            "torch_threads": resources.torch_threads,
        },
        compute=ray.data.ActorPoolStrategy(size=settings.num_actors),
        batch_size=batch_size,
        num_cpus=settings.actor_cpus,
        num_gpus=resources.gpus_per_actor,
    )


def embed_images(
    listing: SceneListing,
    out: OutputFolder,
    spec: FeatureSpec,
    *,
    resources: Resources,
    settings: EmbedConfig,
    with_labels: bool = False,
) -> EmbedResult:
    """Embed every image of ``listing`` on the current Ray cluster into ``out/embeddings.parquet``.

    Finished chunks land in ``out/embeddings/part-*.parquet`` as they complete; a rerun skips them. At the
    end the parts are streamed into ``embeddings.parquet`` (written atomically) and the rows that could
    not be read or decoded are returned in ``EmbedResult.skipped``.
    """
    start = time.perf_counter()
    chunks = plan_chunks(listing.paths, settings.chunk_size, spec.identity())
    done = set(out.list("embeddings"))
    todo = [c for c in chunks if c.part_name not in done]
    result = EmbedResult(n_images=0, chunks_reused=len(chunks) - len(todo), chunks_computed=len(todo))
    if todo:
        sources = [src for c in todo for src in c.sources]
        ds = build_embedding_dataset(sources, listing.filesystem, spec, resources=resources, settings=settings)
        _write_parts(ds.iter_batches(batch_size=None, batch_format="numpy"), out, todo)
    result = _combine_parts(out, chunks, with_labels, result)
    result.seconds = time.perf_counter() - start
    return result


def _part_table(paths, errors, embeddings: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "path": pa.array(list(paths), pa.string()),
            "error": pa.array([str(e) for e in errors], pa.string()),
            "embedding": _vector_column(embeddings),
        }
    )


def _write_parts(batches: Iterator[dict[str, np.ndarray]], out: OutputFolder, todo: list[Chunk]) -> None:
    """Group the ordered output rows by chunk and write each chunk's part as soon as it is complete."""
    chunk_of = {src: i for i, c in enumerate(todo) for src in c.sources}
    current = 0
    pending: list[pa.Table] = []

    def flush(upto: int) -> None:
        nonlocal current, pending
        while current < upto:
            table = pa.concat_tables(pending) if pending else None
            if table is not None:
                out.write_table(posixpath.join("embeddings", todo[current].part_name), table)
            pending = []
            current += 1

    for batch in batches:
        owners = np.array([chunk_of[s] for s in batch["source"]])
        for idx in np.unique(owners):  # ascending, and never below `current` with preserve_order
            if idx > current:
                flush(idx)
            rows = owners == idx
            pending.append(_part_table(batch["path"][rows], batch["error"][rows], batch["embedding"][rows]))
    flush(len(todo))


def _combine_parts(out: OutputFolder, chunks: list[Chunk], with_labels: bool, result: EmbedResult) -> EmbedResult:
    """Stream the parts, in listing order, into ``embeddings.parquet``; collect the skipped rows."""
    writer: pq.ParquetWriter | None = None
    with out.open_atomic("embeddings.parquet") as sink:
        for chunk in chunks:
            part = out.read_table(posixpath.join("embeddings", chunk.part_name))
            result.n_images += part.num_rows
            bad = pc.not_equal(part.column("error"), "")
            for p, e in zip(
                part.filter(bad).column("path").to_pylist(), part.filter(bad).column("error").to_pylist(), strict=True
            ):
                result.skipped.append((p, e))
            good = part.filter(pc.invert(bad))
            if good.num_rows == 0:
                continue
            d = good.schema.field("embedding").type.list_size
            cols = {"path": good.column("path")}
            if with_labels:
                cols["label"] = pa.array([folder_label(p) for p in good.column("path").to_pylist()], pa.string())
            cols["embedding"] = good.column("embedding")
            table = pa.table(cols, schema=embedding_schema(d, with_labels))
            if writer is None:
                writer = pq.ParquetWriter(sink, table.schema)
            writer.write_table(table)
        if writer is None:
            raise InputError(f"none of the {result.n_images} images could be read and decoded; see skipped.txt")
        writer.close()
    return result
