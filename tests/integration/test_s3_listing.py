"""Sub-prefixes listed side by side give every key of the prefix, once, in the order one listing gives them.

Against the real SeaweedFS server, with pages of 2 keys and 3 listers so that a small bucket is many pages and
more sub-prefixes than listers.
"""

from __future__ import annotations

import threading
import time

import pytest
from botocore.exceptions import ClientError

from scenecluster import s3listing
from scenecluster.manifest import iter_scene_paths
from scenecluster.s3listing import walk_s3

pytestmark = pytest.mark.integration

# Keys that sort around the sub-prefixes: "a.jpg" < "a/" < "a0.jpg" ('.' < '/' < '0'), a sub-prefix holding
# deeper ones, a hidden file, a folder marker and a file listing skips, and ten class folders of seven scenes.
LAYOUT = [
    "arch/a.jpg",
    "arch/a/1.jpg",
    "arch/a/2.jpg",
    "arch/a0.jpg",
    "arch/b/c/3.jpg",
    "arch/b/c/4.tif",
    "arch/b.d/5.jpg",
    "arch/c-/6.jpg",
    "arch/.hidden.jpg",
    "arch/notes.txt",
    "arch/k03/",
    *(f"arch/k{k:02d}/scene-{i}.jpg" for k in range(10) for i in range(7)),
    "deep/only/one/chain/x.jpg",
    "deep/only/one/chain/y.jpg",
    "deep/only/one/chain/z/w.jpg",
    *(f"flat/scene-{i:02d}.jpg" for i in range(12)),
    "flat/sub/q.jpg",
    "two/readme.jpg",
    *(f"two/{split}/k{k}/s-{i}.jpg" for split in ("test", "train") for k in range(5) for i in range(3)),
]


def _bucket_of(s3_server, bucket: str, keys: list[str]):
    """A bucket of empty objects under ``keys``; a client of the server."""
    s3_server.create_bucket(bucket)
    client = s3_server.boto3_client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"")
    return client


@pytest.fixture(scope="module")
def listed_bucket(s3_server):
    return _bucket_of(s3_server, "listing", LAYOUT)


@pytest.fixture(autouse=True)
def small_pages(monkeypatch):
    monkeypatch.setattr(s3listing, "PAGE_SIZE", 2)
    monkeypatch.setattr(s3listing, "LISTERS", 3)
    monkeypatch.setattr(s3listing, "PAGES_AHEAD", 1)
    monkeypatch.setattr(s3listing, "CUT_AFTER", 1)  # so a span of more than one page is cut into ranges ...
    monkeypatch.setattr(s3listing, "RANGES", 4)  # ... of about 4 ...
    monkeypatch.setattr(s3listing, "MIN_RANGE", 2)  # ... and as fine as a page


