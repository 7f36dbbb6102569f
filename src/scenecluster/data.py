"""Find scene images under a local folder or an S3 prefix, and decode them into fixed-size arrays.

Listing is separate from reading so the driver knows the work (and the ground-truth labels of a
``<class>/<image>`` layout) before any Ray task starts; decoding is a plain function over a batch of bytes
so Ray Data can run it in tasks that overlap with the model's compute.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import posixpath
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from scenecluster.errors import InputError, one_line
from scenecluster.pixels import PixelSpec, read_pixels

if TYPE_CHECKING:
    from scenecluster.shard_members import ShardMemberReader

# JPEG 2000 is how Sentinel-2 delivers its bands (16-bit, one band a file) and WebP how many tile servers store
# tiles; PIL decodes both (its wheels bundle OpenJPEG and libwebp), through the same path as PNG.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".jp2", ".j2k", ".webp")
#: The formats, as the messages that name them say them.
IMAGE_FORMATS = "JPEG, PNG, TIFF, JPEG 2000 or WebP"
ARCHIVE_SUFFIXES = (".tar",)
S3_CONNECTIONS = 32  # a boto3 client's pool: scenecluster.s3listing's listers and their probes (boto3's default: 10)
#: What decoding a scene may raise that makes it skipped and listed, not fatal (the job's reading and doctor's).
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)
log = logging.getLogger(__name__)
DEFAULT_PIXELS = PixelSpec()


@dataclass(frozen=True)
class SceneListing:
    """The images of one input location.

    ``paths`` are in the filesystem's own form (no ``s3://`` scheme), sorted; ``uri`` is what the user gave.
    """

    uri: str
    root: str
    paths: list[str]
    filesystem: pafs.FileSystem

    def __len__(self) -> int:
        return len(self.paths)


def open_filesystem(uri: str, *, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Return the pyarrow filesystem and the path inside it for a local path or ``s3://bucket/prefix``.

    For S3 the endpoint comes from ``endpoint_url`` or ``AWS_ENDPOINT_URL`` (non-AWS stores such as
    SeaweedFS or MinIO), credentials from the standard AWS variables, the region from :func:`s3_region`.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InputError(f"{uri!r} names no bucket: give s3://bucket/prefix")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {"region": s3_region(parsed.netloc, endpoint)}
        if keys := store_credentials():
            # Explicit keys travel with the (pickled) filesystem to Ray workers, whose environment may
            # lack them; without keys each node uses its own credential chain (e.g. an instance profile).
            kwargs.update(
                access_key=keys["aws_access_key_id"],
                secret_key=keys["aws_secret_access_key"],
                session_token=keys.get("aws_session_token"),
            )
        if endpoint:
            ep = urlparse(endpoint)
            kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
        return pafs.S3FileSystem(**kwargs), (parsed.netloc + parsed.path).rstrip("/")
    try:
        path = local_path(uri)
    except NotLocalError:
        raise InputError(f"unsupported location {uri!r}: give a local path or an s3://bucket/prefix") from None
    except ValueError as exc:  # file://host
        raise InputError(f"unsupported location: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def configured_region() -> str:
    """``AWS_REGION``, else ``AWS_DEFAULT_REGION`` (the variables AWS's SDKs read), else ``us-east-1``."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_region(bucket: str, endpoint: str | None) -> str:
    """The region to sign requests to ``bucket`` for: on AWS itself (no ``endpoint``) the bucket's own, as S3
    reports it to anyone (:func:`_bucket_region`); for another store, or when S3 cannot be asked,
    :func:`configured_region`.

    Why: an S3 bucket answers only in its own region, and pyarrow does not follow S3's redirect to it. Open-data
    buckets (Sentinel-2 and Landsat COGs, NAIP) sit in one region while clusters run in others, and a cluster's
    ``AWS_REGION`` names where the cluster is, not where every bucket is; the configured region made every read of
    such a bucket fail with an HTTP 301.
    """
    return (_bucket_region(bucket) if endpoint is None else None) or configured_region()


@functools.lru_cache(maxsize=1024)
def _bucket_region(bucket: str) -> str | None:
    """``pyarrow.fs.resolve_s3_region``: one unsigned request per bucket and process; None when it fails."""
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError) as exc:  # no route to AWS, or no such bucket: the real request will say which
        log.debug("region of bucket %r not resolved: %s", bucket, one_line(exc))
        return None


