import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from scenecluster.data import (
    configured_region,
    decode_batch,
    decode_image,
    folder_label,
    list_scenes,
    s3_region,
    walk_local,
)
from scenecluster.errors import InputError
from tests.conftest import copy_sample, write_corrupt_images


def test_lists_images_recursively_sorted_with_folder_labels(tmp_path):
    copy_sample(tmp_path, per_class=2, classes=3)
    (tmp_path / "notes.txt").write_text("not an image")
    listing = list_scenes(str(tmp_path))
    assert len(listing) == 6
    assert listing.paths == sorted(listing.paths)
    assert {folder_label(p) for p in listing.paths} == {"AnnualCrop", "Forest", "HerbaceousVegetation"}


def test_sample_is_seeded_subset(tmp_path):
    copy_sample(tmp_path, per_class=5, classes=2)
    a = list_scenes(str(tmp_path), sample=4, seed=1).paths
    b = list_scenes(str(tmp_path), sample=4, seed=1).paths
    c = list_scenes(str(tmp_path), sample=4, seed=2).paths
    assert a == b and len(a) == 4 and a != c
    assert set(a) <= set(list_scenes(str(tmp_path)).paths)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "holds no images"),
    ],
)
def test_bad_input_names_the_location(tmp_path, make, message):
    uri = str(make(tmp_path))
    with pytest.raises(InputError, match=message) as info:
        list_scenes(uri)
    assert uri in str(info.value)


def test_unsupported_scheme():
    with pytest.raises(InputError, match="unsupported location 'gs://bucket/prefix'"):
        list_scenes("gs://bucket/prefix")


def test_a_file_uri_is_its_path_and_one_naming_a_host_is_refused(tmp_path, monkeypatch):
    """``file:///abs`` reads the folder; ``file://out`` is the host ``out`` (RFC 8089). It used to lose the
    ``out`` and list the working directory, or write there."""
    from scenecluster.data import local_path, open_filesystem

    assert local_path(f"file://{tmp_path}") == str(tmp_path) and local_path("file:/x") == "/x"
    assert open_filesystem(f"file://{tmp_path}")[1] == str(tmp_path)
    # percent-encoded as Path.as_uri() writes it (it used to look for a folder named 'my%20scenes')
    spaced = tmp_path / "my scenes #1"
    assert local_path(spaced.as_uri()) == str(spaced) and "%20" in spaced.as_uri()
    monkeypatch.chdir(tmp_path)
    for uri in ("file://out", "file://imgs/Forest"):
        with pytest.raises(InputError, match="unsupported location"):
            open_filesystem(uri)
        with pytest.raises(ValueError, match="names the host"):
            local_path(uri)
    for uri in ("s3://b/x", "s3:/b/x", "s3:b/x", "gs://b/x"):
        with pytest.raises(ValueError, match="must be a path on this machine"):
            local_path(uri)


def test_decode_resizes_real_jpeg(sample_dir):
    data = next(sample_dir.glob("*/*.jpg")).read_bytes()
    img = decode_image(data, 56)
    assert img.shape == (56, 56, 3) and img.dtype == np.uint8
    assert img.std() > 0  # a real scene, not a blank


def test_decode_batch_marks_bad_rows_and_keeps_good_ones(tmp_path, sample_dir):
    good = next(sample_dir.glob("*/*.jpg"))
    bad = write_corrupt_images(tmp_path)
    paths = [str(good), *map(str, bad)]
    batch = {"path": np.array(paths, dtype=object), "bytes": [Path(p).read_bytes() for p in paths]}
    out = decode_batch(batch, image_size=28)
    assert out["image"].shape == (3, 28, 28, 3)
    assert out["error"][0] == ""
    assert all(out["error"][1:])
    assert out["image"][0].any() and not out["image"][1:].any()


def test_read_batch_reports_an_archive_without_images(tmp_path):
    import io
    import tarfile

    import pyarrow.fs as pafs

    from scenecluster.data import read_batch

    shard = tmp_path / "empty.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("README.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    out = read_batch({"source": np.array([str(shard)], dtype=object)}, filesystem=pafs.LocalFileSystem())
    assert out["path"].tolist() == [str(shard)]
    assert out["error"].tolist() == ["archive holds no images"]


@pytest.mark.parametrize("compression", ["", "gz"])
def test_read_batch_records_where_each_member_lies_in_an_uncompressed_shard(tmp_path, compression):
    """A member's offset in its shard's object gives back exactly its bytes (a report reads one member by a ranged
    read); a compressed shard stores no member in place, and a file of its own has no offset."""
    import tarfile

    import pyarrow.fs as pafs

    from scenecluster.data import read_batch
    from scenecluster.shard_members import member_ranges

    loose = copy_sample(tmp_path / "loose", per_class=2, classes=2)
    images = sorted(loose.rglob("*.jpg"))
    shard = tmp_path / "shards" / "shard-0.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, f"w:{compression}") as tar:
        for image in images:
            tar.add(image, arcname=f"{image.parent.name}/{image.name}")
    sources = np.array([str(shard), str(images[0])], dtype=object)
    out = read_batch({"source": sources}, filesystem=pafs.LocalFileSystem())
    assert out["path"].tolist() == [f"{shard}/{i.parent.name}/{i.name}" for i in images] + [str(images[0])]
    assert out["offset"][-1] == -1
    stored = shard.read_bytes()
    if compression:
        assert (out["offset"] == -1).all()
        assert member_ranges(out["path"], out["offset"], [len(b) for b in out["bytes"]]) is None
        return
    for offset, data, image in zip(out["offset"][:-1], out["bytes"][:-1], images, strict=True):
        assert offset > 0 and stored[offset : offset + len(data)] == data == image.read_bytes()
    ranges = member_ranges(out["path"], out["offset"], [len(b) for b in out["bytes"]])
    assert ranges.num_rows == len(images) and ranges.column("path").to_pylist() == out["path"][:-1].tolist()