def _one_listing(client, prefix: str) -> list[str]:
    """What one paginated listing of the whole prefix gives, in the store's own order."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="listing", Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def _key_order(prefix: str) -> list[str]:
    """S3's order: the keys' bytes. (SeaweedFS's own listing differs where a folder and a file share a name
    before the extension, "a/" before "a.jpg"; the levels this test has the lister sort are in S3's order.)"""
    return sorted(key for key in LAYOUT if key.startswith(prefix))


@pytest.mark.parametrize("prefix", ["arch/", "deep/", "flat/", "two/"])
def test_every_key_once_in_key_order(listed_bucket, prefix, monkeypatch):
    monkeypatch.setattr(s3listing, "FLAT_LEVEL", 10)  # flat/ holds 12 keys at its first level: one stream
    assert list(walk_s3(listed_bucket, "listing", prefix)) == _key_order(prefix)


def test_each_sub_prefix_is_listed_whole_in_the_stores_order(listed_bucket):
    """A whole bucket's first level is four sub-prefixes, more than the listers: each is one listing, as the store
    gives it."""
    expected = [key for prefix in ("arch/", "deep/", "flat/", "two/") for key in _one_listing(listed_bucket, prefix)]
    assert list(walk_s3(listed_bucket, "listing", "")) == expected
    assert sorted(expected) == sorted(LAYOUT)


def test_fewer_sub_prefixes_than_listers_are_opened_a_level_further(listed_bucket, monkeypatch):
    """``two/`` holds ``test/`` and ``train/`` (fewer than the 3 listers): their five class folders each are what
    the listers list, not the two splits; a chain of single sub-prefixes (``deep/``) is followed to its keys."""
    listed = _record_listed(monkeypatch)
    assert list(walk_s3(listed_bucket, "listing", "two/")) == _key_order("two/")
    prefixes = sorted(span for span in listed if isinstance(span, str))  # and the ranges their listers cut
    assert prefixes == [f"two/{split}/k{k}/" for split in ("test", "train") for k in range(5)]
    listed.clear()
    assert list(walk_s3(listed_bucket, "listing", "deep/")) == _key_order("deep/")
    assert listed == []  # four levels of one sub-prefix each, then three keys and nothing left to list


def _record_listed(monkeypatch) -> list:
    """What the listers are given: a sub-prefix as it is, a range cut from one as (first key, stop)."""
    listed: list = []
    start = s3listing._Merge._start

    def recorded(merge, work):
        span = work.span
        listed.append(span.prefix if span.first is None else (span.first, span.stop))
        return start(merge, work)

    monkeypatch.setattr(s3listing._Merge, "_start", recorded)
    return listed


def test_the_job_lists_the_wanted_scenes_of_a_prefix_in_that_order(s3_env, listed_bucket):
    paths = list(iter_scene_paths("s3://listing/arch"))
    wanted = [f"listing/{key}" for key in _key_order("arch/")]
    wanted = [p for p in wanted if p.endswith((".jpg", ".tif")) and "/." not in p]
    assert paths == wanted and len(paths) == 78


def _listers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("scenecluster-s3-list")]


def test_a_reader_that_stops_early_leaves_no_lister_running(listed_bucket):
    keys = walk_s3(listed_bucket, "listing", "arch/")
    first = [next(keys) for _ in range(3)]
    assert first == _key_order("arch/")[:3]
    assert _listers()  # the next sub-prefixes are being listed ahead
    keys.close()
    deadline = time.monotonic() + 10
    while _listers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _listers()


def test_a_listers_error_is_raised_to_the_reader(s3_server, listed_bucket, monkeypatch):
    """A refused request in a lister's thread (here: a wrong secret, after the first level was listed with the
    right one) reaches the reader as the error it is, not as a listing that ends early."""
    first_level = s3listing._first_level
    monkeypatch.setattr(s3listing, "_first_level", lambda client, *args: first_level(listed_bucket, *args))
    with pytest.raises(ClientError) as info:
        list(walk_s3(s3_server.boto3_client(secret_key="not-the-secret"), "listing", "arch/"))
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


# A flat archive: no sub-prefix to share out, so its keys are cut into ranges of key order. Names that change at
# their first character (hex), deep in a shared stem, a name that is another's start ("x" < "x1"), characters past
# ASCII; two flat sub-prefixes; and a flat level with a folder among its keys.
FLAT = [
    *(f"hashed/{h:x}{i}.jpg" for h in range(16) for i in range(3)),
    *(f"stem/tile_{i:05d}.jpg" for i in range(0, 40000, 1000)),
    "odd/x",
    "odd/x1",
    "odd/x~",
    "odd/café.jpg",
    "odd/é.jpg",
    "odd/Z.jpg",
    "odd/ tile.jpg",
    "odd/tile.jpg",
    *(f"odd/t{i:02d}.jpg" for i in range(12)),
    *(f"mixed/m{i:02d}.jpg" for i in range(12)),
    "mixed/a/1.jpg",
    "mixed/a.jpg",
    *(f"splits/{split}/s-{i:02d}.jpg" for split in ("test", "train") for i in range(14)),
]


@pytest.fixture(scope="module")
def flat_bucket(s3_server):
    return _bucket_of(s3_server, "flat", FLAT)


@pytest.fixture
def listed_spans(monkeypatch):
    """Levels of more than 10 keys are flat; a lister cuts what is left of its span after its first page (of 2
    keys) into about 4 ranges, and each range in turn."""
    monkeypatch.setattr(s3listing, "FLAT_LEVEL", 10)
    return _record_listed(monkeypatch)


