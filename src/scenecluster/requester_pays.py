"""Reading an input from a Requester Pays bucket: every request says the requester accepts the charges.

Several archives of aerial and satellite scenes on AWS are Requester Pays buckets (NAIP's ``naip-analytic``,
Landsat Collection 2's ``usgs-landsat``): S3 refuses their objects, and even their listings, to anyone who does
not send ``x-amz-request-payer: requester``. pyarrow's S3 filesystem, through which the job reads its input,
cannot send that header (apache/arrow#38492, #34253), so with ``AWS_REQUEST_PAYER=requester`` in the driver's
environment (GDAL's and rasterio's name for the same choice) the input is read through boto3 instead:
:class:`RequesterPaysS3` is a read-only ``pyarrow.fs.FileSystemHandler`` that Ray Data's tasks, doctor and the
report use as they use pyarrow's own, and the listing's boto3 client sends the header too
(:func:`add_request_payer`). Outputs are the user's own and keep pyarrow's filesystem.
"""

from __future__ import annotations

import io
import os
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from botocore.exceptions import BotoCoreError, ClientError

#: What boto3 raises for a request S3 refused or that failed on the way (a connection dropped mid-object too).
_S3_ERRORS = (BotoCoreError, ClientError)

#: The environment variable that accepts a Requester Pays bucket's charges, as GDAL and rasterio read it.
VARIABLE = "AWS_REQUEST_PAYER"


def requester_pays() -> bool:
    """Whether ``AWS_REQUEST_PAYER`` accepts the charges: ``requester`` (any case) is yes, unset or empty is no.

    Raises
    ------
    ValueError
        For any other value, naming the variable: a typo would otherwise read as "no" and end in S3's bare
        AccessDenied on every object.
    """
    value = os.environ.get(VARIABLE, "").strip()
    if value.lower() == "requester":
        return True
    if value:
        raise ValueError(f"{VARIABLE}={value!r}: the only value S3 accepts is 'requester' (or leave it unset)")
    return False


def add_request_payer(client) -> None:
    """Make every request of the boto3 S3 ``client`` carry ``x-amz-request-payer: requester``, signed with it.

    A header on every request, as GDAL sends it, rather than ``RequestPayer=`` on each call: the listing's
    paginators and one-key probes need no change, and an operation whose parameters lack ``RequestPayer`` cannot
    be missed.
    """

    def _header(request, **_: Any) -> None:
        request.headers["x-amz-request-payer"] = "requester"

    client.meta.events.register_first("before-sign.s3", _header)


