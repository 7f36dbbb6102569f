"""Turn scene images into DINOv2 feature vectors with Ray Data.

The per-batch work is :class:`Embedder`, a plain callable class (numpy dict in, numpy dict out) with no Ray
import, so it can be tested and timed on a machine without Ray; :func:`embed_images` wires it into a
streaming Ray Data pipeline: read bytes (files or tar shards) -> decode in CPU tasks, or on the GPU inside
the actor -> embed on an actor pool -> write Parquet parts.

Resumable: the listing is cut into chunks; each finished chunk is one part file named by a hash of its
sources and the feature settings, so a rerun skips the parts already written and loses nothing done.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from scenecluster.config import EmbedConfig
from scenecluster.data import SceneListing
from scenecluster.devices import Resources, resolve_cpu_dtype, resolve_torch_device
from scenecluster.errors import InputError
from scenecluster.features import FeatureSpec, resolve_feature_spec, revealed_keys
from scenecluster.ingest import read_scenes
from scenecluster.manifest import MANIFEST, manifest_parts, part_dataset, part_name, part_size, write_manifest_paths
from scenecluster.models import load_backbone, normalize, pool_tokens
from scenecluster.outputs import OutputFolder
from scenecluster.vectors import vector_column, vector_matrix
from scenecluster.views import scene_views

EMBEDDINGS = "embeddings"  # the parts folder inside a run
# The counts of a finished embedding pass, beside the manifest they count: relisting deletes them with it.
PASS_FILE = f"{MANIFEST}/_embedded.json"
SKIPPED = "skipped.jsonl"  # one JSON object per scene that was not embedded: {"path": ..., "reason": ...}


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
        ``bfloat16``, ``float32`` or ``auto`` (bf16 on CUDA; on a CPU bf16 where it computes bf16 in hardware,
        :func:`scenecluster.devices.resolve_cpu_dtype`, as the job's actors do); default bf16 on CUDA, fp32 on the
        CPU.
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
        if self.device.type == "cuda":
            self.dtype = getattr(torch, dtype) if dtype not in (None, "auto") else torch.bfloat16
        else:
            self.dtype = resolve_cpu_dtype(dtype) if dtype else torch.float32
        self.model = (
            load_backbone(
                spec.source,
                torch_dtype=self.dtype,
                endpoint_url=spec.endpoint_url,
                credentials=revealed_keys(spec.credentials),
            )
            .to(self.device)
            .eval()
        )

    @classmethod
    def for_model(
        cls,
        model: str,
        *,
        layer: int = -1,
        pooling: str = "cls",
        image_size: int = 224,
        views: str = "one",
        **kwargs: Any,
    ) -> Embedder:
        """Resolve the spec of ``model`` here and build the embedder: for direct use outside a job."""
        spec = resolve_feature_spec(model, layer=layer, pooling=pooling, image_size=image_size, views=views)
        return cls(spec, **kwargs)

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
        views = scene_views(x, self.spec.views)
        total = self._feature(views[0]).float()
        for view in views[1:]:
            total += self._feature(view).float()
        return (total / len(views)).cpu().numpy()

    def _feature(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature of normalised images ``x`` (n, 3, H, W)."""
        last = self.spec.is_last_layer
        out = self.model(pixel_values=x, output_hidden_states=not last)
        tokens = out.last_hidden_state if last else self.model.layernorm(out.hidden_states[self.spec.layer])
        return pool_tokens(tokens, self.spec.pooling)

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

        return decode_images(blobs, errors, self.spec.image_size, device=self.device, pixels=self.spec.pixels)


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


def embedding_table(paths, embeddings: np.ndarray, labels=None) -> pa.Table:
    """Build the Parquet table: ``path``, optional ``label``, fixed-size float32 ``embedding``."""
    cols = {"path": pa.array(list(paths), pa.string())}
    if labels is not None:
        cols["label"] = pa.array(list(labels), pa.string())
    cols["embedding"] = vector_column(embeddings)
    return pa.table(cols, schema=embedding_schema(embeddings.shape[1], labels is not None))