@pytest.mark.parametrize("prefix", ["hashed/", "stem/", "odd/", "splits/"])
def test_a_long_listing_is_cut_into_ranges_every_key_once_in_key_order(flat_bucket, listed_spans, prefix):
    expected = sorted(key for key in FLAT if key.startswith(prefix))
    assert list(walk_s3(flat_bucket, "flat", prefix)) == expected
    ranges = [span for span in listed_spans if isinstance(span, tuple)]
    assert len(ranges) >= (2 if prefix == "splits/" else 4), listed_spans  # splits/: 2 x 14 keys, 12 read first
    assert all(first in expected for first, _ in ranges), listed_spans
    assert len({first for first, _ in ranges}) == len(ranges)  # no range listed twice
    firsts = {first for first, _ in ranges}
    # the first 12 keys were read with the level (more than 10: flat), the next page by the range after them; the
    # rest is cut where the names change
    if prefix == "hashed/":  # at their first character: a range a hex digit
        assert {f"hashed/{h:x}0.jpg" for h in range(5, 16)} <= firsts
    if prefix == "stem/":  # "tile_" starts every name: where the numbers change
        assert {"stem/tile_20000.jpg", "stem/tile_30000.jpg"} <= firsts
    if prefix == "splits/":  # two flat sub-prefixes (more than 10 keys each): the rest of each after its first read
        assert not any(isinstance(span, str) for span in listed_spans)
        assert {first.split("/")[1] for first in firsts} == {"test", "train"}


def test_a_cut_gives_about_the_ranges_asked_for(flat_bucket, monkeypatch):
    monkeypatch.setattr(s3listing, "RANGES", 2)
    cuts = s3listing._cuts(flat_bucket, "flat", "hashed/", "hashed/", None, finest=20)
    assert 2 <= len(cuts) <= 8 and cuts == sorted(cuts) and cuts[0] == "hashed/00.jpg"  # at most 4 x RANGES
    assert s3listing._cuts(flat_bucket, "flat", "hashed/", "hashed/f2.jpg", None, finest=20) == []  # past the last
    assert s3listing._cuts(flat_bucket, "flat", "hashed/", "hashed/", None, finest=6) == ["hashed/00.jpg"]  # none


def test_cuts_are_no_finer_than_the_keys_listed_show_to_be_worth_it(monkeypatch):
    """Keys listed so far, 4,000 of ``scene-00010000`` on: the thousands digit changes every 1,000 keys (runs of
    half the 2,000 a range should hold), the ten-thousands digit not at all, so cuts go down to that digit."""
    monkeypatch.setattr(s3listing, "MIN_RANGE", 2000)
    listed = [f"t/scene-{i:08d}.jpg" for i in range(10_000, 14_000)]
    assert s3listing._finest(listed, len("t/")) == len("t/scene-000")  # the position of that digit
    assert s3listing._finest([f"t/{i:x}" for i in range(16)], len("t/")) == len("t/")  # few keys: the first one


def test_a_store_that_lists_a_folder_before_a_key_is_not_cut(flat_bucket, listed_spans):
    """Folders in a flat level are where a store that keeps them apart (this SeaweedFS lists "mixed/a/1.jpg" before
    "mixed/a.jpg", and past "mixed/a" skips "mixed/a/") would lose keys at a cut: keys seen out of key order keep
    the listing whole, in the store's order."""
    keys = list(walk_s3(flat_bucket, "flat", "mixed/"))
    assert sorted(keys) == sorted(k for k in FLAT if k.startswith("mixed/")) and len(keys) == len(set(keys))
    assert listed_spans == ["mixed/"]


def test_a_store_seen_probing_out_of_key_order_is_not_cut(flat_bucket, listed_spans, monkeypatch):
    """A folder past the first keys of a flat level (here: the store answers the probes as if one were there) is
    found by a probe that lands before the last key found: nothing is cut, and the rest is listed in one stream."""
    key_after = s3listing._key_after

    def folder_first(client, bucket, prefix, after):
        found = key_after(client, bucket, prefix, after)
        return "hashed/00.jpg" if found == "hashed/80.jpg" else found  # as "a/" before "a.jpg"

    monkeypatch.setattr(s3listing, "_key_after", folder_first)
    assert list(walk_s3(flat_bucket, "flat", "hashed/")) == sorted(k for k in FLAT if k.startswith("hashed/"))
    assert listed_spans == [("hashed/32.jpg", None)]  # the rest after the level's first 12 keys, in one listing
