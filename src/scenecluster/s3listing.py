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
a level further first.

A lister holds at most :data:`PAGES_AHEAD` pages the reader has not taken, so a sub-prefix of many pages (a class
folder of a million tiles, or a flat archive of ``tiles/000000.jpg`` on, which has no sub-prefix to share out)
would be listed by one thread while the others wait. So a lister that has listed :data:`CUT_AFTER` pages and is
not done cuts what is left of its keys into ranges of key order (:func:`_cuts`): a few one-key requests find where
the keys' next character changes (``0`` ... ``9`` of numbered names, ``0`` ... ``f`` of hashed ones); its own
listing ends there, and the ranges are listed like sub-prefixes, each from its first key to the next one's, and
cut again in turn if they are long. Every key is in exactly one range whatever the names: the cuts only decide how
evenly the listers share the work, and a store seen listing keys out of S3's order is not cut at all. What the
reader holds is bounded: the opened levels' names, the ranges' first keys, and at most ``LISTERS x PAGES_AHEAD``
pages.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

__all__ = ["DEPTH", "FLAT_LEVEL", "LISTERS", "PAGES_AHEAD", "RANGES", "walk_s3"]

LISTERS = 8  # sub-prefixes listed at once (boto3's client keeps 10 connections)
PAGES_AHEAD = 16  # pages a lister may hold before the reader takes them
CUT_AFTER = 4  # pages a lister lists before it cuts the rest of a longer span into ranges
MIN_RANGE = 2_000  # keys a range should hold at least (two pages), as far as the keys listed show
FLAT_LEVEL = 10_000  # keys at one level beyond which it is a flat archive, listed as one stream
DEPTH = 4  # levels opened while there are fewer sub-prefixes than listers
PAGE_SIZE = 1_000  # keys a request (S3's most)
RANGES = LISTERS  # a long listing's rest is cut into at least this many ranges where its names allow
RANGE_DEPTH = 32  # characters past the prefix looked at for where the names change
PROBES = 4  # one-key requests a lister makes at once while it cuts (scenecluster.data.S3_CONNECTIONS holds them)
_PAST = "\U0010ffff"  # sorts after every character of a key: k[:i + 1] + _PAST is past all keys starting k[:i + 1]
_DONE = object()


@dataclass(frozen=True)
class _Range:
    """The keys under ``prefix`` from ``first`` (a key; None: its first key) up to, not including, ``stop`` (None:
    to its last): a sub-prefix whole, or a range of one cut by a lister."""

    prefix: str
    first: str | None = None
    stop: str | None = None

    @property
    def start(self) -> str:
        """Where it sorts among first-level keys and other spans."""
        return self.prefix if self.first is None else self.first


def walk_s3(client, bucket: str, prefix: str) -> Iterator[str]:
    """Every key under ``prefix`` (``""`` or ending in ``/``) of ``bucket``, in key order (each sub-prefix's keys
    in the order the store lists them).

    Raises what the listing requests raise (botocore's ``ClientError``), from the reader's thread.
    """
    keys, prefixes, flat = _first_level(client, bucket, prefix)
    if flat:  # a flat archive: one listing, cut into ranges as it goes
        yield from _Merge(client, bucket, _flat_spans(prefix, keys, prefixes)).keys()
        return
    spans: list[str | _Range] = []
    for _ in range(DEPTH):
        if not 0 < len(prefixes) < LISTERS:
            break
        opened = _opened(client, bucket, keys, prefixes, spans)
        if opened == (keys, prefixes):
            break
        keys, prefixes = opened
    spans = sorted([*keys, *spans, *(_Range(sub) for sub in prefixes)], key=_sort_key)
    yield from _Merge(client, bucket, spans).keys()


def _flat_spans(prefix: str, keys: list[str], folders: list[str]) -> list[str | _Range]:
    """A flat level whose first read listed ``keys``: they stay listed, and the rest is a range from the last of
    them; unless ``folders`` were among them (then the keys past it are not all that follows it in a listing of
    every key below), when it is listed whole."""
    return [_Range(prefix)] if folders else [*keys[:-1], _Range(prefix, keys[-1])]


def _opened(
    client, bucket: str, keys: list[str], prefixes: list[str], flats: list[str | _Range]
) -> tuple[list[str], list[str]]:
    """Fewer sub-prefixes than listers (``dataset/images/``; ``train/`` and ``test/``): each replaced by its own
    keys and sub-prefixes, which sort where it did, unless its first level is flat (its spans go to ``flats``, the
    keys its first read listed kept: :func:`_flat_spans`) or the keys held would pass :data:`FLAT_LEVEL` (then it
    stays whole); a lister cuts a long one into ranges."""
    keys, deeper = list(keys), []
    for sub in prefixes:
        inner, below, flat = _first_level(client, bucket, sub)
        if flat:
            flats += _flat_spans(sub, inner, below)
        elif len(keys) + len(inner) > FLAT_LEVEL:
            deeper.append(sub)
        else:
            keys += inner
            deeper += below
    return keys, deeper


