"""Stream an archive's listing into a manifest of parts, so the driver never holds the whole listing.

A folder is walked (sorted, one directory at a time) and an S3 prefix is paged (1,000 keys a request, in key
order, its sub-prefixes listed side by side: :mod:`scenecluster.s3listing`) lazily. The driver groups
consecutive entries into *parts* (64 sources, then doubling up to ``chunk_size``: :func:`part_size`) and writes
them, a few hundred parts per file, to ``OUT/manifest/``; Ray Data reads that folder, so what the driver holds
is one part and the counts. A part's name carries a hash of its sources and the feature identity (and, when it holds
a scene other than JPEG, the revision of how such scenes are read), so a rerun that finds
``embeddings/<part>.parquet`` knows that part is done. With ``sample``, a seeded reservoir keeps a
uniform sample (memory grows with the sample, not the archive).
Symbolic links are followed once (:func:`scenecluster.data.walk_local`), so a loop cannot hang the listing
and each file is listed once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from scenecluster.data import (
    ARCHIVE_SUFFIXES,
    IMAGE_SUFFIXES,
    is_archive,
    open_filesystem,
    open_input,
    reads_requester_pays,
    walk_local,
    wanted,
)
from scenecluster.errors import InputError
from scenecluster.outputs import OutputFolder, check_writable
from scenecluster.pixels import READING_REVISION, reading_revision

__all__ = [
    "Manifest",
    "check_input",
    "check_run_paths",
    "drop_unlisted_parts",
    "iter_scene_paths",
    "listed_reading",
    "load_parts",
    "manifest_files",
    "manifest_parts",
    "part_dataset",
    "part_name",
    "part_size",
    "write_manifest",
    "write_manifest_paths",
]

MANIFEST = "manifest"
DONE_FILE = "manifest/_manifest.json"
PARTS_PER_FILE = 256
# A manifest file is flushed at this many paths too: the listing holds one file's paths at a time, so with
# parts of 4,096 scenes, 256 parts would be a million paths (150 MB) in the driver.
PATHS_PER_FILE = 65_536
LOADERS = 2  # concurrent part-loading tasks: each reads one part's row group, ahead of the actors
FIRST_PART = 64  # sources in the first part; later parts double up to ``embed.chunk_size``
PART_FOLDERS = ("embeddings", "assignments", "members")  # a run's folders of one ``<part>.parquet`` per part
_SUFFIXES = IMAGE_SUFFIXES + ARCHIVE_SUFFIXES


@dataclass(frozen=True)
class Manifest:
    """What the listing found: counts only (the parts themselves are in ``OUT/manifest/``)."""

    n_sources: int
    n_parts: int
    root: str
    n_archives: int = 0
    # sources in a format whose reading has been revised (scenecluster.pixels.reading_revision): not JPEG
    n_revised: int = 0
    # the listing an earlier run left in the folder, kept: scenes added to the input since are not in it
    kept: bool = False


def _walk_s3(root: str, endpoint_url: str | None, *, requester_pays: bool = False) -> Iterator[str]:
    """The wanted keys under ``bucket/prefix`` in key order, pages of 1,000, sub-prefixes listed side by side
    (:func:`scenecluster.s3listing.walk_s3`); with ``requester_pays`` each request accepts the bucket's charges."""
    from scenecluster.data import s3_client
    from scenecluster.s3listing import walk_s3

    bucket, _, prefix = root.partition("/")
    client = s3_client(endpoint_url, requester_pays=requester_pays)
    for key in walk_s3(client, bucket, prefix.rstrip("/") + "/" if prefix else ""):
        if wanted(key):
            yield f"{bucket}/{key}"


def iter_scene_paths(uri: str, *, endpoint_url: str | None = None) -> Iterator[str]:
    """The images and ``.tar`` shards under ``uri``, lazily, as paths of its pyarrow filesystem.

    Raises
    ------
    InputError
        When the location does not exist, is a file, or cannot be read.
    """
    fs, root = open_input(uri, endpoint_url=endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):
        return walk_local(root)
    return _walk_s3(root, endpoint_url, requester_pays=reads_requester_pays(fs))


def part_name(index: int, sources: list[str], identity: dict) -> str:
    """``part-<index>-<hash of identity and sources>``: equal names mean equal work.

    A part holding a scene whose format's reading has been revised (:func:`scenecluster.pixels.reading_revision`:
    anything but JPEG) has the revision in its hash too, so a part an earlier reading made is not taken for done.
    """
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode())
    revision = None
    for src in sources:
        digest.update(src.encode())
        digest.update(b"\0")
        revision = revision or reading_revision(src)
    if revision is not None:
        digest.update(f"reading {revision}".encode())
    return f"part-{index:06d}-{digest.hexdigest()[:16]}"


