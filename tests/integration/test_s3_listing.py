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


@pytest.fixture(scope="module")
def listed_bucket(s3_server):
    s3_server.create_bucket("listing")
    client = s3_server.boto3_client()
    for key in LAYOUT:
        client.put_object(Bucket="listing", Key=key, Body=b"")
    return client


@pytest.fixture(autouse=True)
def small_pages(monkeypatch):
    monkeypatch.setattr(s3listing, "PAGE_SIZE", 2)
    monkeypatch.setattr(s3listing, "LISTERS", 3)
    monkeypatch.setattr(s3listing, "PAGES_AHEAD", 1)


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
    listed: list[str] = []
    list_into = s3listing._list_into

    def recorded(client, bucket, prefix, *args):
        listed.append(prefix)
        return list_into(client, bucket, prefix, *args)

    monkeypatch.setattr(s3listing, "_list_into", recorded)
    assert list(walk_s3(listed_bucket, "listing", "two/")) == _key_order("two/")
    assert sorted(listed) == [f"two/{split}/k{k}/" for split in ("test", "train") for k in range(5)]
    listed.clear()
    assert list(walk_s3(listed_bucket, "listing", "deep/")) == _key_order("deep/")
    assert listed == []  # four levels of one sub-prefix each, then three keys and nothing left to list


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