class NotLocalError(ValueError):
    """A location that is a URI of a store or a remote host, not a path on this machine."""


#: Schemes read as a store or remote host even without ``//`` (``s3:/bucket/x``, ``s3:bucket/x`` were typos of
#: ``s3://``); any other ``word:`` prefix is part of a relative path (``run:1``) unless ``://`` follows.
URI_SCHEMES = frozenset({"s3", "s3a", "s3n", "gs", "gcs", "http", "https", "hdfs", "abfs", "abfss", "az", "ftp"})


def local_path(location: str) -> str:
    """``location`` as a path on this machine: itself, or a ``file://`` URI's path.

    Raises :class:`NotLocalError` for a URI of another scheme (``s3://``, ``s3:/``, ``gs://``), which ``pathlib``
    would read as a relative path (``s3:/bucket/x``) and so write to a folder named ``s3:`` in the working
    directory, and ValueError for a ``file://`` URI that names a host (``file://out`` is the host ``out``).
    A ``file://`` URI's path is percent-decoded (RFC 8089), as a browser or ``Path.as_uri()`` writes it:
    ``file:///data/my%20scenes`` is the folder ``/data/my scenes``.
    """
    parsed = urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(
                f"{location!r} names the host {parsed.netloc!r}, not a folder; give file:///absolute/path or a path"
            )
        return unquote(parsed.path)
    if parsed.scheme.lower() in URI_SCHEMES or (parsed.scheme and "://" in location):
        raise NotLocalError(f"must be a path on this machine, not {location!r}")
    return location


def absolute_location(location: str) -> str:
    """``location`` as any process finds it again: a store's URI as given, a path on this machine made absolute
    (``~`` expanded, ``file://`` read as its path). Ray refuses a relative storage path only once its workers have
    started (``URI has empty scheme``), and a path printed for the user should not depend on where it was read."""
    if "://" in location and urlparse(location).scheme != "file":
        return location
    return os.fspath(Path(local_path(location)).expanduser().resolve())


def store_credentials() -> dict[str, str] | None:
    """The explicit S3 keys in this process's environment, or None (each node then uses its own chain).

    The driver resolves them once and hands them to the workers that read S3 through boto3 (an ``s3://`` model),
    as :func:`open_filesystem`'s pickled filesystem carries them for every other read and write: a worker's own
    environment may lack them (a job joining a cluster from a shell that holds the keys).
    """
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        return None
    keys = {
        "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"],
    }
    if os.environ.get("AWS_SESSION_TOKEN"):
        keys["aws_session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return keys


def s3_client(endpoint_url: str | None = None, credentials: dict[str, str] | None = None, *, requester_pays=False):
    """A boto3 S3 client for what pyarrow does not give: paged key listings, ETags, managed downloads.

    Endpoint as :func:`open_filesystem` (``endpoint_url``, else ``AWS_ENDPOINT_URL``), path-style addressing
    (which every S3-compatible store accepts), credentials as :func:`store_credentials` gives them, else from
    the standard chain. Where the chain finds none the client's requests are unsigned, as pyarrow's already are
    (:func:`unsigned`): public open-data buckets (Sentinel-2 COGs, SpaceNet) are then listed as they are read,
    where boto3 would stop at ``NoCredentialsError``. With ``requester_pays`` every request accepts a Requester
    Pays bucket's charges (:mod:`scenecluster.requester_pays`).
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    # connections for the listing's threads: 8 listers, and up to 4 probes each while one cuts its keys into ranges
    config = Config(s3={"addressing_style": "path"}, max_pool_connections=S3_CONNECTIONS)
    if not credentials and unsigned():
        config = config.merge(Config(signature_version=UNSIGNED))
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
        region_name=configured_region(),  # boto3 follows S3's redirect to a bucket's own region; pyarrow does not
        config=config,
        **(credentials or {}),
    )
    if requester_pays:
        from scenecluster.requester_pays import add_request_payer

        add_request_payer(client)
    return client


# What the AWS credential chain reads, by which the answer of unsigned() is kept (a test or a shell may set them).
_CHAIN_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED",
)


def unsigned() -> bool:
    """Whether this process has no AWS credentials at all (none in the environment, the files, a container's or
    an instance's role), so S3 requests go unsigned: only public buckets answer them.

    Asked of boto3's chain once per set of the variables it reads (on a machine outside AWS, the instance
    metadata lookup costs about a second).
    """
    return _no_credentials(tuple(os.environ.get(name) for name in _CHAIN_VARIABLES))


@functools.lru_cache(maxsize=8)
def _no_credentials(_chain: tuple[str | None, ...]) -> bool:
    import boto3

    return boto3.Session().get_credentials() is None


def input_filesystem(uri: str, *, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """:func:`open_filesystem` for scenes to read: with ``AWS_REQUEST_PAYER=requester`` an ``s3://`` input is read
    through boto3, whose requests accept a Requester Pays bucket's charges (:mod:`scenecluster.requester_pays`);
    pyarrow's S3 filesystem cannot send that header. Outputs never take this route.

    Raises
    ------
    InputError
        When ``AWS_REQUEST_PAYER`` holds another value than ``requester``.
    """
    from scenecluster.requester_pays import RequesterPaysS3, requester_pays

    fs, root = open_filesystem(uri, endpoint_url=endpoint_url)
    try:
        paying = requester_pays()
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if paying and isinstance(fs, pafs.S3FileSystem):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        fs = pafs.PyFileSystem(RequesterPaysS3(endpoint, store_credentials()))
    return fs, root


def reads_requester_pays(fs: pafs.FileSystem) -> bool:
    """Whether ``fs`` is :func:`input_filesystem`'s Requester Pays reader: the listing's client and doctor follow
    the choice the input's filesystem was made with, not a second reading of the environment."""
    from scenecluster.requester_pays import RequesterPaysS3

    return isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, RequesterPaysS3)


