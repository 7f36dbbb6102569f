"""Where each member of a run's ``.tar`` shards lies in its shard, so one member is read back without its shard.

A shard (WebDataset-style, hundreds of MB to GB) is read whole when it is embedded; a report needs a few of its
members again, for thumbnails. The embedding actors keep each member's byte range (:func:`scenecluster.data.
read_batch` finds it; only an uncompressed shard stores a member's bytes as they are) in ``members/<part>.parquet``
beside the part's embeddings, written before the part, so a finished part always has its ranges. A member is then
one ranged read of its shard (:class:`ShardMemberReader`).
"""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from scenecluster.outputs import OutputFolder

__all__ = ["MEMBERS", "NO_RANGE", "NoRecordedRange", "ShardMemberReader", "member_ranges"]

MEMBERS = "members"  # a run's folder of ``<part name>.parquet``: path, offset, size of each shard member

#: Why a member of a shard could not be read back on its own.
NO_RANGE = (
    "have no recorded place in their shard (a compressed shard, or a run embedded before such places were "
    "kept), and a shard is not read whole for a thumbnail"
)


class NoRecordedRange(LookupError):
    """A shard member whose byte range the run did not record (:data:`NO_RANGE`)."""


def member_ranges(paths: Sequence[str], offsets: Sequence[int], sizes: Sequence[int]) -> pa.Table | None:
    """The ``members/<part>.parquet`` table of one part's rows (``offset`` -1: a file of its own, or a member not
    stored in place); None when the part holds no member that can be read back."""
    kept = [(p, o, n) for p, o, n in zip(paths, offsets, sizes, strict=True) if o >= 0]
    if not kept:
        return None
    return pa.table(
        {
            "path": pa.array([p for p, _, _ in kept], pa.string()),
            "offset": pa.array([o for _, o, _ in kept], pa.int64()),
            "size": pa.array([n for _, _, n in kept], pa.int64()),
        }
    )


class ShardMemberReader:
    """Reads a member of one of ``out``'s shards (path ``<shard>/<member>``) by its recorded byte range.

    Which part a shard was embedded in is read from the run's manifest the first time a member is asked for, and
    each part's ranges when one of its members is; a report asks for a few thousand scenes, so this stays small.
    Safe to call from several threads (a report reads its thumbnails in parallel): the index is built under a
    lock, the members are read outside it.
    """

    def __init__(self, out: OutputFolder, filesystem: pafs.FileSystem) -> None:
        self.out, self.fs = out, filesystem
        self._part_of_shard: dict[str, str] | None = None
        self._ranges: dict[str, tuple[int, int]] = {}
        self._parts_read: set[str] = set()
        self._lock = threading.Lock()

    def read(self, path: str) -> bytes:
        """The member's bytes. Raises :class:`NoRecordedRange` when its range was not recorded, and what reading
        the shard raises (``OSError``)."""
        with self._lock:
            found = self._range(path)
        if found is None:
            raise NoRecordedRange(path)
        shard, offset, size = found
        with self.fs.open_input_file(shard) as f:
            data = f.read_at(size, offset)
        if len(data) != size:
            raise OSError(f"{shard} is shorter than when it was embedded (read {len(data)} of {size} bytes)")
        return data

    def _range(self, path: str) -> tuple[str, int, int] | None:
        shards = self._shards()
        parts = path.split("/")
        for i in range(1, len(parts)):
            shard = "/".join(parts[:i])
            part = shards.get(shard)
            if part is None:
                continue
            if part not in self._parts_read:
                self._parts_read.add(part)
                self._read_part(part)
            if path in self._ranges:
                offset, size = self._ranges[path]
                return shard, offset, size
        return None

    def _shards(self) -> dict[str, str]:
        if self._part_of_shard is None:
            from scenecluster.data import is_archive
            from scenecluster.manifest import MANIFEST, manifest_files

            self._part_of_shard = {}
            for file in manifest_files(self.out):  # each file read once, for its parts' names and sources
                table = self.out.read_table(posixpath.join(MANIFEST, file), columns=["name", "sources"])
                for name, sources in zip(
                    table.column("name").to_pylist(), table.column("sources").to_pylist(), strict=True
                ):
                    self._part_of_shard.update({s: name for s in sources if is_archive(s)})
        return self._part_of_shard

    def _read_part(self, part: str) -> None:
        file = posixpath.join(MEMBERS, f"{part}.parquet")
        if not self.out.exists(file):
            return
        table = self.out.read_table(file)
        self._ranges.update(
            zip(
                table.column("path").to_pylist(),
                zip(table.column("offset").to_pylist(), table.column("size").to_pylist(), strict=True),
                strict=True,
            )
        )