def read_embeddings(path, filesystem=None) -> tuple[list[str], np.ndarray, list[str] | None]:
    """Read ``embeddings.parquet``, or a run's ``embeddings/`` folder of parts, back: paths, ``(n, d)`` float32
    matrix and labels (or ``None``).

    A run larger than ``scale.export_limit`` has no single file, so its folder is what a search (``tune``) or a
    benchmark script reads; its parts keep a row for each scene that could not be embedded (``error`` says why,
    the embedding is zeros), and those rows are left out here as the fit leaves them out.
    """
    table = pq.read_table(path, filesystem=filesystem)
    if "error" in table.column_names:
        table = table.filter(pc.equal(table.column("error"), ""))
    X = vector_matrix(table)
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
    """Cut a listing into chunks keyed by their sources and the feature settings (as the manifest does)."""
    chunks: list[Chunk] = []
    start = 0
    while start < len(sources):
        members = sources[start : start + part_size(len(chunks), chunk_size)]
        name = part_name(len(chunks), members, feature_identity)
        chunks.append(Chunk(index=len(chunks), sources=members, key=name.rsplit("-", 1)[1]))
        start += len(members)
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
        sources,
        filesystem,
        image_size=spec.image_size,
        batch_size=batch_size,
        decode=not resources.decode_on_gpu,
        pixels=spec.pixels,
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
    """Embed every image of ``listing`` on the current Ray cluster into parts and ``out/embeddings.parquet``.

    The listing's parts go to ``out/manifest/`` and the workers write ``out/embeddings/part-*.parquet`` as they
    finish (a rerun skips the parts already written); then the parts are exported into one
    ``embeddings.parquet`` and the rows that could not be read or decoded are returned in ``EmbedResult.skipped``.
    """
    start = time.perf_counter()
    write_manifest_paths(iter(listing.paths), out, identity=spec.identity(), chunk_size=settings.chunk_size)
    summary = embed_parts(out, listing.filesystem, spec, resources, settings, with_labels=with_labels)
    export_embeddings(out, summary, with_labels=with_labels)
    skipped = list(iter_skipped(out))
    return EmbedResult(
        n_images=summary.n_images,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        chunks_reused=summary.reused,
        chunks_computed=summary.computed,
    )


@dataclass
class EmbedSummary:
    """Counts of an embedding pass over parts: what the driver holds instead of the embeddings."""

    n_images: int
    n_ok: int
    parts: list[tuple[str, int]]  # (part name, embedded rows), in manifest order
    reused: int
    computed: int
    seconds: float

    def summary(self) -> str:
        skipped = self.n_images - self.n_ok
        if self.computed == 0:
            return f"reused {self.n_ok} embeddings in {self.reused} parts ({skipped} skipped)"
        text = f"{self.n_ok} embedded, {skipped} skipped, {self.n_images / max(self.seconds, 1e-9):.1f} images/s"
        return text + (f", {self.reused} of {self.reused + self.computed} parts reused" if self.reused else "")


def embed_parts(
    out: OutputFolder,
    filesystem,
    spec: FeatureSpec,
    resources: Resources,
    settings: EmbedConfig,
    *,
    with_labels: bool,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 60.0,
) -> EmbedSummary:
    """Run :class:`scenecluster.scale.PartEmbedder` actors over ``out/manifest/``; return the counts.

    A run of at most ``settings.task_parts`` parts (four hold up to 960 scenes) is embedded by Ray tasks instead,
    one part each and ``settings.num_actors`` at a time: a pool starts a fresh process per actor (Ray Data's
    executor, the actor, torch's and transformers' imports: 6-7 s of a small run here), where a task runs in a
    worker Ray already started, and leaves that worker, its imports done, to the tasks that follow. Ray Data logs
    a pool's progress; for the tasks ``progress`` is told the parts done, at most every ``progress_every_s``.

    Raises
    ------
    InputError
        When not one image could be read and decoded (``skipped.jsonl`` lists why).
    """
    import ray

    from scenecluster.scale import PartEmbedder, embed_named_parts
    from scenecluster.stages import every_so_often, run_tasks_interruptibly

    start = time.perf_counter()
    parts = manifest_parts(out)
    finished = finished_pass(out, parts)
    if finished is not None:
        return _summarise(finished, start)
    rows: list[tuple[str, int, int, bool]] = []
    if len(parts) <= settings.task_parts:
        task = ray.remote(embed_named_parts).options(num_cpus=settings.actor_cpus, num_gpus=resources.gpus_per_actor)
        done = run_tasks_interruptibly(
            lambda part: task.remote(
                spec, out, filesystem, resources, [part], batch_size=settings.batch_size, with_labels=with_labels
            ),
            parts,
            in_flight=settings.num_actors,
            on_done=every_so_often(progress_every_s, lambda n: f"[embed] {n} of {len(parts)} parts embedded", progress),
        )
        rows += [(c["name"], c["n_rows"], c["n_ok"], c["reused"]) for counts in done for c in counts]
    else:
        ds = part_dataset(out, parts=parts).map_batches(
            PartEmbedder,
            fn_constructor_args=(spec, out, filesystem, resources),
            fn_constructor_kwargs={"batch_size": settings.batch_size, "with_labels": with_labels},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=settings.num_actors),
            num_cpus=settings.actor_cpus,
            num_gpus=resources.gpus_per_actor,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows += zip(
                batch["name"].tolist(),
                batch["n_rows"].tolist(),
                batch["n_ok"].tolist(),
                batch["reused"].tolist(),
                strict=True,
            )
    rows.sort()
    summary = _summarise(rows, start)
    if summary.n_ok > 0:
        record_pass(out, rows)
    else:
        write_skipped(out)
        raise InputError(f"none of the {summary.n_images} images could be read and decoded; see {out.display(SKIPPED)}")
    return summary


