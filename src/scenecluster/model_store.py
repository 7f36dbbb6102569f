"""Model folders in object storage (``s3://bucket/prefix``), fetched once per machine into the local cache.

Why: on an autoscaling or KubeRay cluster, nodes share no disk, and a fine-tuned backbone kept on a head node is
lost with it; in S3 it outlives the cluster and every node can read it. transformers reads only local folders
or the Hub, so a model URI is copied to ``<cache>/models/s3/<hash of the URI>/`` (``$SCENECLUSTER_CACHE``,
else ``~/.cache/scenecluster``) and loaded from there. The copy is kept while the objects under the prefix
keep their names, sizes and ETags; a folder uploaded again is fetched again. Each node fetches
for itself (actors on one node share the copy). The store's endpoint is the job's ``data.endpoint_url``
(``--endpoint-url``), which the feature carries to the workers, else ``AWS_ENDPOINT_URL``; credentials come from
the standard AWS chain, as for any S3 read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

__all__ = ["fetch_model_folder", "is_store_uri", "publish_model_folder"]

#: What a fetched copy records of the objects it was copied from: a copy whose record differs is fetched again.
SOURCE_RECORD = ".scenecluster-source.json"
#: What a published copy records of the local files it holds (names and SHA-256): written last, so a copy without
#: it is incomplete, and a folder published again with the same files is not uploaded again.
PUBLISHED_RECORD = ".scenecluster-published.json"


def is_store_uri(model: str | os.PathLike[str]) -> bool:
    """Whether ``model`` names a folder in object storage rather than a local folder or a Hub id."""
    return isinstance(model, str) and model.startswith("s3://")


def fetch_model_folder(
    uri: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    endpoint_url: str | None = None,
    credentials: dict[str, str] | None = None,
) -> Path:
    """The local copy of the model folder ``uri`` (``s3://bucket/prefix``), fetched when missing or changed.

    Only the objects directly under the prefix are fetched (a transformers folder is flat: ``config.json``,
    ``model.safetensors`` or its shards, ``preprocessor_config.json``). A copy is kept while every object keeps
    its size and ETag (S3's modification times have one-second resolution; an ETag changes with the content).
    It is written beside its final place and renamed into it, so a reader never sees half a folder and two
    actors fetching at once both end with one whole copy.

    Raises
    ------
    scenecluster.models.ModelLoadError
        When the store cannot be read, or the prefix holds no ``config.json``; one line naming ``uri``.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from scenecluster.data import s3_client
    from scenecluster.errors import one_line
    from scenecluster.models import ModelLoadError, default_cache_dir

    bucket, prefix = _bucket_and_prefix(uri)
    if not bucket:
        raise ModelLoadError(f"cannot load model '{uri}': it names no bucket; give s3://bucket/prefix")
    client = s3_client(endpoint_url, credentials)
    try:
        objects = _objects_under(client, bucket, prefix)
    except (BotoCoreError, ClientError) as exc:
        raise ModelLoadError(f"cannot load model '{uri}': the store cannot be read: {one_line(exc)}") from None
    # a folder written through pyarrow (Ray Train's checkpoints in S3) has an empty "backbone/" marker object: its
    # name under the prefix is "", and fetching it as a file once failed with "Is a directory"
    files = {
        name: [item["Size"], item.get("ETag", "")]
        for item in objects
        if (name := item["Key"][len(prefix) :]) and not name.startswith(".")
    }
    if "config.json" not in files:
        raise ModelLoadError(
            f"cannot load model '{uri}': no config.json under it; upload a folder written by save_backbone or "
            "save_pretrained (e.g. a fine-tune's OUTPUT/backbone)"
        )
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = base / "models" / "s3" / hashlib.sha1(uri.encode()).hexdigest()[:16]
    record = {"uri": uri, "files": files}
    if _record(final) == record:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        for name in files:
            client.download_file(bucket, prefix + name, str(staging / name))
        (staging / SOURCE_RECORD).write_text(json.dumps(record))
        _swap_in(staging, final, record)
    except (OSError, BotoCoreError, ClientError) as exc:
        raise ModelLoadError(f"cannot load model '{uri}': fetching it failed: {one_line(exc)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _bucket_and_prefix(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b/")``: the prefix of a folder's objects ("" at the bucket's root)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.rstrip("/") + "/" if prefix else ""


def _objects_under(client, bucket: str, prefix: str) -> list[dict]:
    """The objects directly under ``prefix`` (a model folder is flat), every page of the listing."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    return [item for page in pages for item in page.get("Contents", [])]


def _record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _swap_in(staging: Path, final: Path, record: dict) -> None:
    """Put ``staging`` at ``final``; an older copy there is moved aside first and removed after."""
    with contextlib.suppress(OSError):
        os.rename(staging, final)
        return
    if _record(final) == record:  # another actor on this node fetched the same objects first
        return
    aside = final.with_name(f".{final.name}-old-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(final, aside)
    try:
        os.rename(staging, final)
    except OSError:
        if _record(final) != record:
            raise
    shutil.rmtree(aside, ignore_errors=True)


def publish_model_folder(folder: str | os.PathLike[str], uri: str, *, endpoint_url: str | None = None) -> bool:
    """Copy the local model folder ``folder`` to ``uri`` (``s3://bucket/prefix``); return whether anything was
    uploaded (False: ``uri`` already holds these files).

    Why: a job whose output is in object storage may run its actors on nodes that cannot see the driver's disk,
    and the clustering it saves names its model for a later ``assign`` on another cluster; a fine-tuned backbone in
    the head node's folder would be missing on both. The copy is what :func:`fetch_model_folder` reads. Files
    under ``uri`` that the folder lacks are removed, so no stale shard is fetched beside the new weights; the
    record of the files is written last, so a copy interrupted half way is uploaded again, whole.

    Raises
    ------
    scenecluster.errors.OutputError
        When the store cannot be written; one line naming ``folder`` and ``uri``.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from scenecluster.data import s3_client
    from scenecluster.errors import OutputError, one_line
    from scenecluster.models import _file_digest

    local = Path(os.fspath(folder)).expanduser()
    bucket, prefix = _bucket_and_prefix(uri)
    try:
        names = sorted(p for p in local.iterdir() if p.is_file() and not p.name.startswith("."))
        files = {p.name: _file_digest(p) for p in names}
        record = {"files": files}
        client = s3_client(endpoint_url)
        with contextlib.suppress(ClientError, ValueError):
            body = client.get_object(Bucket=bucket, Key=prefix + PUBLISHED_RECORD)["Body"].read()
            if json.loads(body) == record:
                return False
        client.delete_object(Bucket=bucket, Key=prefix + PUBLISHED_RECORD)
        for key in (item["Key"] for item in _objects_under(client, bucket, prefix)):
            if key[len(prefix) :] not in files and key != prefix + PUBLISHED_RECORD:
                client.delete_object(Bucket=bucket, Key=key)
        for name in files:
            client.upload_file(str(local / name), bucket, prefix + name)
        client.put_object(Bucket=bucket, Key=prefix + PUBLISHED_RECORD, Body=json.dumps(record).encode())
    except (OSError, BotoCoreError, ClientError) as exc:
        raise OutputError(
            f"cannot copy the model folder {local} (--model) to {uri} (under --output): {one_line(exc)}"
        ) from None
    return True
