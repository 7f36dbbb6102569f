"""The output folder, local or on S3: atomic writes and the check that a folder belongs to this run.

A run records what determines its embeddings in ``run.json``. A rerun with the same settings resumes
(finished work is reused); a different run pointed at the same folder is refused rather than mixed in.

Atomicity: a local file is written under a temporary name and renamed; an S3 object appears only when its
upload completes (a multipart upload that is never completed leaves no object), so neither leaves a file
that looks whole but is not.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from scenecluster.errors import InputError, OutputError, one_line

RUN_FILE = "run.json"
# skipped.txt: the tab-separated list that skipped.jsonl replaced, deleted with the rest on --overwrite
RESULT_FILES = (
    "embeddings.parquet",
    "assignments.parquet",
    "metrics.json",
    "report.html",
    "skipped.jsonl",
    "skipped.txt",
)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary name in the same local folder, then rename it over ``path``.

    A path that cannot be written (a folder of that name, a missing or read-only folder, a full disk) is an
    :class:`OutputError` naming it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or one_line(exc)}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class OutputFolder:
    """A run's output folder on a pyarrow filesystem (local disk or S3), with atomic writes.

    Parameters
    ----------
    uri : str
        A local folder or ``s3://bucket/prefix``.
    """

    def __init__(self, uri: str, *, endpoint_url: str | None = None) -> None:
        from scenecluster.data import open_filesystem

        self.uri = uri
        self.fs, self.root = open_filesystem(uri, endpoint_url=endpoint_url)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def display(self, name: str) -> str:
        """Where a file is, as the user would write it."""
        return self.path(name) if self.is_local else f"s3://{self.path(name)}"

    def exists(self, name: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File
        except OSError as exc:  # a store that does not answer or refuses: one line, not pyarrow's traceback
            raise OutputError(f"cannot read {self.display(name)}: {one_line(exc)}") from None

    def list(self, subfolder: str) -> list[str]:
        """Names of the files in ``subfolder`` (empty when it does not exist).

        Hidden names are left out: they are :meth:`open_atomic`'s temporary files, of a write in flight or of
        a worker killed mid-write (an empty ``.part-….parquet.tmp-…`` once failed the export of a rerun).
        """
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(subfolder), allow_not_found=True))
        except OSError as exc:
            if self.is_local:  # a file where the folder would be: nothing listed in it
                return []
            # an S3 store that does not answer or refuses: said so, not taken for "no files"
            raise OutputError(f"cannot list {self.display(subfolder)}: {one_line(exc)}") from None
        names = (posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)
        return sorted(name for name in names if not name.startswith("."))

    def is_empty(self) -> bool:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError as exc:
            raise OutputError(f"cannot read output {self.uri!r}: {one_line(exc)}") from None
        return not infos

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_json(self, name: str, default: Any = None) -> Any:
        """``name`` parsed as JSON, or ``default`` when it does not exist; a damaged file (cut short by a full
        disk, edited by hand) is one line naming it, not a JSONDecodeError from deep inside a report."""
        return self._read_parsed(name, default, json.loads, "JSON", json.JSONDecodeError)

    def read_yaml(self, name: str, default: Any = None) -> Any:
        """``name`` parsed as YAML (a run's ``config.yaml``), or ``default`` when it does not exist; a damaged
        file is one line naming it."""
        import yaml

        return self._read_parsed(name, default, yaml.safe_load, "YAML", yaml.YAMLError)

    def _read_parsed(self, name: str, default: Any, parse, kind: str, parse_error: type[Exception]) -> Any:
        if default is not None and not self.exists(name):
            return default
        try:
            return parse(self.read_text(name))
        except (parse_error, UnicodeDecodeError) as exc:
            raise InputError(f"{self.display(name)} is damaged, not {kind}: {one_line(exc)}") from None

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.path(name))

    @contextmanager
    def open_atomic(self, name: str) -> Iterator[pa.NativeFile]:
        """An output stream that becomes ``name`` only if the ``with`` block completes."""
        final = self.path(name)
        self.fs.create_dir(posixpath.dirname(final), recursive=True)
        if not self.is_local:
            # An S3 object appears when the upload completes on close; on error, abort it.
            stream = self.fs.open_output_stream(final)
            try:
                yield stream
            except BaseException:
                stream.abort() if hasattr(stream, "abort") else None
                raise
            stream.close()
            return
        tmp = posixpath.join(posixpath.dirname(final), f".{posixpath.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with self.fs.open_output_stream(tmp) as stream:
                yield stream
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_atomic(name) as f:
            f.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_table(self, name: str, table: pa.Table, row_group_size: int | None = None) -> None:
        with self.open_atomic(name) as f:
            pq.write_table(table, f, row_group_size=row_group_size)

    def read_table(self, name: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        """``name``'s ``columns``; with ``filters`` (pyarrow's DNF), row groups whose statistics rule them out
        are skipped unread."""
        try:
            return pq.read_table(self.path(name), filesystem=self.fs, columns=columns, filters=filters)
        except pa.ArrowInvalid as exc:  # a truncated or foreign file: name it, and how to get it back
            raise InputError(
                f"{self.display(name)} is damaged ({one_line(exc)}); delete it and rerun the job that wrote it"
            ) from None


def topmost_missing(fs: pafs.FileSystem, path: str) -> str | None:
    """The highest folder on ``path`` (itself included) that does not exist yet; None when ``path`` exists.

    Where a run's output would be created (:func:`check_writable` probes its parent), and what a probe that made
    the folders must remove again (``scenecluster doctor``)."""
    missing = None
    while path and fs.get_file_info(path).type == pafs.FileType.NotFound:
        missing, parent = path, posixpath.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def check_writable(uri: str, endpoint_url: str | None = None) -> None:
    """Fail now, with one line, when a local output folder cannot be created or written (before any heavy work).

    Tries what the run will do: makes (and removes) a folder in the output, or in its nearest existing parent
    when the output does not exist yet, so nothing is left behind. ``/proc/x``, ``/sys/x``, a read-only mount
    and a path under a file all fail here instead of after the model has loaded. An S3 output is asked only
    whether its store answers (one read, nothing written); its permissions show at the first write
    (``scenecluster doctor --output`` checks them ahead).

    Raises
    ------
    OutputError
        Naming the output and why it cannot be written.
    """
    from scenecluster.data import open_filesystem

    fs, root = open_filesystem(uri, endpoint_url=endpoint_url)
    if not isinstance(fs, pafs.LocalFileSystem):
        try:
            fs.get_file_info(root)
        except OSError as exc:
            raise OutputError(f"cannot reach output {uri!r}: {one_line(exc)}") from None
        return
    missing = topmost_missing(fs, root)
    existing = Path(posixpath.dirname(missing) if missing is not None else root)
    if existing.is_file() or (existing != Path(root) and not existing.is_dir()):
        raise OutputError(f"cannot create output {uri!r}: {str(existing)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".scenecluster-probe-", dir=existing))
    except OSError as exc:
        reason = exc.strerror or one_line(exc)
        raise OutputError(f"cannot write output {uri!r}: {reason} in {str(existing)!r}") from None


def prepare_output(folder: str | OutputFolder, identity: dict[str, Any], *, overwrite: bool = False) -> OutputFolder:
    """Create the output folder or check that it holds the same run; return it.

    Raises
    ------
    OutputError
        When the folder holds other files or a run with different settings (and ``overwrite`` is false).
    """
    out = folder if isinstance(folder, OutputFolder) else OutputFolder(os.fspath(folder))
    if out.is_local and os.path.isfile(out.root):
        raise OutputError(f"output {out.uri!r} is a file, not a folder")
    has_run = out.exists(RUN_FILE)
    previous = json.loads(out.read_text(RUN_FILE)) if has_run else None
    if not overwrite and not out.is_empty():
        if previous is None:
            raise OutputError(
                f"output folder {out.uri!r} is not empty and holds no scenecluster run; "
                "choose another --output or pass --overwrite"
            )
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            # a key the folder's run.json lacks: it was made by an earlier scenecluster, which did not record it
            changed = [f"{k} (not recorded by the version that made it)" if k not in previous else k for k in changed]
            raise OutputError(
                f"output folder {out.uri!r} holds a different run (differs in: {', '.join(changed)}); "
                "choose another --output or pass --overwrite"
            )
    try:
        out.fs.create_dir(out.root, recursive=True)
    except OSError as exc:
        raise OutputError(f"cannot create output {out.uri!r}: {one_line(exc)}") from None
    if overwrite and previous is not None and previous != identity:
        for stale in RESULT_FILES:
            out.delete(stale)
        for folder in ("embeddings", "members"):  # a part's embeddings, and its shard members' places
            for part in out.list(folder):
                out.delete(posixpath.join(folder, part))
    out.write_text(RUN_FILE, json.dumps(identity, indent=2, sort_keys=True))
    return out