def _summarise(rows: list[tuple[str, int, int, bool]], start: float) -> EmbedSummary:
    """``(part, rows, embedded rows, reused)`` of every part -> the pass's summary."""
    return EmbedSummary(
        n_images=sum(r[1] for r in rows),
        n_ok=sum(r[2] for r in rows),
        parts=[(name, n_ok) for name, _, n_ok, _ in rows],
        reused=sum(1 for r in rows if r[3]),
        computed=sum(1 for r in rows if not r[3]),
        seconds=time.perf_counter() - start,
    )


def record_pass(out: OutputFolder, rows: list[tuple[str, int, int, bool]]) -> None:
    """Keep a finished pass's ``(part, rows, embedded rows, reused)`` counts for :func:`finished_pass`."""
    out.write_text(PASS_FILE, json.dumps({"parts": [[name, n_rows, n_ok] for name, n_rows, n_ok, _ in rows]}))


def finished_pass(
    out: OutputFolder, parts: list[tuple[str, str]] | None = None
) -> list[tuple[str, int, int, bool]] | None:
    """The part counts of an earlier pass over this very manifest when every part it wrote is still there.

    ``parts``: :func:`scenecluster.manifest.manifest_parts` of ``out`` when the caller has already read it (the
    embedding stage hands the same list on to ``part_dataset``, so an archive's manifest is read once).

    Why: a rerun that would only find each part written (a benchmark's next seed, a pipeline's next stage, a
    resumed job) then starts no actors, which on a small run cost more than the clustering. Part names hash
    their sources and the feature spec, so the same names mean the same embeddings.
    """
    if not out.exists(PASS_FILE):
        return None
    counted = json.loads(out.read_text(PASS_FILE))["parts"]
    names = sorted(name for _, name in (manifest_parts(out) if parts is None else parts))
    present = {file.removesuffix(".parquet") for file in out.list(EMBEDDINGS)}
    if [row[0] for row in counted] != names or not present.issuperset(names):
        return None
    return [(name, int(n_rows), int(n_ok), True) for name, n_rows, n_ok in counted]


def iter_skipped(out: OutputFolder) -> Iterator[tuple[str, str]]:
    """``(path, reason)`` of every row the parts hold without an embedding, streamed from their error column."""
    import pyarrow.dataset as pads

    parts = pads.dataset(out.path(EMBEDDINGS), filesystem=out.fs, format="parquet")
    for batch in parts.to_batches(columns=["path", "error"], filter=pc.field("error") != ""):
        yield from zip(batch.column("path").to_pylist(), batch.column("error").to_pylist(), strict=True)


def write_skipped(out: OutputFolder) -> int:
    """Write ``skipped.jsonl`` from the parts, streaming; return the count.

    One JSON object per line, ``{"path": ..., "reason": ...}``: JSON escapes the tabs and newlines a file name
    may hold, which a tab-separated text could not carry, and any JSON Lines reader (``pandas.read_json(...,
    lines=True)``, ``jq``, ``pyarrow.json``) reads it as a table. Written (empty) even when nothing was skipped.
    """
    count = 0
    with out.open_atomic(SKIPPED) as sink:
        for path, reason in iter_skipped(out):
            sink.write((json.dumps({"path": path, "reason": reason}, ensure_ascii=False) + "\n").encode("utf-8"))
            count += 1
    return count


def read_skipped(out: OutputFolder) -> list[tuple[str, str]]:
    """``(path, reason)`` of each line of a run's ``skipped.jsonl`` (empty when there is none)."""
    if not out.exists(SKIPPED):
        return []
    rows = [json.loads(line) for line in out.read_text(SKIPPED).splitlines() if line.strip()]
    return [(row["path"], row["reason"]) for row in rows]


def export_embeddings(out: OutputFolder, summary: EmbedSummary, *, with_labels: bool) -> None:
    """Stream the parts' embedded rows, in listing order, into one ``embeddings.parquet`` (kept when unchanged)."""
    if summary.computed == 0 and out.exists("embeddings.parquet"):
        return
    writer: pq.ParquetWriter | None = None
    with out.open_atomic("embeddings.parquet") as sink:
        for name, n_ok in summary.parts:
            if n_ok == 0:
                continue
            part = out.read_table(posixpath.join(EMBEDDINGS, f"{name}.parquet"))
            good = part.filter(pc.equal(part.column("error"), ""))
            columns = ["path", "label", "embedding"] if with_labels else ["path", "embedding"]
            table = good.select(columns)
            if writer is None:
                writer = pq.ParquetWriter(sink, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
