"""List the keys under an S3 prefix in key order, its sub-prefixes several at a time.

A listing request returns at most 1,000 keys and the next request needs the last one's token, so one paginated
listing of ten million keys is 10,000 requests end to end: at the 30-140 ms a page measured or assumed in
``docs/scaling.md``, 5 to 23 minutes before the first scene is embedded. S3 serves each prefix on its own, so
the usual remedy (AWS's own performance guidelines) is to list sub-prefixes side by side. Scene archives have
them: class folders, a tile grid's rows, acquisition dates.

:func:`walk_s3` asks for the first level below the prefix (``Delimiter="/"``), then lists up to :data:`LISTERS`
of its sub-prefixes at once in threads, each a few pages ahead of the reader, and yields every key in key order,
the order S3 lists keys in, so the same as one listing of the whole prefix there: a key at the first level sorts
against a sub-prefix as it does against every key below it, since it holds no ``/``. (A store that lists a
folder before a key named as it plus an extension, as SeaweedFS does, has each sub-prefix in its own order still.)
Where there are fewer sub-prefixes than listers (``dataset/images/``; ``train/`` and ``test/``), they are opened
a level further first; a level of more than :data:`FLAT_LEVEL` keys (a flat archive) is listed as one stream, as
before. What the reader holds is bounded: the opened levels' names, and at most ``LISTERS x PAGES_AHEAD`` pages.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

__all__ = ["DEPTH", "FLAT_LEVEL", "LISTERS", "PAGES_AHEAD", "walk_s3"]

LISTERS = 8  # sub-prefixes listed at once (boto3's client keeps 10 connections)
PAGES_AHEAD = 4  # pages a sub-prefix's lister may hold before the reader takes them
FLAT_LEVEL = 10_000  # keys at one level beyond which it is a flat archive, listed as one stream
DEPTH = 4  # levels opened while there are fewer sub-prefixes than listers
PAGE_SIZE = 1_000  # keys a request (S3's most)
_DONE = object()


def walk_s3(client, bucket: str, prefix: str) -> Iterator[str]:
    """Every key under ``prefix`` (``""`` or ending in ``/``) of ``bucket``, in key order (each sub-prefix's keys
    in the order the store lists them).

    Raises what the listing requests raise (botocore's ``ClientError``), from the reader's thread.
    """
    keys, prefixes = _first_level(client, bucket, prefix)
    if keys is None:  # a flat archive: its first level is the listing
        yield from _keys(client, bucket, prefix)
        return
    for _ in range(DEPTH):
        if not 0 < len(prefixes) < LISTERS:
            break
        opened = _opened(client, bucket, keys, prefixes)
        if opened == (keys, prefixes):
            break
        keys, prefixes = opened
    yield from _merged(client, bucket, sorted(keys + prefixes), set(prefixes))


def _opened(client, bucket: str, keys: list[str], prefixes: list[str]) -> tuple[list[str], list[str]]:
    """Fewer sub-prefixes than listers (``dataset/images/``; ``train/`` and ``test/``): each replaced by its own
    keys and sub-prefixes, which sort where it did, unless its first level is flat or the keys held would pass
    :data:`FLAT_LEVEL`; then it stays whole, for one lister."""
    keys, deeper = list(keys), []
    for sub in prefixes:
        inner, below = _first_level(client, bucket, sub)
        if inner is None or len(keys) + len(inner) > FLAT_LEVEL:
            deeper.append(sub)
        else:
            keys += inner
            deeper += below
    return keys, deeper


def _first_level(client, bucket: str, prefix: str) -> tuple[list[str] | None, list[str]]:
    """The keys and sub-prefixes directly under ``prefix``; ``(None, [])`` past :data:`FLAT_LEVEL` keys."""
    keys: list[str] = []
    prefixes: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/", PaginationConfig={"PageSize": PAGE_SIZE})
    for page in pages:
        keys += [item["Key"] for item in page.get("Contents", [])]
        prefixes += [item["Prefix"] for item in page.get("CommonPrefixes", [])]
        if len(keys) > FLAT_LEVEL:
            return None, []
    return keys, prefixes


def _pages(client, bucket: str, prefix: str) -> Iterator[list[str]]:
    """The keys under ``prefix``, a page at a time, in key order."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": PAGE_SIZE}):
        yield [item["Key"] for item in page.get("Contents", [])]


def _keys(client, bucket: str, prefix: str) -> Iterator[str]:
    for page in _pages(client, bucket, prefix):
        yield from page


def _merged(client, bucket: str, segments: list[str], prefixes: set[str]) -> Iterator[str]:
    """``segments`` (first-level keys and sub-prefixes, sorted) as keys in order: each key as it is, each
    sub-prefix as the keys under it, listed by up to :data:`LISTERS` threads ahead of the reader."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(LISTERS, thread_name_prefix="scenecluster-s3-list")
    window: deque[str | queue.Queue] = deque()  # the next segments: a key, or the queue of a started lister
    upcoming = iter(segments)
    started = 0

    def fill() -> None:
        nonlocal started
        while started < LISTERS:
            segment = next(upcoming, None)
            if segment is None:
                return
            if segment in prefixes:
                pages: queue.Queue = queue.Queue(PAGES_AHEAD)
                pool.submit(_list_into, client, bucket, segment, pages, stop)
                window.append(pages)
                started += 1
            else:
                window.append(segment)

    try:
        fill()
        while window:
            segment = window.popleft()
            if isinstance(segment, str):
                yield segment
                continue
            while (page := segment.get()) is not _DONE:
                if isinstance(page, BaseException):
                    raise page
                yield from page
            started -= 1
            fill()
    finally:  # also when the reader stops early (a check that reads one key): the listers end at their next page
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


def _list_into(client, bucket: str, prefix: str, pages: queue.Queue, stop: threading.Event) -> None:
    """List ``prefix`` into ``pages``, then :data:`_DONE`; an error is put there for the reader to raise."""
    try:
        for page in _pages(client, bucket, prefix):
            if not _put(pages, page, stop):
                return
        _put(pages, _DONE, stop)
    except Exception as exc:  # noqa: BLE001 - raised again in the reader's thread
        _put(pages, exc, stop)


def _put(pages: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` when there is room; False once the reader has stopped."""
    while not stop.is_set():
        try:
            pages.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False