def _sort_key(span: str | _Range) -> str:
    return span.start if isinstance(span, _Range) else span


def _first_level(client, bucket: str, prefix: str) -> tuple[list[str], list[str], bool]:
    """The keys and sub-prefixes directly under ``prefix``, and whether it is flat: then the reading stopped past
    :data:`FLAT_LEVEL` keys, and they are the first ones."""
    keys: list[str] = []
    prefixes: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/", PaginationConfig={"PageSize": PAGE_SIZE})
    for page in pages:
        keys += [item["Key"] for item in page.get("Contents", [])]
        prefixes += [item["Prefix"] for item in page.get("CommonPrefixes", [])]
        if len(keys) > FLAT_LEVEL:
            return keys, prefixes, True
    return keys, prefixes, False


def _finest(keys: list[str], start: int) -> int:
    """The deepest character position (from ``start``) at which ``keys``, listed in order, still run in groups of at
    least :data:`MIN_RANGE` on average: cutting the keys that follow them finer would make ranges shorter than a few
    pages, each costing a whole page's request to list (a range's last request reads past its end)."""
    for depth in range(start, start + RANGE_DEPTH):
        runs = 1 + sum(a[: depth + 2] != b[: depth + 2] for a, b in pairwise(keys))
        if len(keys) / runs < MIN_RANGE:
            return depth
    return start + RANGE_DEPTH


def _shared(a: str, b: str) -> int:
    """How many first characters ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _cuts(client, bucket: str, prefix: str, after: str, stop: str | None, finest: int) -> list[str] | None:
    """The first keys of consecutive ranges that the keys under ``prefix`` past ``after`` and before ``stop`` fall
    into, about :data:`RANGES` of them where the names allow; [] when there is no such key, None for a store seen
    to list keys out of key order. Cuts are made at character positions up to ``finest`` (:func:`_finest`).

    Where to cut is found from the names themselves: at the first character past the prefix, then the next, the
    keys are skipped through a character at a time (one request of one key each: the first key past every key
    that starts as the last one found), so a range is the keys that share their first characters. Zero-padded
    numbers or hashed names give 10 or 16 ranges a character; a name that starts alike everywhere (``tile_``)
    costs a request a character until it does not.

    S3 lists keys in the order of their UTF-8 bytes, and a range's start and stop are compared so. A store that
    keeps folders apart (SeaweedFS lists ``a/1.jpg`` before ``a.jpg``, and past ``a`` skips ``a/``) would lose
    keys at a cut: a probe that finds a key not past the last one says so, and nothing is cut.
    """
    first = _key_after(client, bucket, prefix, after)
    if first is None or (stop is not None and first >= stop):
        return []
    cuts = [first]
    # the keys of [first, stop) all share the characters first and stop share: no cut can come before those
    start = len(prefix) if stop is None else max(len(prefix), _shared(first, stop))
    for depth in range(start, finest + 1):
        if len(cuts) >= RANGES or depth >= max(map(len, cuts)):
            break  # enough ranges, or names too short to cut any finer
        limit = max(2, 4 * RANGES // len(cuts))
        with ThreadPoolExecutor(min(len(cuts), PROBES), thread_name_prefix="scenecluster-s3-probe") as pool:
            runs = pool.map(partial(_runs, client, bucket, prefix, depth=depth, limit=limit), cuts, [*cuts[1:], stop])
            cuts = [key for keys in runs for key in keys]
        if any(later <= earlier for earlier, later in pairwise(cuts)):
            return None
    return cuts[:: -(-len(cuts) // (4 * RANGES))]  # every n-th cut: fewer, longer ranges, the same keys


def _runs(client, bucket: str, prefix: str, first: str, stop: str | None, depth: int, limit: int) -> list[str]:
    """The first key of each run of keys in ``[first, stop)`` that share their first ``depth + 1`` characters
    (the keys of such a range all share their first ``depth``), at most ``limit`` of them: the last run then
    holds the rest. A key found that is not past the last one ends the list (the caller sees the disorder)."""
    runs = [first]
    key = first
    while len(runs) < limit:
        after = key if len(key) <= depth else key[: depth + 1] + _PAST
        following = _key_after(client, bucket, prefix, after)
        if following is None or (stop is not None and following >= stop):
            break
        runs.append(following)
        if following <= key or following[: depth + 1] == key[: depth + 1]:
            break  # out of key order, or a name holding the character that sorts last: no finer cut here
        key = following
    return runs


def _key_after(client, bucket: str, prefix: str, after: str | None) -> str | None:
    """The first key under ``prefix`` past ``after`` (None: the first key), or None."""
    start = {} if after is None else {"StartAfter": after}
    page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1, **start)
    contents = page.get("Contents", [])
    return contents[0]["Key"] if contents else None


class _Work:
    """One span of the listing in order: a first-level key, or a sub-prefix or range and its lister's pages."""

    __slots__ = ("pages", "span")

    def __init__(self, span: str | _Range) -> None:
        self.span = span
        self.pages: queue.Queue | None = None