def open_input(uri: str, *, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root of an input folder or prefix (:func:`input_filesystem`), checked to exist and not
    to be a file.

    Raises
    ------
    InputError
        With one line naming ``uri`` and what is wrong with it.
    """
    fs, root = input_filesystem(uri, endpoint_url=endpoint_url)
    try:
        info = fs.get_file_info(root)
    except OSError as exc:
        raise InputError(f"cannot read input {uri!r}: {one_line(exc)}{refused_hint(fs, exc)}") from None
    bucket_root = not isinstance(fs, pafs.LocalFileSystem) and "/" not in root
    if info.type == pafs.FileType.NotFound and not bucket_root:
        raise InputError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        raise InputError(f"input {uri!r} is a file; give the folder (or prefix) that holds the images")
    return fs, root


def unsigned_hint(fs: pafs.FileSystem) -> str:
    """What to add to a refused S3 request's message when it went unsigned (:func:`unsigned`)."""
    if not isinstance(fs, pafs.LocalFileSystem) and unsigned():
        return (
            " (no AWS credentials were found, so the request was unsigned, which only public buckets answer: set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    return ""


def refused_hint(fs: pafs.FileSystem, exc: BaseException | str) -> str:
    """What to add to the message of an S3 request that was refused (:func:`unsigned_hint`, and the Requester Pays
    header when it was not sent: such a bucket answers anyone else with a bare AccessDenied, listings included)."""
    hint = unsigned_hint(fs)
    denied = re.search(r"ACCESS_DENIED|AccessDenied|\b403\b", str(exc))
    if denied and isinstance(fs, pafs.S3FileSystem):  # the Requester Pays reader is a PyFileSystem
        hint += " (if the bucket is Requester Pays, set AWS_REQUEST_PAYER=requester to accept its charges)"
    return hint


def wanted(name: str) -> bool:
    """Whether a listed name is an image or a shard (by suffix) and not hidden."""
    return name.lower().endswith(IMAGE_SUFFIXES + ARCHIVE_SUFFIXES) and not posixpath.basename(name).startswith(".")


def walk_local(root: str) -> Iterator[str]:
    """Files under ``root`` in sorted order, depth first, following symbolic links once.

    A link whose target lies inside the input is skipped: the walk reaches the target through its real path,
    so each file is listed once and a link to a parent cannot loop. A link that leads outside the input is
    followed, each real folder at most once, so a loop out there ends too. Archives are often assembled from
    links to other storage, so not following links at all would silently drop scenes.
    """
    real_root = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    skipped = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:  # a folder outside the input reached twice
                skipped += 1
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            if entry.is_symlink() and _listed_anyway(entry, real_root):
                skipped += 1
            elif entry.is_dir():
                subfolders.append(entry.path)
            elif wanted(entry.name) and entry.is_file():
                yield entry.path
        stack.extend(reversed(subfolders))
    if skipped:
        log.info("listing %s: skipped %d links to files or folders listed through their own path", root, skipped)


def _listed_anyway(link: os.DirEntry, real_root: str) -> bool:
    """Whether the walk reaches a link's target through its real path (or the link loops back into the input)."""
    target = os.path.realpath(link.path)
    if not (target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)):
        return False
    # a link to a file is kept when its target is not listed under its own name (a.jpg -> blob.bin)
    return link.is_dir() or wanted(os.path.basename(target))


def list_scenes(
    uri: str,
    *,
    endpoint_url: str | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> SceneListing:
    """List the images (JPEG, PNG, TIFF, JPEG 2000, WebP), and the ``.tar`` shards of images, under ``uri``,
    recursively.

    A ``.tar`` shard (WebDataset-style, as large archives are stored) is one entry here; its members are
    read, and counted as images, when the shard is streamed.

    Parameters
    ----------
    uri : str
        A local folder or ``s3://bucket/prefix``.
    sample : int, optional
        Keep a uniform random sample of this many images (seeded), for quick runs on big archives.

    Raises
    ------
    InputError
        When the location does not exist, cannot be listed, or holds no images.
    """
    fs, root = open_input(uri, endpoint_url=endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):  # pyarrow's recursive listing follows link loops forever
        paths = sorted(walk_local(root))
    else:
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except OSError as exc:
            raise InputError(f"cannot list input {uri!r}: {one_line(exc)}") from None
        paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and wanted(i.path))
    if not paths:
        raise InputError(f"input {uri!r} holds no images ({', '.join(IMAGE_SUFFIXES + ARCHIVE_SUFFIXES)})")
    if sample is not None:
        if sample < 1:
            raise InputError(f"sample must be at least 1, not {sample}")
        if sample < len(paths):
            paths = sorted(random.Random(seed).sample(paths, sample))
    return SceneListing(uri=uri, root=root, paths=paths, filesystem=fs)


def is_archive(path: str) -> bool:
    """Whether a listed path is a ``.tar`` shard (read as many images) rather than one image file."""
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def in_archive(path: str) -> bool:
    """Whether a row's path is a member of a ``.tar`` shard (``<shard>/<member>``, :func:`read_batch`), which only
    reading its whole shard gives back."""
    return any(is_archive(part) for part in path.replace(os.sep, "/").split("/")[:-1])


def folder_label(path: str) -> str:
    """The ground-truth label of a scene in a ``<class>/<image>`` layout: the folder the image sits in.

    The one labelling rule of every stage (embedding's ``label`` column, fine-tuning's classes and targets), applied
    to a listed path or to a row's path. A member of a ``.tar`` shard has the path ``<shard>/<member>``
    (:func:`read_batch`): a member stored as ``<class>/<image>`` takes its own folder, and a member at the shard's
    top level takes the folder the shard sits in, so ``Forest/shard-0.tar`` holding ``a.jpg`` labels it ``Forest``
    (never ``shard-0.tar``). A real folder whose name ends in ``.tar`` is read as a shard here.
    """
    parent = posixpath.dirname(path.replace(os.sep, "/"))
    if is_archive(parent):  # a member at the top level of a shard
        parent = posixpath.dirname(parent)
    return posixpath.basename(parent)


def decode_image(data: bytes, image_size: int, pixels: PixelSpec = DEFAULT_PIXELS) -> np.ndarray:
    """Decode one image to RGB and resize it to ``image_size`` square (bicubic), as ``uint8 (H, W, 3)``.

    Bit depths and band counts other than 8-bit RGB are turned into RGB as ``pixels`` says
    (:mod:`scenecluster.pixels`). Scenes are tiles, so the whole tile is resized rather than centre-cropped:
    cropping would throw away the border of a 64-px EuroSAT tile that the label may depend on.
    """
    rgb = Image.fromarray(read_pixels(data, pixels))
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)  # a writable copy: torch.from_numpy refuses read-only arrays