def _reporting(paths: Iterator[str], report: Callable[[int], None], every_s: float) -> Iterator[str]:
    """``paths`` as they come, calling ``report(n)`` with the count so far at most every ``every_s`` seconds (the
    clock is read once per 1,000 paths, a page of an S3 listing)."""
    last = time.monotonic()
    for n, path in enumerate(paths, 1):
        yield path
        if n % 1000 == 0 and time.monotonic() - last >= every_s:
            report(n)
            last = time.monotonic()


def _sampled(paths: Iterator[str], sample: int, seed: int) -> Iterator[str]:
    """A seeded uniform sample of ``sample`` paths (keys drawn per path, the smallest kept), sorted."""
    rng = np.random.default_rng(seed)
    heap: list[tuple[float, str]] = []
    for path in paths:
        key = -float(rng.random())
        if len(heap) < sample:
            heapq.heappush(heap, (key, path))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, path))
    return iter(sorted(p for _, p in heap))


def write_manifest(
    uri: str,
    out: OutputFolder,
    *,
    identity: dict,
    chunk_size: int,
    endpoint_url: str | None = None,
    sample: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    progress_every_s: float = 30.0,
) -> Manifest:
    """List ``uri`` into ``out/manifest/`` (reused when a finished one with the same identity is there).

    ``progress(n)`` is told the number of images listed so far, at most every ``progress_every_s`` seconds: listing
    ten million keys takes minutes (a request per 1,000), and a job's log should show it moving.
    """
    # the seed draws the sample and nothing else: without one, another seed lists the same scenes, and a
    # relisting would also drop the finished pass that lets the next run skip the embedding
    # the reading's revision names the parts (part_name): a listing made under another one is named anew
    key = {**identity, "chunk_size": chunk_size, "sample": sample, "input": uri, "reading": READING_REVISION}
    if sample is not None:
        key["seed"] = seed
    if out.exists(DONE_FILE):
        done = json.loads(out.read_text(DONE_FILE))
        if _but_reading(done.get("key")) == _but_reading(key):
            if done["key"] != key:
                done = {**done, "key": key, **_rename_parts(out, identity)}
                out.write_text(DONE_FILE, json.dumps(done))
            # a manifest written before shards were counted may hold some: -1 says "unknown"
            return Manifest(
                done["n_sources"],
                done["n_parts"],
                done["root"],
                done.get("n_archives", -1),
                done["n_revised"],
                kept=True,
            )
    paths = iter_scene_paths(uri, endpoint_url=endpoint_url)
    if progress is not None:
        paths = _reporting(paths, progress, progress_every_s)
    if sample is not None:
        paths = _sampled(paths, sample, seed)
    manifest = write_manifest_paths(paths, out, identity=identity, chunk_size=chunk_size)
    if manifest.n_sources == 0:
        raise InputError(f"input {uri!r} holds no images ({', '.join(_SUFFIXES)})")
    root = open_filesystem(uri, endpoint_url=endpoint_url)[1]
    done = {
        "key": key,
        "n_sources": manifest.n_sources,
        "n_parts": manifest.n_parts,
        "root": root,
        "n_archives": manifest.n_archives,
        "n_revised": manifest.n_revised,
    }
    out.write_text(DONE_FILE, json.dumps(done))
    return dataclasses.replace(manifest, root=root)


def listed_reading(out: OutputFolder) -> int | None:
    """The reading revision that a run folder's listing embedded its scenes other than JPEG under; None when it
    lists none (JPEGs are read alike by every revision) or holds no finished listing.

    A listing finished before revisions were recorded gives 0, the reading of every scenecluster before revision 1.
    Why: a clustering saved before ``clustering.json`` recorded its ``reading`` is known by its run's listing.
    """
    if not out.exists(DONE_FILE):
        return None
    done = json.loads(out.read_text(DONE_FILE))
    n_revised = done.get("n_revised")
    if n_revised is None:  # listed before such scenes were counted
        n_revised = sum(
            _count_revised(out.read_table(f"{MANIFEST}/{file}", columns=["sources"]).column("sources").to_pylist())
            for file in manifest_files(out)
        )
    return done.get("key", {}).get("reading", 0) if n_revised else None


