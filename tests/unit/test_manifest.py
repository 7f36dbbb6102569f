"""The manifest's layout: a row group per part, so a part's loader reads its own sources and no one else's."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import scenecluster.manifest
import scenecluster.pixels
from scenecluster.manifest import MANIFEST, load_parts, write_manifest_paths
from scenecluster.outputs import OutputFolder


@pytest.fixture
def manifest(tmp_path):
    out = OutputFolder(str(tmp_path))
    paths = (f"archive/c{i % 3}/scene-{i:05d}.jpg" for i in range(1000))
    write_manifest_paths(paths, out, identity={"test": 1}, chunk_size=128)
    (file,) = [f for f in out.list(MANIFEST) if f.endswith(".parquet")]
    return out, file, tmp_path / MANIFEST / file


def test_each_part_is_its_own_row_group_with_name_statistics(manifest):
    _, _, local = manifest
    meta = pq.ParquetFile(local).metadata
    names = pq.read_table(local, columns=["name"]).column("name").to_pylist()
    assert meta.num_rows == len(names) == meta.num_row_groups > 1
    name_column = meta.schema.names.index("name")
    for i, name in enumerate(names):
        stats = meta.row_group(i).column(name_column).statistics
        assert stats.has_min_max and stats.min == stats.max == name


def _corrupt_sources_of_row_group(local, index: int) -> None:
    meta = pq.ParquetFile(local).metadata
    leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path.startswith("sources"))
    sources = meta.row_group(index).column(leaf)
    start = sources.dictionary_page_offset or sources.data_page_offset
    data = bytearray(local.read_bytes())
    data[start : start + sources.total_compressed_size] = b"\xff" * sources.total_compressed_size
    local.write_bytes(bytes(data))


def test_a_part_loads_without_reading_the_other_parts_of_its_file(manifest):
    out, file, local = manifest
    table = pq.read_table(local)
    names, sources = table.column("name").to_pylist(), table.column("sources").to_pylist()
    _corrupt_sources_of_row_group(local, 0)  # a loader that read the whole file would now fail

    loaded = load_parts(pa.table({"file": [file], "name": [names[3]]}), out, columns=["name", "sources"])

    assert loaded.column("name").to_pylist() == [names[3]]
    assert loaded.column("sources").to_pylist() == [sources[3]]
    with pytest.raises(Exception):  # noqa: B017 - proves the corruption is real: the damaged part cannot load
        first = load_parts(pa.table({"file": [file], "name": [names[0]]}), out, columns=["sources"])
        assert first.column("sources").to_pylist() == [sources[0]]


def test_a_finished_pass_is_taken_only_while_its_manifest_and_every_part_are_there(manifest, tmp_path):
    from scenecluster.embed import EMBEDDINGS, finished_pass, record_pass
    from scenecluster.manifest import manifest_parts

    out, _, _ = manifest
    names = [name for _, name in manifest_parts(out)]
    assert finished_pass(out) is None  # no pass has finished yet
    for name in names:
        out.write_bytes(f"{EMBEDDINGS}/{name}.parquet", b"")  # only their presence is checked here
    record_pass(out, [(name, 10, 9, False) for name in names])
    assert finished_pass(out) == [(name, 10, 9, True) for name in names]

    (tmp_path / EMBEDDINGS / f"{names[1]}.parquet").unlink()  # a part lost: the pass runs again
    assert finished_pass(out) is None
    out.write_bytes(f"{EMBEDDINGS}/{names[1]}.parquet", b"")
    assert finished_pass(out) is not None
    # a new listing replaces the manifest and drops the counts with it, even when it lists the same parts
    write_manifest_paths(
        (f"archive/c{i % 3}/scene-{i:05d}.jpg" for i in range(1000)), out, identity={"test": 1}, chunk_size=128
    )
    assert finished_pass(out) is None


def test_another_seed_relists_only_when_the_seed_draws_a_sample(tmp_path):
    """Without ``data.sample`` the seed moves only UMAP and the mixture: a benchmark's next seed must find the
    listing (and with it the finished embedding pass) as it was, not list and embed the archive again."""
    from scenecluster.manifest import DONE_FILE, write_manifest

    scenes = tmp_path / "scenes" / "fields"
    scenes.mkdir(parents=True)
    for i in range(6):
        (scenes / f"scene-{i}.jpg").write_bytes(b"not decoded while listing")
    out = OutputFolder(str(tmp_path / "out"))

    def listing(**kwargs) -> tuple[int, int]:
        manifest = write_manifest(str(tmp_path / "scenes"), out, identity={"test": 1}, chunk_size=4, **kwargs)
        return manifest.n_sources, (tmp_path / "out" / DONE_FILE).stat().st_mtime_ns

    n, listed = listing(seed=0)
    assert n == 6 and listing(seed=1) == (6, listed)  # kept
    # a kept listing says so, and does not take scenes added since (the job's [list] line tells the user)
    (scenes / "scene-new.jpg").write_bytes(b"added after the first listing")
    kept = write_manifest(str(tmp_path / "scenes"), out, identity={"test": 1}, chunk_size=4)
    assert (kept.n_sources, kept.kept) == (6, True)
    assert not write_manifest(
        str(tmp_path / "scenes"), OutputFolder(str(tmp_path / "other")), identity={"test": 1}, chunk_size=4
    ).kept
    n_sampled, sampled = listing(sample=3, seed=1)
    assert n_sampled == 3 and sampled != listed
    assert listing(sample=3, seed=1) == (3, sampled)  # the same sample is kept
    assert listing(sample=3, seed=2)[1] != sampled  # another seed draws another sample


def test_a_new_listing_drops_the_parts_it_does_not_name(tmp_path):
    """Another ``embed.chunk_size`` cuts the same scenes into other parts: the old parts' files would make the
    report, ``skipped.jsonl`` and the exports count every scene twice, so they go; a part cut alike stays."""
    from scenecluster.manifest import PART_FOLDERS, manifest_parts

    out = OutputFolder(str(tmp_path))
    paths = [f"archive/c{i % 3}/scene-{i:05d}.jpg" for i in range(300)]
    write_manifest_paths(iter(paths), out, identity={"test": 1}, chunk_size=64)
    first = {name for _, name in manifest_parts(out)}
    for folder in PART_FOLDERS:
        for name in first:
            out.write_bytes(f"{folder}/{name}.parquet", b"")
    write_manifest_paths(iter(paths), out, identity={"test": 1}, chunk_size=128)
    second = {name for _, name in manifest_parts(out)}
    kept = first & second  # the first part is 64 scenes either way
    assert len(first) == 5 and len(second) == 3 and len(kept) == 1
    for folder in PART_FOLDERS:
        assert {file.removesuffix(".parquet") for file in out.list(folder)} == kept


def test_a_revised_reading_renames_the_parts_that_hold_scenes_it_reads_otherwise(monkeypatch):
    """A part of TIFFs, PNGs or shards made by an earlier reading must not be taken for done (its vectors would sit
    beside the new reading's); a part of JPEGs alone keeps its name, and its vectors, across the upgrade."""
    from scenecluster.manifest import part_name

    parts = {
        "jpeg": ["a/x.jpg", "a/y.JPEG"],
        "one tiff among jpegs": ["a/x.jpg", "a/y.tif"],
        "png": ["a/x.png"],
        "shard": ["shards/s-0000.tar"],
    }
    before = {kind: part_name(0, sources, {"test": 1}) for kind, sources in parts.items()}
    monkeypatch.setattr(scenecluster.pixels, "READING_REVISION", scenecluster.pixels.READING_REVISION + 1)
    after = {kind: part_name(0, sources, {"test": 1}) for kind, sources in parts.items()}
    assert {kind for kind in parts if before[kind] == after[kind]} == {"jpeg"}


def test_a_listing_made_under_another_reading_keeps_its_scenes_and_renames_the_parts_read_otherwise(
    tmp_path, monkeypatch
):
    """A run folder's listing is made once (tiles added since are for ``assign``); after an upgrade that reads
    TIFFs otherwise, the same scenes in the same parts are named anew where a part holds one, and that part's
    old embeddings go, so the rerun embeds it again and counts its scenes once."""
    from scenecluster.manifest import DONE_FILE, PART_FOLDERS, manifest_parts, write_manifest

    scenes = tmp_path / "scenes" / "fields"
    scenes.mkdir(parents=True)
    for i in range(6):
        (scenes / f"scene-{i}.jpg").write_bytes(b"not decoded while listing")
    (scenes / "scene-6.tif").write_bytes(b"not decoded while listing")
    out = OutputFolder(str(tmp_path / "out"))

    def listing():
        manifest = write_manifest(str(tmp_path / "scenes"), out, identity={"test": 1}, chunk_size=4)
        names = [name for _, name in manifest_parts(out)]
        return manifest, names, (tmp_path / "out" / DONE_FILE).stat().st_mtime_ns

    first, names, listed = listing()
    assert (first.n_sources, first.n_parts, first.n_revised) == (7, 2, 1)
    assert listing()[1:] == (names, listed)  # the same reading keeps the listing as it is
    for folder in PART_FOLDERS:
        for name in names:
            out.write_bytes(f"{folder}/{name}.parquet", b"")
    (scenes / "scene-7.jpg").write_bytes(b"added after the listing")
    monkeypatch.setattr(scenecluster.manifest, "READING_REVISION", 99)
    monkeypatch.setattr(scenecluster.pixels, "READING_REVISION", 99)
    again, renamed, _ = listing()
    assert (again.n_sources, again.n_parts, again.n_revised) == (7, 2, 1)  # not listed again
    # the parts of 4 and 3 scenes: the first holds JPEGs alone and keeps its name, the second holds the TIFF
    assert renamed[0] == names[0] and renamed[1] != names[1]
    for folder in PART_FOLDERS:
        assert out.list(folder) == [f"{names[0]}.parquet"]
    assert listing()[:2] == (again, renamed)  # and the new names are kept


def _listing_of(tmp_path, names: list[str]) -> OutputFolder:
    from scenecluster.manifest import write_manifest

    scenes = tmp_path / "scenes" / "fields"
    scenes.mkdir(parents=True)
    for name in names:
        (scenes / name).write_bytes(b"not decoded while listing")
    out = OutputFolder(str(tmp_path / "out"))
    write_manifest(str(tmp_path / "scenes"), out, identity={"test": 1}, chunk_size=4)
    return out


def _as_listed_before_revisions(out: OutputFolder) -> None:
    """The listing file a scenecluster before reading revisions wrote: no reading in its key, no count of them."""
    import json

    from scenecluster.manifest import DONE_FILE

    done = json.loads(out.read_text(DONE_FILE))
    del done["key"]["reading"], done["n_revised"]
    out.write_text(DONE_FILE, json.dumps(done))


@pytest.mark.parametrize(
    ("names", "before_revisions", "expected"),
    [
        (["a.jpg", "b.jpeg"], False, None),
        (["a.jpg", "b.tif"], False, scenecluster.pixels.READING_REVISION),
        (["a.jpg", "b.jpeg"], True, None),
        (["a.jpg", "b.png"], True, 0),
    ],
    ids=["jpegs", "a tiff", "jpegs listed before revisions", "a png listed before revisions"],
)
def test_a_listing_tells_which_reading_embedded_its_scenes_other_than_jpeg(tmp_path, names, before_revisions, expected):
    """A clustering saved before ``clustering.json`` recorded its reading is known by its run's listing: JPEGs
    alone were read alike by every revision; other scenes listed before revisions were counted were read by the
    reading before the first revision."""
    from scenecluster.manifest import listed_reading

    out = _listing_of(tmp_path, names)
    if before_revisions:
        _as_listed_before_revisions(out)
    assert listed_reading(out) == expected
    assert listed_reading(OutputFolder(str(tmp_path / "no run"))) is None


def test_assign_warns_only_when_its_scenes_are_read_otherwise_than_those_the_clustering_was_fitted_on(tmp_path):
    from scenecluster.job import reading_mismatch
    from scenecluster.pixels import READING_REVISION

    run = _listing_of(tmp_path, ["a.jpg", "b.tif"])
    assert reading_mismatch({"reading": READING_REVISION}, run, n_revised=5) is None
    assert reading_mismatch({"reading": None}, run, n_revised=5) is None  # fitted on JPEGs alone
    stale = reading_mismatch({"reading": READING_REVISION - 1}, run, n_revised=5)
    assert stale is not None and f"revision {READING_REVISION - 1}, this one's is {READING_REVISION}" in stale
    assert "5 of the scenes" in stale and str(tmp_path / "out" / "clustering") in stale
    assert reading_mismatch({"reading": READING_REVISION - 1}, run, n_revised=0) is None  # JPEGs to assign
    # a clustering saved before it recorded its reading: its run's listing tells
    assert reading_mismatch({}, run, n_revised=5) is None
    _as_listed_before_revisions(run)
    assert "reading revision 0" in reading_mismatch({}, run, n_revised=5)


def test_a_long_listing_reports_its_count_as_it_goes(tmp_path):
    """Ten million keys are 10,000 requests: the job's log says how far the listing is, at most every 30 s, and a
    sampled listing reports the walk it draws from."""
    from scenecluster.manifest import write_manifest

    scenes = tmp_path / "scenes" / "fields"
    scenes.mkdir(parents=True)
    for i in range(2500):
        (scenes / f"scene-{i:04d}.jpg").touch()
    for run, kwargs in enumerate([{}, {"sample": 10}]):
        reported: list[int] = []
        out = OutputFolder(str(tmp_path / f"out{run}"))
        write_manifest(
            str(tmp_path / "scenes"),
            out,
            identity={},
            chunk_size=512,
            progress=reported.append,
            progress_every_s=0,
            **kwargs,
        )
        assert reported == [1000, 2000]
    quiet: list[int] = []
    write_manifest(
        str(tmp_path / "scenes"),
        OutputFolder(str(tmp_path / "out2")),
        identity={},
        chunk_size=512,
        progress=quiet.append,
    )
    assert quiet == []  # 2,500 local files list in well under the 30 s between reports