def read_batch(batch: dict[str, np.ndarray], *, filesystem: pafs.FileSystem) -> dict[str, np.ndarray]:
    """Ray Data batch function: ``{"source"}`` -> ``{"source", "path", "bytes", "error", "offset"}``.

    Reads each listed file, and expands each ``.tar`` shard into one row per image member (its path is
    ``<shard>/<member>``, which :func:`folder_label` labels). A file that cannot be
    read (it vanished, or access was refused) or a shard that is cut short becomes a row with the reason
    in ``error`` instead of failing the job: one bad object in a million is counted, not fatal.

    ``offset`` is where a member's bytes start in its shard's object, so that one ranged read gives the member back
    later (a report's thumbnail) without the whole shard; -1 for a file of its own, and for a member whose bytes
    are not stored as they are at that place (a compressed shard).
    """
    sources, paths, datas, errors, offsets = [], [], [], [], []

    def add(source: str, path: str, data: bytes, error: str, offset: int = -1) -> None:
        sources.append(source)
        paths.append(path)
        datas.append(data)
        errors.append(error)
        offsets.append(offset)

    for source in batch["source"]:
        try:
            with filesystem.open_input_stream(source) as f:
                data = f.read()
        except (OSError, ValueError) as exc:
            add(source, source, b"", f"read failed: {one_line(exc, with_type=True)}")
            continue
        if not is_archive(source):
            add(source, source, data, "")
            continue
        members = 0
        stored = memoryview(data)
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                for member in tar:
                    if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                        extracted = tar.extractfile(member)
                        payload = extracted.read() if extracted else b""
                        start = member.offset_data
                        in_place = stored[start : start + len(payload)] == payload
                        add(source, f"{source}/{member.name}", payload, "", start if in_place else -1)
                        members += 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            # members read before the damage are kept; the shard itself is reported once
            add(source, source, b"", f"archive damaged: {one_line(exc, with_type=True)}")
            continue
        if members == 0:
            # Every listed source yields at least one row, so the chunk it belongs to is written and the
            # empty shard is reported rather than silently lost.
            add(source, source, b"", "archive holds no images")
    return {
        "source": np.asarray(sources, dtype=object),
        "path": np.asarray(paths, dtype=object),
        "bytes": np.asarray(datas, dtype=object),
        "error": np.asarray(errors, dtype=object),
        "offset": np.asarray(offsets, dtype=np.int64),
    }


