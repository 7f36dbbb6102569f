"""Read listed scenes with Ray Data: the one reader of every stage that reads images.

Embedding (:func:`scenecluster.embed.build_embedding_dataset`) and fine-tuning (:func:`scenecluster.train.fit_backbone`)
both build their input here, so a scene one stage can read the other can read too: loose image files and
``.tar`` shards alike (:func:`scenecluster.data.read_batch`), with a row per unreadable file or damaged shard that
carries the reason in ``error`` instead of failing the job, then decoded to ``image_size`` squares in CPU tasks
(:func:`scenecluster.data.decode_batch`). Labels are not read from the files: :func:`attach_labels` gives a
fine-tune's rows theirs from each row's ``path`` (:func:`scenecluster.data.folder_label`).

Ray is imported inside the functions, so this module imports (and is documented) without Ray. Nor does it import
torch or transformers: every Ray Data task and its ``SplitCoordinator`` imports the module its batch functions
live in, and torch with transformers costs seconds per process (it doubled a small fine-tune's time).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.fs as pafs

from scenecluster.data import decode_batch, folder_label, is_archive, read_batch
from scenecluster.pixels import PixelSpec

__all__ = ["READ_CPUS", "attach_labels", "count_scenes", "read_scenes"]

#: CPUs per read or decode task: fractional, so that reading and decoding overlap with the model's actors or
#: workers on a small node instead of waiting for a whole core (on 2 cores, whole-CPU tasks deadlock ingest).
READ_CPUS = 0.25
_MAX_BLOCKS = 100_000


def read_scenes(
    sources: list[str],
    filesystem: pafs.FileSystem,
    *,
    image_size: int | None,
    batch_size: int,
    decode: bool = True,
    pixels: PixelSpec | None = None,
):
    """The Ray Data dataset of the scenes under ``sources``.

    Parameters
    ----------
    sources : list of str
        Listed paths (:attr:`scenecluster.data.SceneListing.paths`): image files and ``.tar`` shards.
    filesystem : pyarrow.fs.FileSystem
        The listing's filesystem; it travels to the read tasks.
    image_size : int or None
        Decoded images are ``image_size`` px squares; unused (may be None) when ``decode=False``.
    batch_size : int
        Sources per read block when there are no shards, and rows per decode batch.
    decode : bool
        Decode in CPU tasks here (``{"source", "path", "image", "error"}`` rows, ``image`` uint8
        ``(image_size, image_size, 3)``); False leaves the ``bytes`` for the consumer to decode (e.g. on the GPU).
    pixels : PixelSpec, optional
        How scenes that are not 8-bit RGB become RGB (:mod:`scenecluster.pixels`; default: its defaults).

    Returns
    -------
    ray.data.Dataset
        One row per image (a shard's members each have a row, path ``<shard>/<member>``), plus one row per
        source that could not be read; order follows ``sources`` when the caller's ``DataContext`` preserves
        order.
    """
    import ray

    if decode and image_size is None:
        raise ValueError("read_scenes(decode=True) needs an image_size")
    # A shard expands to many rows, so shards get a block each; loose files are grouped batch_size to a block.
    n_blocks = len(sources) if any(is_archive(s) for s in sources) else max(1, len(sources) // batch_size)
    ds = ray.data.from_items([{"source": s} for s in sources], override_num_blocks=min(n_blocks, _MAX_BLOCKS))
    ds = ds.map_batches(read_batch, fn_kwargs={"filesystem": filesystem}, batch_size=None, num_cpus=READ_CPUS)
    if decode:
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"image_size": image_size, "pixels": pixels or PixelSpec()},
            batch_size=batch_size,
            num_cpus=READ_CPUS,
        )
    return ds


def _rows_per_source(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch function: ``{"source", ...}`` -> ``{"source", "n_rows"}``, one row per distinct source."""
    names, counts = np.unique(np.asarray(batch["source"], dtype=str), return_counts=True)
    return {"source": names.astype(object), "n_rows": counts.astype(np.int64)}


def count_scenes(sources: list[str], filesystem: pafs.FileSystem, *, batch_size: int = 32) -> dict[str, int]:
    """How many rows :func:`read_scenes` yields for each source: 1 for an image file, the members of a shard.

    A shard's members are only known once it is read, so this reads every shard once (in parallel Ray tasks,
    without decoding); image files are counted without reading. A damaged shard counts the members read before
    the damage plus its error row, as :func:`read_scenes` yields them.
    """
    counts = Counter({s: 1 for s in sources if not is_archive(s)})
    shards = [s for s in sources if is_archive(s)]
    if shards:
        ds = read_scenes(shards, filesystem, image_size=None, batch_size=batch_size, decode=False)
        ds = ds.map_batches(_rows_per_source, batch_size=None, num_cpus=READ_CPUS)
        for row in ds.iter_rows():  # a shard's rows may span blocks: add the partial counts
            counts[row["source"]] += int(row["n_rows"])
    return dict(counts)


def attach_labels(
    batch: dict[str, np.ndarray], *, classes: list[str], source: int, labels: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Ray Data batch function: add ``label`` (index into ``classes``) and ``source`` (the source's index).

    The label name is :func:`scenecluster.data.folder_label` of the row's path, the rule the embedding stage
    labels with. A row whose name is not among ``classes`` (a shard member stored under a folder that is no class
    folder of the listing) becomes an error row, dropped from the loss and counted like an unreadable file.

    A pseudo-labelled target (:mod:`scenecluster.self_train`) passes its ``labels`` by path instead: a readable
    row without one (a member of a shard whose other members were picked) is left out, not counted.
    """
    index = {c: i for i, c in enumerate(classes)}
    errors = np.array(batch["error"], dtype=object)
    if labels is None:
        names = [folder_label(str(p)) for p in batch["path"]]
    else:
        names = [labels.get(str(p)) for p in batch["path"]]
        picked = np.array([n is not None or bool(e) for n, e in zip(names, errors, strict=True)], dtype=bool)
        if not picked.all():
            batch = {k: np.asarray(v)[picked] for k, v in batch.items()}
            names, errors = [n for n, k in zip(names, picked, strict=True) if k], errors[picked]
    for i, name in enumerate(names):
        if name not in index and not errors[i]:
            errors[i] = f"label {name!r} is not a class folder of its source"
    ids = np.array([index.get(name, 0) for name in names], dtype=np.int64)
    return {**batch, "error": errors, "label": ids, "source": np.full(len(ids), source, dtype=np.int64)}