class _Merge:
    """The spans' keys in order, listed by up to :data:`LISTERS` threads ahead of the reader.

    The spans not yet read are a list in key order; listers start on the first ones not started, and a lister that
    cuts the rest of its span into ranges puts them right after its own span (under the lock). The span the reader
    is at is always started, even past the cap, so a reader never waits on a span no thread lists.
    """

    def __init__(self, client, bucket: str, spans: list[str | _Range]) -> None:
        self.client, self.bucket = client, bucket
        self.todo = [_Work(span) for span in spans]
        self.head = 0  # spans before it have been read
        self.scan = 0  # spans before it are keys or started: where the next lister's span is looked for
        self.running = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def keys(self) -> Iterator[str]:
        try:
            while True:
                with self.lock:
                    if self.head == len(self.todo):
                        return
                    work = self.todo[self.head]
                    self.head += 1
                    if isinstance(work.span, _Range) and work.pages is None:
                        self._start(work)  # the cap is full of later spans: this one may not wait for them
                    self._fill()
                if not isinstance(work.span, _Range):
                    yield work.span
                    continue
                while (page := work.pages.get()) is not _DONE:
                    if isinstance(page, BaseException):
                        raise page
                    yield from page
                with self.lock:
                    self.running -= 1
                    self._fill()
        finally:  # also when the reader stops early (a check that reads one key): the listers end at their next page
            self.stop.set()

    def _fill(self) -> None:
        """Start listers on the first spans not started, up to :data:`LISTERS` running (under the lock)."""
        self.scan = max(self.scan, self.head)
        while self.running < LISTERS and self.scan < len(self.todo):
            work = self.todo[self.scan]
            if isinstance(work.span, _Range) and work.pages is None:
                self._start(work)
            self.scan += 1

    def _start(self, work: _Work) -> None:
        work.pages = queue.Queue(PAGES_AHEAD)
        self.running += 1
        threading.Thread(target=self._list, args=(work,), name="scenecluster-s3-list", daemon=True).start()

    def _insert_after(self, work: _Work, ranges: list[_Range]) -> None:
        with self.lock:
            index = next(i for i in range(max(self.head - 1, 0), len(self.todo)) if self.todo[i] is work)
            self.todo[index + 1 : index + 1] = [_Work(span) for span in ranges]
            self.scan = min(self.scan, index + 1)
            self._fill()

    def _list(self, work: _Work) -> None:
        """List a sub-prefix or a range into its pages, then :data:`_DONE`; an error is put there for the reader to
        raise. Once it has listed :data:`CUT_AFTER` pages and its listing goes on, the rest past the last key is cut
        into ranges, put after it for other listers, and its own listing ends there."""
        span, pages = work.span, work.pages
        stop, last, cut, n_pages = span.stop, span.first, False, 0
        listed: list[str] = []  # until the cut: whether in key order, and how finely the names change
        try:
            start = {}
            if span.first is not None:
                if not self._put(pages, [span.first]):
                    return
                start = {"StartAfter": span.first}
            paginator = self.client.get_paginator("list_objects_v2")
            listing = paginator.paginate(
                Bucket=self.bucket, Prefix=span.prefix, PaginationConfig={"PageSize": PAGE_SIZE}, **start
            )
            for page in listing:
                keys = [item["Key"] for item in page.get("Contents", [])]
                ends = stop is not None and keys and keys[-1] >= stop
                keys = [key for key in keys if key < stop] if ends else keys
                if not self._put(pages, keys):
                    return
                if ends:
                    break
                listed += keys if not cut else []
                last, n_pages = keys[-1] if keys else last, n_pages + 1
                if not cut and n_pages >= CUT_AFTER and page.get("IsTruncated") and last is not None:
                    cut = True  # once: its ranges are cut in turn by their own listers when they are long
                    if any(a >= b for a, b in pairwise([span.first or "", *listed])):
                        continue  # out of key order: a store that keeps folders apart, where cutting could lose keys
                    finest = _finest(listed, len(span.prefix))
                    rest = _cuts(self.client, self.bucket, span.prefix, last, stop, finest)
                    if rest:
                        bounds = [*rest[1:], stop]
                        self._insert_after(work, [_Range(span.prefix, a, b) for a, b in zip(rest, bounds, strict=True)])
                        break  # rest[0] is the key after the last one listed: nothing is left before it
            self._put(pages, _DONE)
        except Exception as exc:  # noqa: BLE001 - raised again in the reader's thread
            self._put(pages, exc)

    def _put(self, pages: queue.Queue, item: object) -> bool:
        """Put ``item`` when there is room; False once the reader has stopped."""
        while not self.stop.is_set():
            try:
                pages.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False