@pytest.mark.parametrize(
    "path, label",
    [
        ("/d/Forest/a.jpg", "Forest"),  # a loose image: its folder
        ("/d/Forest/shard-0.tar", "Forest"),  # a listed shard (or its error row): the shard's folder
        ("/d/Forest/shard-0.tar/a.jpg", "Forest"),  # a member at the shard's top level: the shard's folder
        ("/d/shards/shard-0.tar/River/a.jpg", "River"),  # a <class>/<image> member: its own folder
        ("bucket/p/Forest/SHARD.TAR/a.png", "Forest"),
    ],
)
def test_folder_label_is_the_one_rule_for_files_and_shard_members(path, label):
    assert folder_label(path) == label


def test_rows_per_source_counts_each_source_of_a_batch():
    from scenecluster.ingest import _rows_per_source

    out = _rows_per_source({"source": np.array(["b.tar", "a.jpg", "b.tar", "b.tar"], dtype=object)})
    assert dict(zip(out["source"].tolist(), out["n_rows"].tolist(), strict=True)) == {"a.jpg": 1, "b.tar": 3}


def test_links_are_followed_once_and_loops_end(tmp_path, sample_dir):
    """Two links back to parents (the case that hung) and one to the root list each file once; a link to a
    folder outside the input is followed, and a loop out there ends too."""
    images = sorted(sample_dir.glob("Forest/*.jpg"))[:3]
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    for img in images:
        (root / "a" / "b" / img.name).write_bytes(img.read_bytes())
    os.symlink("..", root / "a" / "b" / "up")
    os.symlink("../..", root / "a" / "b" / "up2")
    os.symlink(str(root), root / "a" / "root")
    os.symlink(str(root / "a" / "b" / images[0].name), root / "again.jpg")  # a file link inside: listed once
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(images[0].read_bytes())
    os.symlink(str(outside), outside / "self")
    os.symlink(str(outside), root / "linked")
    listed = list(walk_local(str(root)))
    assert sorted(listed) == sorted([str(root / "a" / "b" / i.name) for i in images] + [str(root / "linked" / "x.jpg")])
    assert list_scenes(str(root)).paths == sorted(listed)


def test_first_parts_are_small_so_small_runs_resume():
    """Issue 13 case 11: with one 512-scene part, a killed run of 300 scenes recomputed everything."""
    from scenecluster.embed import plan_chunks
    from scenecluster.manifest import part_size

    sources = [f"s{i:04d}.jpg" for i in range(300)]
    assert [len(c.sources) for c in plan_chunks(sources, 512, {})] == [64, 128, 108]
    assert [part_size(i, 512) for i in range(6)] == [64, 128, 256, 512, 512, 512]
    assert [part_size(i, 20) for i in range(3)] == [20, 20, 20]  # an explicit small chunk_size is kept


def test_jpeg_2000_bands_and_webp_tiles_are_listed_and_read_like_png(tmp_path):
    """Sentinel-2 delivers each band as a 16-bit JPEG 2000 file, and tile servers store WebP: both used to be left
    out of the listing without a word. A 16-bit band must come out as the same picture as that band in a PNG."""
    from PIL import Image

    jpgs = sorted(copy_sample(tmp_path / "src", per_class=1, classes=3).glob("*/*.jpg"))
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in jpgs]
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    band = (rgb[0].mean(axis=2) * 40).astype(np.uint16)  # reflectance-like values up to about 10,000
    Image.fromarray(band).save(scenes / "B04.jp2")
    Image.fromarray(band).save(scenes / "B04.png")
    Image.fromarray(rgb[1]).save(scenes / "tile.J2K", format="JPEG2000")
    Image.fromarray(rgb[2]).save(scenes / "tile.webp", lossless=True)
    listing = list_scenes(str(scenes))
    assert [Path(p).name for p in listing.paths] == ["B04.jp2", "B04.png", "tile.J2K", "tile.webp"]
    blobs = [Path(p).read_bytes() for p in listing.paths]
    out = decode_batch(
        {"path": np.array(listing.paths, dtype=object), "bytes": np.array(blobs, dtype=object)}, image_size=32
    )
    assert list(out["error"]) == ["", "", "", ""]
    np.testing.assert_array_equal(out["image"][0], out["image"][1])  # the JPEG 2000 band reads as the PNG one
    assert min(float(img.std()) for img in out["image"]) > 5  # pictures, not blank squares
    np.testing.assert_array_equal(out["image"][3], decode_image(Path(jpgs[2]).read_bytes(), 32))  # lossless WebP


def test_the_region_named_for_a_bucket(monkeypatch):
    """Another store's region is the one configured; a bucket on AWS is asked for its own, and when it cannot
    be asked (no route to AWS, no such bucket) the configured one is used, without an error."""
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert configured_region() == "eu-west-1"  # the SDKs' order
    assert s3_region("any-bucket", "http://127.0.0.1:9") == "eu-west-1"  # not asked of AWS
    monkeypatch.delenv("AWS_REGION")
    assert configured_region() == "us-west-2"
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert configured_region() == "us-east-1"
    assert s3_region(f"scenecluster-no-such-bucket-{uuid.uuid4().hex[:12]}", None) == "us-east-1"