def manifest_files(out: OutputFolder) -> list[str]:
    """The listing's files in ``out/manifest/``, in order."""
    return sorted(f for f in out.list(MANIFEST) if f.endswith(".parquet"))


def _count_revised(parts: list[list[str]]) -> int:
    """How many of the parts' sources are in a format whose reading has a revision (:func:`reading_revision`)."""
    return sum(reading_revision(path) is not None for sources in parts for path in sources)


def _but_reading(key: dict | None) -> dict | None:
    return None if key is None else {k: v for k, v in key.items() if k != "reading"}


def _rename_parts(out: OutputFolder, identity: dict) -> dict[str, int]:
    """Name the listed parts as this reading names them (:func:`part_name`), keeping their scenes and their cut.

    Why not list again: a run folder's listing is made once, so a rerun goes on over the scenes it first listed
    (tiles added since are for ``assign``). Only the parts that hold scenes read otherwise now change their names;
    their old embeddings and assignments are dropped (:func:`drop_unlisted_parts`) and made again. One manifest
    file (at most ``PATHS_PER_FILE`` paths) is held at a time.
    """
    names: list[str] = []
    n_revised = 0
    for file in manifest_files(out):
        table = out.read_table(f"{MANIFEST}/{file}")
        parts = table.column("sources").to_pylist()
        renamed = [part_name(len(names) + i, sources, identity) for i, sources in enumerate(parts)]
        n_revised += _count_revised(parts)
        if renamed != table.column("name").to_pylist():
            column = table.schema.get_field_index("name")
            table = table.set_column(column, "name", pa.array(renamed, pa.string()))
            out.write_table(f"{MANIFEST}/{file}", table, row_group_size=1)
        names += renamed
    drop_unlisted_parts(out, set(names))
    return {"n_parts": len(names), "n_revised": n_revised}


def write_manifest_paths(paths: Iterator[str], out: OutputFolder, *, identity: dict, chunk_size: int) -> Manifest:
    """Write the parts of an already listed sequence of ``paths`` to ``out/manifest/`` (replacing any there), and
    delete the part files of earlier listings that this one does not name (:func:`drop_unlisted_parts`)."""
    for stale in out.list(MANIFEST):
        out.delete(posixpath.join(MANIFEST, stale))
    n_sources, names, n_archives, n_revised = _write_parts(paths, out, identity, chunk_size)
    drop_unlisted_parts(out, set(names))
    return Manifest(n_sources, len(names), "", n_archives, n_revised)


def drop_unlisted_parts(out: OutputFolder, listed: set[str]) -> None:
    """Delete the ``embeddings/`` and ``assignments/`` parts whose names ``listed`` does not hold.

    Why: what reads a run takes a part folder as the run (the report's totals and samples, ``skipped.jsonl``,
    the single-file exports), and a listing cut otherwise (another ``embed.chunk_size``) names its parts anew,
    so the old parts would count every scene twice. A part the new listing names alike is the same work and stays.
    """
    for folder in PART_FOLDERS:
        for file in out.list(folder):
            if file.endswith(".parquet") and file.removesuffix(".parquet") not in listed:
                out.delete(posixpath.join(folder, file))


def part_dataset(out: OutputFolder, columns: list[str] | None = None, parts: list[tuple[str, str]] | None = None):
    """``out/manifest/`` as a Ray Dataset of one block per part, so actors take parts one at a time.

    ``parts``: :func:`manifest_parts` of ``out`` when the caller has already read it.

    The driver reads only the parts' names (one short string per part, not the sources) and makes one block
    of ``{file, name}`` per part; fractional-CPU tasks then load each part's columns from its manifest file.
    Why not ``ray.data.read_parquet``:

    - a manifest file holds up to ``PARTS_PER_FILE`` parts and the Parquet reader packs small files into one
      read task, so the map over them was one actor task holding every part: one actor embedded the whole
      archive while the others idled, and after 30 minutes without output Ray Data stopped the run
      (``ExecutionTimeoutError``);
    - its file-listing step is a task that asks for a whole CPU. Once the actor pool has started, a cluster
      whose free CPUs are fractions (two nodes of one CPU, each running a half-CPU actor) can never schedule
      it, and the job waits forever.

    The loading tasks ask for no CPU: each reads one part's row group of a manifest file, and any CPU they
    asked for could be the one the actors already hold (one actor of one CPU on a one-CPU Ray waited forever on
    a quarter-CPU loader).
    """
    import ray

    items = [{"file": file, "name": name} for file, name in (manifest_parts(out) if parts is None else parts)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    wanted = ["name", "sources"] if columns is None else list(columns)
    return ds.map_batches(
        load_parts,
        fn_kwargs={"out": out, "columns": wanted},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=LOADERS),  # zero-CPU tasks are otherwise bounded by nothing
    )