def decode_batch(
    batch: dict[str, np.ndarray], *, image_size: int, pixels: PixelSpec = DEFAULT_PIXELS
) -> dict[str, np.ndarray]:
    """Ray Data batch function: ``{"path", "bytes"[, "error", "source"]}`` -> ``{"path", "image", "error", ...}``.

    A file that cannot be decoded keeps its row, with an all-zero image and the reason in ``error``, so
    the driver can count and list it without a side channel; the model skips such rows. Rows that already
    carry an error (from reading) pass through; other columns (``source``) are kept.
    """
    paths: Sequence[str] = batch["path"]
    images = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8)
    errors = np.array(batch["error"], dtype=object) if "error" in batch else np.full(len(paths), "", dtype=object)
    for i, data in enumerate(batch["bytes"]):
        if errors[i]:
            continue
        try:
            images[i] = decode_image(data, image_size, pixels)
        except DECODE_ERRORS as exc:
            errors[i] = decode_failure(exc)
    out = {"path": np.asarray(paths, dtype=object), "image": images, "error": errors}
    if "source" in batch:
        out["source"] = np.asarray(batch["source"], dtype=object)
    return out


def decode_failure(exc: BaseException) -> str:
    """A skipped scene's reason as a reader wants it: what went wrong, without Python object reprs.

    PIL's "cannot identify image file <_io.BytesIO object at 0x7f...>" names an in-memory buffer, which
    says nothing about the scene; the reason says what the file is not instead.
    """
    if isinstance(exc, UnidentifiedImageError):
        return f"not an image: no {IMAGE_FORMATS} decoder recognises the file's contents"
    text = one_line(exc, with_type=True)
    return re.sub(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>", "", text)


def read_image_for_display(
    listing: SceneListing,
    path: str,
    size: int,
    pixels: PixelSpec = DEFAULT_PIXELS,
    *,
    members: ShardMemberReader | None = None,
) -> np.ndarray:
    """Read one image for a report thumbnail, as the model saw it.

    A member of a ``.tar`` shard is read through ``members`` (a :class:`scenecluster.shard_members.
    ShardMemberReader` of the run), by its byte range, never as a file of its own. Raises what reading and
    decoding raise (:data:`DECODE_ERRORS`), and ``NoRecordedRange`` for a member without a range: the report shows
    the scene as unreadable and says why once (:class:`scenecluster.report.Thumbnails`).
    """
    if in_archive(path):
        from scenecluster.shard_members import NoRecordedRange

        if members is None:
            raise NoRecordedRange(path)
        return decode_image(members.read(path), size, pixels)
    with listing.filesystem.open_input_file(path) as f:
        return decode_image(f.read(), size, pixels)