class RequesterPaysS3(pafs.FileSystemHandler):
    """A read-only pyarrow filesystem over boto3 whose requests accept a Requester Pays bucket's charges.

    Paths are pyarrow's S3 form, ``bucket/key``. Wrap it as ``pyarrow.fs.PyFileSystem(RequesterPaysS3(...))``.
    It pickles with its endpoint and explicit keys (as pyarrow's ``S3FileSystem`` does), not its client: each Ray
    worker makes its own. Streams read an object whole, as the job reads every scene and shard; random-access files
    read ranges (a report's member of a shard). A refused or missing object raises ``OSError`` naming it, which
    the job counts as a skipped scene.
    """

    def __init__(self, endpoint_url: str | None = None, credentials: dict[str, str] | None = None) -> None:
        self.endpoint_url = endpoint_url
        self.credentials = credentials
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "credentials": self.credentials}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RequesterPaysS3) and self.__getstate__() == other.__getstate__()

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]  # mutable client cache; equality is by settings

    @property
    def client(self):
        if self._client is None:
            from scenecluster.data import s3_client

            self._client = s3_client(self.endpoint_url, self.credentials, requester_pays=True)
        return self._client

    # ------------------------------------------------------------------------------------------- reading
    def get_type_name(self) -> str:
        return "s3-requester-pays"

    def normalize_path(self, path: str) -> str:
        return path.removeprefix("s3://").rstrip("/")

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return [self._info(path) for path in paths]

    def _info(self, path: str) -> pafs.FileInfo:
        bucket, key = _split(path)
        if not key:
            return pafs.FileInfo(path, pafs.FileType.Directory)
        try:
            head = self._call("head_object", path, Bucket=bucket, Key=key)
            return pafs.FileInfo(path, pafs.FileType.File, size=head["ContentLength"], mtime=head["LastModified"])
        except FileNotFoundError:
            pass
        page = self._call("list_objects_v2", path, Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        kind = pafs.FileType.Directory if page.get("KeyCount", 0) else pafs.FileType.NotFound
        return pafs.FileInfo(path, kind)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        base = self.normalize_path(selector.base_dir)
        bucket, key = _split(base)
        prefix = f"{key}/" if key else ""
        delimiter = {} if selector.recursive else {"Delimiter": "/"}
        infos: list[pafs.FileInfo] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **delimiter)
        try:
            for page in pages:
                for sub in page.get("CommonPrefixes", []):
                    infos.append(pafs.FileInfo(f"{bucket}/{sub['Prefix'].rstrip('/')}", pafs.FileType.Directory))
                for obj in page.get("Contents", []):
                    if obj["Key"] != prefix:  # a folder marker
                        path, size, mtime = f"{bucket}/{obj['Key']}", obj["Size"], obj["LastModified"]
                        infos.append(pafs.FileInfo(path, pafs.FileType.File, size=size, mtime=mtime))
        except _S3_ERRORS as exc:
            raise _os_error("listing", base, exc) from None
        if not infos and not selector.allow_not_found and key and self._info(base).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"Path does not exist '{base}'")
        return infos

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.BufferReader(self._read(path))

    def open_input_file(self, path: str) -> pa.NativeFile:
        """A random-access file whose reads are ranged GETs: a report reads one member of a shard of gigabytes."""
        info = self._info(self.normalize_path(path))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"Path does not exist '{path}'")
        if info.type != pafs.FileType.File:
            raise IsADirectoryError(f"'{path}' is a folder, not an object")
        return pa.PythonFile(_RangedObject(self, info.path, info.size), mode="r")

    def _read(self, path: str) -> bytes:
        bucket, key = _split(self.normalize_path(path))
        if not key:
            raise IsADirectoryError(f"'{path}' is a bucket, not an object")
        body = self._call("get_object", path, Bucket=bucket, Key=key)["Body"]
        try:
            return body.read()
        except _S3_ERRORS as exc:  # the connection dropped mid-object
            raise _os_error("reading", path, exc) from None

    def _call(self, operation: str, path: str, **params: Any) -> dict[str, Any]:
        try:
            return getattr(self.client, operation)(**params)
        except _S3_ERRORS as exc:
            raise _os_error("reading" if operation != "list_objects_v2" else "listing", path, exc) from None

    # -------------------------------------------------------------------------- writing: never the input
    def _read_only(self, *_: Any, **__: Any):
        raise OSError("the input of a Requester Pays bucket is read, never written (AWS_REQUEST_PAYER=requester)")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


class _RangedObject(io.RawIOBase):
    """A seekable, read-only view of one object of ``size`` bytes whose reads are ranged GETs (as pyarrow's own S3
    files read), each accepting the charges."""

    def __init__(self, handler: RequesterPaysS3, path: str, size: int) -> None:
        super().__init__()
        self.handler, self.path, self.size = handler, path, size
        self.bucket, self.key = _split(path)
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        end = min(self.position + len(buffer), self.size)
        if end <= self.position:
            return 0
        span = f"bytes={self.position}-{end - 1}"
        body = self.handler._call("get_object", self.path, Bucket=self.bucket, Key=self.key, Range=span)["Body"]
        try:
            data = body.read()
        except _S3_ERRORS as exc:  # the connection dropped mid-range
            raise _os_error("reading", self.path, exc) from None
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.removeprefix("s3://").partition("/")
    return bucket, key


def _os_error(doing: str, path: str, exc: BotoCoreError | ClientError) -> OSError:
    """boto3's error as the OSError pyarrow raises for the same failure: FileNotFoundError for a missing object
    or bucket, else OSError with S3's code and message, naming the path."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    code = str(error.get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    detail = f"AWS Error {code} ({status}): {error.get('Message') or code}" if code else str(exc)
    kind = FileNotFoundError if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound") else OSError
    return kind(f"When {doing} '{path}' (Requester Pays): {detail}")