def manifest_parts(out: OutputFolder) -> list[tuple[str, str]]:
    """``(manifest file, part name)`` of every part in ``out/manifest/``, in order (names only, not sources)."""
    return [
        (file, part)
        for file in manifest_files(out)
        for part in out.read_table(f"{MANIFEST}/{file}", columns=["name"]).column("name").to_pylist()
    ]


def load_parts(batch: pa.Table, out: OutputFolder, columns: list[str]) -> pa.Table:
    """The rows of ``batch``'s parts (``file``, ``name``) with ``columns`` read from their manifest files."""
    if set(columns) <= {"name"}:
        return batch.select(columns)
    loaded = []
    for file in sorted(set(batch.column("file").to_pylist())):
        names = pc.filter(batch.column("name"), pc.equal(batch.column("file"), file)).to_pylist()
        # one row group per part (``_write_parts``): the name filter reads this part's row group only, where
        # a whole file would be up to PATHS_PER_FILE paths, 16x a part of 4,096
        table = out.read_table(f"{MANIFEST}/{file}", filters=[("name", "in", names)])
        loaded.append(table.select(columns))
    return pa.concat_tables(loaded)


def check_run_paths(input_uri: str, output: str, *, endpoint_url: str | None = None) -> None:
    """A run's first checks, before any heavy work: the input holds images (:func:`check_input`) and the output
    can be written (:func:`scenecluster.outputs.check_writable`). ``cluster``, ``assign``, ``pipeline`` and
    ``benchmark`` make them before a fine-tune or the model, and the CLI before it imports the job's modules
    (torch, transformers, scikit-learn take seconds), so a typo in a path costs neither."""
    check_input(input_uri, endpoint_url=endpoint_url)
    check_writable(output, endpoint_url)


def check_input(uri: str, *, endpoint_url: str | None = None) -> None:
    """Fail now, with one line, on an input that is missing, a file, or holds no images (reads one entry)."""
    if next(iter_scene_paths(uri, endpoint_url=endpoint_url), None) is None:
        raise InputError(f"input {uri!r} holds no images ({', '.join(_SUFFIXES)})")


def part_size(index: int, chunk_size: int) -> int:
    """Sources in part ``index``: ``FIRST_PART``, doubling part by part up to ``chunk_size``.

    Small first parts make a small run resumable (a run of 300 scenes is 3 parts, not 1, so a kill loses at
    most the part in flight), while a large archive still gets parts of ``chunk_size`` and few files.
    """
    return min(chunk_size, FIRST_PART << min(index, 20))


def _write_parts(
    paths: Iterator[str], out: OutputFolder, identity: dict, chunk_size: int
) -> tuple[int, list[str], int, int]:
    """Group ``paths`` into parts and write them, at most ``PARTS_PER_FILE`` parts and about ``PATHS_PER_FILE``
    paths per manifest file; return ``(sources, part names, archives, revised)`` (a name per part: 2,500 for 10M
    scenes; revised: the sources whose format's reading has a revision)."""
    rows: dict[str, list] = {"name": [], "sources": []}
    n_sources = n_archives = n_revised = held = 0
    names: list[str] = []  # every part's name so far: len(names) is the next part's index
    current: list[str] = []

    def close_part() -> None:
        nonlocal current, held
        names.append(part_name(len(names), current, identity))
        rows["name"].append(names[-1])
        rows["sources"].append(current)
        held, current = held + len(current), []
        if len(rows["name"]) == PARTS_PER_FILE or held >= PATHS_PER_FILE:
            flush()

    def flush() -> None:
        nonlocal held
        if rows["name"]:
            table = pa.table({"name": rows["name"], "sources": pa.array(rows["sources"], pa.list_(pa.string()))})
            # a row group per part, so a loader reads its own part's sources and skips the file's others
            out.write_table(f"{MANIFEST}/manifest-{len(names):08d}.parquet", table, row_group_size=1)
            rows["name"], rows["sources"], held = [], [], 0

    for path in paths:
        current.append(path)
        n_sources += 1
        n_archives += is_archive(path)
        n_revised += reading_revision(path) is not None
        if len(current) == part_size(len(names), chunk_size):
            close_part()
    if current:
        close_part()
    flush()
    return n_sources, names, n_archives, n_revised
